package firmware

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestHTTPSourceDownloadsWithDeviceIdentity(t *testing.T) {
	rel := newRelease(t, AlgEd25519, 300_000)
	srv := newImageServer(t, rel.image)
	m := rel.manifest(t, "1.0.0", srv.URL())
	rel.sign(t, m)
	d := &Downloader{Dir: t.TempDir()}
	res, err := d.Download(context.Background(), m, []Source{NewHTTPSource(srv.URL(), srv.client)})
	if err != nil {
		t.Fatal(err)
	}
	if err := res.Verify(m); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(res.Path)
	if !bytes.Equal(got, rel.image) {
		t.Fatal("downloaded image differs")
	}
	mustEqual(t, "bytes fetched", d.BytesFetched(), int64(len(rel.image)))
	mustEqual(t, "range header", srv.Ranges()[0], "bytes=0-299999")
	mustEqual(t, "client CN seen by server", srv.clientCNs[0], "dev-0001")

	// Without the client certificate the server refuses: the identity is really used.
	noID := srv.client.Clone()
	noID.Certificates = nil
	noID.ClientSessionCache = nil // a cached TLS 1.3 ticket would resume without a certificate
	d2 := &Downloader{Dir: t.TempDir()}
	if _, err := d2.Download(context.Background(), m, []Source{NewHTTPSource(srv.URL(), noID)}); err == nil {
		t.Fatal("download without client certificate succeeded")
	}
}

func TestHTTPSourceRanges(t *testing.T) {
	rel := newRelease(t, AlgEd25519, 2000)
	srv := newImageServer(t, rel.image)
	src := NewHTTPSource(srv.URL(), srv.client)
	rc, err := src.Fetch(context.Background(), 100, 50)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	buf.ReadFrom(rc)
	rc.Close()
	if !bytes.Equal(buf.Bytes(), rel.image[100:150]) {
		t.Fatal("range 100-149 returned wrong bytes")
	}

	// A server that ignores Range (200 with the whole body) cannot resume: refused at offset > 0,
	// accepted at offset 0; a 404 is reported with its status.
	plain := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/missing" {
			http.NotFound(w, r)
			return
		}
		w.Write(rel.image)
	}))
	defer plain.Close()
	tlsConf := plain.Client().Transport.(*http.Transport).TLSClientConfig
	ignoring := NewHTTPSource(plain.URL+"/img", tlsConf)
	if _, err := ignoring.Fetch(context.Background(), 100, 50); err == nil || !strings.Contains(err.Error(), "ignored the Range") {
		t.Fatalf("200 at offset 100: %v", err)
	}
	rc, err = ignoring.Fetch(context.Background(), 0, 2000)
	if err != nil {
		t.Fatal(err)
	}
	rc.Close()
	if _, err := NewHTTPSource(plain.URL+"/missing", tlsConf).Fetch(context.Background(), 0, 10); err == nil || !strings.Contains(err.Error(), "404") {
		t.Fatalf("404: %v", err)
	}
	for cr, ok := range map[string]bool{"bytes 0-10/100": true, "bytes 5-10/*": true, "items 1-2/3": false, "bytes 1/3": false} {
		if _, _, err := parseContentRange(cr); (err == nil) != ok {
			t.Errorf("parseContentRange(%q): %v", cr, err)
		}
	}
}

// memTransport serves chunks from a ChunkServer in memory, counting bytes and optionally
// failing after a number of chunks.
type memTransport struct {
	srv       *ChunkServer
	bytes     atomic.Int64
	calls     atomic.Int64
	failAfter int64 // fail every call after this many successful ones (0: never)
}

func (m *memTransport) RequestChunk(ctx context.Context, offset int64, length int) ([]byte, error) {
	n := m.calls.Add(1)
	if m.failAfter > 0 && n > m.failAfter {
		return nil, errors.New("link down")
	}
	req, _ := json.Marshal(ChunkRequest{Device: "dev-0001", Offset: offset, Length: length})
	_, resp, err := m.srv.Handle(req)
	if err != nil {
		return nil, err
	}
	r, err := DecodeChunkResponse(resp)
	if err != nil {
		return nil, err
	}
	if r.Err != "" {
		return nil, errors.New(r.Err)
	}
	m.bytes.Add(int64(len(r.Data)))
	return r.Data, nil
}

