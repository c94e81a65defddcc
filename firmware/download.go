package firmware

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync/atomic"
)

// Files of a download in the state directory.
const (
	partialImageFile = "image.part"
	downloadFile     = "download.json"
)

// downloadState is download.json: which manifest image.part belongs to and how many of its
// bytes are durable.
type downloadState struct {
	Digest string `json:"manifest_sha256"`
	Offset int64  `json:"offset"`
}

// Downloader fetches an image into Dir resumably: the received offset is persisted (fsync of
// the image, then download.json via temp file, fsync, rename) every PersistEvery bytes and
// whenever a source fails or ctx ends, and a later Download of the same manifest re-hashes the bytes already on disk and fetches
// only the rest. A Downloader is used by one goroutine at a time.
type Downloader struct {
	Dir string
	// Progress, if set, is called after every write with the bytes on disk and the image size.
	Progress func(done, total int64)
	// PersistEvery is how many bytes may be received between two persisted offsets (what a
	// power cut can cost); 0 means 1 MiB; never less than the manifest's chunk_size.
	// Each persist costs three fsyncs: 64 KiB steps cut throughput about eightfold here.
	PersistEvery int64
	Log          *slog.Logger

	fetched  atomic.Int64
	rehashed atomic.Int64
}

// BytesFetched returns the number of image bytes received from sources by this Downloader.
func (d *Downloader) BytesFetched() int64 { return d.fetched.Load() }

// BytesRehashed returns the number of bytes read back from disk to resume downloads.
func (d *Downloader) BytesRehashed() int64 { return d.rehashed.Load() }

// Downloaded is a complete download, not yet verified.
type Downloaded struct {
	Path   string
	Size   int64
	SHA256 []byte
}

// Verify compares size and SHA-256 with the manifest. Errors wrap ErrSizeMismatch or ErrHashMismatch.
func (r *Downloaded) Verify(m *Manifest) error {
	if r.Size != m.Size {
		return fmt.Errorf("firmware: downloaded %s %s is %d bytes, manifest says %d: %w", m.Name, m.Version, r.Size, m.Size, ErrSizeMismatch)
	}
	want, _ := hex.DecodeString(m.SHA256)
	if !bytes.Equal(r.SHA256, want) {
		return fmt.Errorf("firmware: downloaded %s %s has SHA-256 %x, manifest says %s: the image was altered in transit or at the source: %w",
			m.Name, m.Version, r.SHA256, m.SHA256, ErrHashMismatch)
	}
	return nil
}

// Discard removes the partial or complete image and its progress file.
func (d *Downloader) Discard() error {
	err1 := os.Remove(filepath.Join(d.Dir, partialImageFile))
	err2 := os.Remove(filepath.Join(d.Dir, downloadFile))
	for _, err := range []error{err1, err2} {
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("firmware: discard download: %w", err)
		}
	}
	return nil
}

func (d *Downloader) log() *slog.Logger {
	if d.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return d.Log
}

