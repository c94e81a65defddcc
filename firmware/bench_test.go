package firmware

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
)

func BenchmarkParseAndVerify(b *testing.B) {
	for _, alg := range []Alg{AlgEd25519, AlgECDSAP256} {
		b.Run(string(alg), func(b *testing.B) {
			rel := newRelease(b, alg, 1000)
			env := rel.sign(b, rel.manifest(b, "1.0.0"))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := ParseAndVerify(env, rel.trust); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkDownload measures the download path (write, SHA-256, fsync + progress file every
// chunk) for a 16 MiB image from HTTPS over loopback mTLS and from in-memory MQTT chunks.
func BenchmarkDownload(b *testing.B) {
	const size = 16 << 20
	rel := newRelease(b, AlgEd25519, size)
	srv := newImageServer(b, rel.image)
	for _, tc := range []struct {
		name  string
		chunk int
		src   func(m *Manifest) Source
	}{
		{"https-64KiB", 64 << 10, func(*Manifest) Source { return NewHTTPSource(srv.URL(), srv.client) }},
		{"https-1MiB", 1 << 20, func(*Manifest) Source { return NewHTTPSource(srv.URL(), srv.client) }},
		{"chunks-64KiB", 64 << 10, func(m *Manifest) Source {
			return &ChunkSource{Transport: &memTransport{srv: &ChunkServer{Image: bytes.NewReader(rel.image), Size: size, ChunkSize: m.ChunkSize}}, ChunkSize: m.ChunkSize}
		}},
	} {
		b.Run(tc.name, func(b *testing.B) {
			m, err := BuildManifest(rel.imagePath, "fw", "1", 0, []string{"hw-1"}, tc.chunk, []string{SourceMQTT})
			if err != nil {
				b.Fatal(err)
			}
			rel.sign(b, m)
			b.SetBytes(size)
			for b.Loop() {
				dir := b.TempDir()
				d := &Downloader{Dir: dir}
				res, err := d.Download(context.Background(), m, []Source{tc.src(m)})
				if err != nil {
					b.Fatal(err)
				}
				if err := res.Verify(m); err != nil {
					b.Fatal(err)
				}
				os.Remove(filepath.Join(dir, partialImageFile))
			}
		})
	}
}