func TestChunkSourceResumesAfterLinkLoss(t *testing.T) {
	rel := newRelease(t, AlgEd25519, 200_000) // 4 chunks of 64 KiB, the last short
	m := rel.manifest(t, "1.0.0")
	rel.sign(t, m)
	cs := &ChunkServer{Image: bytes.NewReader(rel.image), Size: int64(len(rel.image)), ChunkSize: m.ChunkSize}
	dir := t.TempDir()

	tr := &memTransport{srv: cs, failAfter: 2}
	d := &Downloader{Dir: dir}
	_, err := d.Download(context.Background(), m, []Source{&ChunkSource{Transport: tr, ChunkSize: m.ChunkSize, Window: 1}})
	if err == nil {
		t.Fatal("download with the link down succeeded")
	}
	mustEqual(t, "bytes fetched before the link went down", d.BytesFetched(), int64(2*m.ChunkSize))

	// A new Downloader (agent restarted) on the same directory fetches only the rest.
	tr2 := &memTransport{srv: cs}
	d2 := &Downloader{Dir: dir}
	res, err := d2.Download(context.Background(), m, []Source{&ChunkSource{Transport: tr2, ChunkSize: m.ChunkSize, Window: 3}})
	if err != nil {
		t.Fatal(err)
	}
	if err := res.Verify(m); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "bytes fetched after restart", tr2.bytes.Load(), int64(len(rel.image)-2*m.ChunkSize))
	mustEqual(t, "bytes re-hashed from disk", d2.BytesRehashed(), int64(2*m.ChunkSize))
}

func TestDownloadTrustsOnlyPersistedOffset(t *testing.T) {
	// Simulates a kill between writing image bytes and persisting the offset: image.part is
	// longer than download.json says. The extra bytes are dropped and fetched again.
	rel := newRelease(t, AlgEd25519, 10_000)
	m, err := BuildManifest(rel.imagePath, "fw", "1", 0, []string{"hw-1"}, 1024, nil)
	if err != nil {
		t.Fatal(err)
	}
	rel.sign(t, m)
	dir := t.TempDir()
	torn := append(bytes.Clone(rel.image[:3000]), bytes.Repeat([]byte{0xff}, 1000)...) // 1000 garbage bytes after the durable 3000
	os.WriteFile(filepath.Join(dir, partialImageFile), torn, 0o600)
	st, _ := json.Marshal(downloadState{Digest: m.Digest(), Offset: 3000})
	os.WriteFile(filepath.Join(dir, downloadFile), st, 0o600)

	tr := &memTransport{srv: &ChunkServer{Image: bytes.NewReader(rel.image), Size: m.Size, ChunkSize: m.ChunkSize}}
	d := &Downloader{Dir: dir}
	res, err := d.Download(context.Background(), m, []Source{&ChunkSource{Transport: tr, ChunkSize: m.ChunkSize}})
	if err != nil {
		t.Fatal(err)
	}
	if err := res.Verify(m); err != nil {
		t.Fatalf("torn tail not dropped: %v", err)
	}
	mustEqual(t, "bytes fetched", tr.bytes.Load(), int64(7000))

	// A progress file of another manifest is ignored: start from zero.
	st, _ = json.Marshal(downloadState{Digest: strings.Repeat("0", 64), Offset: 9000})
	os.WriteFile(filepath.Join(dir, downloadFile), st, 0o600)
	d2 := &Downloader{Dir: dir}
	tr2 := &memTransport{srv: tr.srv}
	if _, err := d2.Download(context.Background(), m, []Source{&ChunkSource{Transport: tr2, ChunkSize: m.ChunkSize}}); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "bytes fetched for a foreign progress file", tr2.bytes.Load(), m.Size)
}