// Download fetches m's image from sources, in order, into Dir/image.part, continuing a previous
// download of the same manifest. It returns when all m.Size bytes are on disk and fsynced; call
// Verify on the result. On error (ctx cancelled included) the progress so far is persisted.
func (d *Downloader) Download(ctx context.Context, m *Manifest, sources []Source) (*Downloaded, error) {
	if len(sources) == 0 {
		return nil, fmt.Errorf("firmware: download %s %s: %w", m.Name, m.Version, ErrNoSource)
	}
	if err := os.MkdirAll(d.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("firmware: state directory: %w", err)
	}
	partPath := filepath.Join(d.Dir, partialImageFile)
	statePath := filepath.Join(d.Dir, downloadFile)
	digest := m.Digest()

	var offset int64
	if data, err := os.ReadFile(statePath); err == nil {
		var st downloadState
		if json.Unmarshal(data, &st) == nil && st.Digest == digest && st.Offset >= 0 && st.Offset <= m.Size {
			offset = st.Offset
		}
	}
	f, err := os.OpenFile(partPath, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("firmware: open partial image: %w", err)
	}
	defer f.Close()
	if fi, err := f.Stat(); err != nil {
		return nil, fmt.Errorf("firmware: stat %s: %w", partPath, err)
	} else if fi.Size() < offset {
		offset = fi.Size() // progress file ahead of the data: trust only the data
	}
	// Bytes after the durable offset may be torn: drop them.
	if err := f.Truncate(offset); err != nil {
		return nil, fmt.Errorf("firmware: truncate %s: %w", partPath, err)
	}
	h := sha256.New()
	if offset > 0 {
		n, err := io.Copy(h, io.NewSectionReader(f, 0, offset))
		d.rehashed.Add(n)
		if err != nil || n != offset {
			return nil, fmt.Errorf("firmware: re-hash %d bytes of %s to resume: %v", offset, partPath, err)
		}
		d.log().Info("firmware download resumes", "name", m.Name, "version", m.Version, "offset", offset, "size", m.Size)
	}
	if d.Progress != nil {
		d.Progress(offset, m.Size)
	}
	persisted := offset
	persist := func() error {
		if offset == persisted {
			return nil
		}
		if err := f.Sync(); err != nil {
			return fmt.Errorf("firmware: fsync %s: %w", partPath, err)
		}
		data, _ := json.Marshal(downloadState{Digest: digest, Offset: offset})
		if err := writeFileAtomic(statePath, data, 0o600); err != nil {
			return err
		}
		persisted = offset
		return nil
	}
	if offset == 0 {
		data, _ := json.Marshal(downloadState{Digest: digest, Offset: 0})
		if err := writeFileAtomic(statePath, data, 0o600); err != nil {
			return nil, err
		}
	}

	every := d.PersistEvery
	if every <= 0 {
		every = 1 << 20
	}
	every = max(every, int64(m.ChunkSize))
	buf := make([]byte, min(int64(m.ChunkSize), 1<<20))
	var errs []error
	for i := 0; i < len(sources) && offset < m.Size; {
		src := sources[i]
		before := offset
		err := d.pull(ctx, src, f, h, buf, m, every, &offset, &persisted, persist)
		if perr := persist(); perr != nil {
			return nil, perr
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("firmware: download %s %s stopped at %d of %d bytes: %w", m.Name, m.Version, offset, m.Size, ctx.Err())
		}
		if offset >= m.Size {
			break
		}
		if err != nil {
			d.log().Warn("firmware source failed", "source", src.String(), "offset", offset, "err", err)
		}
		if offset > before {
			continue // progress: ask the same source again from the new offset
		}
		errs = append(errs, fmt.Errorf("%s: %w", src.String(), err))
		i++
	}
	if offset < m.Size {
		return nil, fmt.Errorf("firmware: download %s %s: every source failed at byte %d of %d: %w", m.Name, m.Version, offset, m.Size, errors.Join(errs...))
	}
	return &Downloaded{Path: partPath, Size: offset, SHA256: h.Sum(nil)}, nil
}

// pull reads one Fetch stream to its end, writing, hashing and persisting as it goes.
func (d *Downloader) pull(ctx context.Context, src Source, f *os.File, h hash.Hash, buf []byte, m *Manifest,
	every int64, offset, persisted *int64, persist func() error) error {
	rc, err := src.Fetch(ctx, *offset, m.Size-*offset)
	if err != nil {
		return err
	}
	defer rc.Close()
	r := io.LimitReader(rc, m.Size-*offset)
	for {
		n, rerr := io.ReadFull(r, buf)
		if n > 0 {
			if _, err := f.WriteAt(buf[:n], *offset); err != nil {
				return fmt.Errorf("firmware: write image: %w", err)
			}
			h.Write(buf[:n])
			d.fetched.Add(int64(n))
			*offset += int64(n)
			if d.Progress != nil {
				d.Progress(*offset, m.Size)
			}
			if *offset-*persisted >= every {
				if err := persist(); err != nil {
					return err
				}
			}
		}
		switch {
		case rerr == nil:
		case errors.Is(rerr, io.EOF) || errors.Is(rerr, io.ErrUnexpectedEOF):
			if *offset < m.Size {
				return fmt.Errorf("stream ended at byte %d of %d: %w", *offset, m.Size, io.ErrUnexpectedEOF)
			}
			return nil
		default:
			return rerr
		}
		if *offset >= m.Size {
			return nil
		}
	}
}