func TestDownloadFallsBackToNextSource(t *testing.T) {
	rel := newRelease(t, AlgEd25519, 150_000)
	srv := newImageServer(t, rel.image)
	m := rel.manifest(t, "1.0.0", SourceMQTT, srv.URL())
	rel.sign(t, m)
	dead := &memTransport{srv: &ChunkServer{Image: bytes.NewReader(rel.image), Size: m.Size, ChunkSize: m.ChunkSize}, failAfter: 1}
	d := &Downloader{Dir: t.TempDir()}
	res, err := d.Download(context.Background(), m, []Source{
		&ChunkSource{Transport: dead, ChunkSize: m.ChunkSize, Window: 1},
		NewHTTPSource(srv.URL(), srv.client),
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := res.Verify(m); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "https continued at", srv.Ranges()[0], "bytes=65536-149999")
	mustEqual(t, "total fetched", d.BytesFetched(), m.Size)
}

// lossyBroker connects an MQTTChunkClient to a ChunkServer in memory, dropping every third
// request, checking the topics, and delivering answers from another goroutine as paho would.
type lossyBroker struct {
	t       testing.TB
	srv     *ChunkServer
	client  *MQTTChunkClient
	mu      sync.Mutex
	n       int
	dropped int
	topic   string
}

func (b *lossyBroker) publish(ctx context.Context, topic string, payload []byte) error {
	b.mu.Lock()
	b.n++
	drop := b.n%3 == 0
	if drop {
		b.dropped++
	}
	b.mu.Unlock()
	if topic != b.topic {
		b.t.Errorf("request published on %q, want %q", topic, b.topic)
	}
	if drop {
		return nil
	}
	dev, resp, err := b.srv.Handle(payload)
	if err != nil {
		return err
	}
	if dev != "dev-0001" {
		b.t.Errorf("answer routed to %q", dev)
	}
	go b.client.Deliver(resp)
	return nil
}

func TestMQTTChunkClientRetriesLostRequests(t *testing.T) {
	rel := newRelease(t, AlgEd25519, 100_000)
	m, _ := BuildManifest(rel.imagePath, "tpmagent", "1.0.0", 0, []string{"hw-1"}, 4096, nil)
	rel.sign(t, m)
	b := &lossyBroker{t: t, srv: &ChunkServer{Image: bytes.NewReader(rel.image), Size: m.Size, ChunkSize: m.ChunkSize},
		topic: ChunkRequestTopic(m.Name, m.Version)}
	b.client = &MQTTChunkClient{Publish: b.publish, RequestTopic: ChunkRequestTopic(m.Name, m.Version), DeviceID: "dev-0001", Timeout: 50 * time.Millisecond}
	// Garbage and unsolicited answers are dropped without harm.
	b.client.Deliver([]byte("junk"))
	b.client.Deliver(EncodeChunkResponse(999999, []byte("x")))

	d := &Downloader{Dir: t.TempDir()}
	res, err := d.Download(context.Background(), m, []Source{&ChunkSource{Transport: b.client, ChunkSize: m.ChunkSize, Window: 4}})
	if err != nil {
		t.Fatal(err)
	}
	if err := res.Verify(m); err != nil {
		t.Fatal(err)
	}
	if b.dropped == 0 {
		t.Fatal("no request was dropped: the retry path was not exercised")
	}
	mustEqual(t, "topic", ChunkResponseTopic("tpmagent", "1.0.0", "dev-0001"), "firmware/tpmagent/1.0.0/chunks/response/dev-0001")

	// The publisher's error answers reach the caller.
	_, err = b.client.RequestChunk(context.Background(), m.Size-10, 100)
	if err == nil || !strings.Contains(err.Error(), "beyond image size") {
		// dropped requests are retried, so eventually the error answer arrives
		t.Fatalf("out-of-range request: %v", err)
	}
}

func TestChunkFraming(t *testing.T) {
	r, err := DecodeChunkResponse(EncodeChunkResponse(42, []byte("abc")))
	if err != nil || r.Offset != 42 || string(r.Data) != "abc" || r.Err != "" {
		t.Fatalf("round trip: %+v %v", r, err)
	}
	r, err = DecodeChunkResponse(EncodeChunkError(7, "nope"))
	if err != nil || r.Offset != 7 || r.Err != "nope" {
		t.Fatalf("error round trip: %+v %v", r, err)
	}
	for _, bad := range [][]byte{nil, []byte("FWCK"), append([]byte("FWCX\x01\x00"), make([]byte, 8)...), append([]byte("FWCK\x02\x00"), make([]byte, 8)...), append([]byte("FWCK\x01\x07"), make([]byte, 8)...)} {
		if _, err := DecodeChunkResponse(bad); err == nil {
			t.Errorf("accepted %q", bad)
		}
	}
	for _, bad := range []string{`{}`, `{"device":"a/b","offset":0,"length":1}`, `{"device":"d","offset":-1,"length":1}`, `{"device":"d","offset":0,"length":0}`, `{"device":"d","offset":0,"length":1,"x":1}`} {
		if _, err := DecodeChunkRequest([]byte(bad)); err == nil {
			t.Errorf("accepted request %s", bad)
		}
	}
}
