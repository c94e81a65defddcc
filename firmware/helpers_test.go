package firmware

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tpmagent/tpmagent/internal/testenv"
)

// release is the release side of a test: a key, a trust store with it, and an image file.
type release struct {
	key       crypto.Signer
	trust     *TrustStore
	image     []byte
	imagePath string
}

func newRelease(t testing.TB, alg Alg, size int) *release {
	t.Helper()
	key, err := GenerateReleaseKey(alg)
	if err != nil {
		t.Fatal(err)
	}
	trust, err := NewTrustStore(key.Public())
	if err != nil {
		t.Fatal(err)
	}
	img := make([]byte, size)
	if _, err := rand.Read(img); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "image.bin")
	if err := os.WriteFile(p, img, 0o644); err != nil {
		t.Fatal(err)
	}
	return &release{key: key, trust: trust, image: img, imagePath: p}
}

// manifest builds a manifest for the image (hardware "hw-1", security_version 2, 64 KiB chunks).
func (r *release) manifest(t testing.TB, version string, sources ...string) *Manifest {
	t.Helper()
	if len(sources) == 0 {
		sources = []string{SourceMQTT}
	}
	m, err := BuildManifest(r.imagePath, "tpmagent", version, 2, []string{"hw-0", "hw-1"}, 64<<10, sources)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func (r *release) sign(t testing.TB, m *Manifest) []byte {
	t.Helper()
	env, err := Sign(m, r.key)
	if err != nil {
		t.Fatal(err)
	}
	return env
}

// editEnvelope decodes the signed manifest bytes, lets edit change them, and re-encodes the
// envelope keeping the old signatures: a manifest edited after signing.
func editEnvelope(t testing.TB, env []byte, edit func(manifest []byte) []byte) []byte {
	t.Helper()
	var e map[string]any
	if err := json.Unmarshal(env, &e); err != nil {
		t.Fatal(err)
	}
	raw, err := base64.StdEncoding.DecodeString(e["manifest"].(string))
	if err != nil {
		t.Fatal(err)
	}
	e["manifest"] = base64.StdEncoding.EncodeToString(edit(raw))
	out, err := json.Marshal(e)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// imageServer is an HTTPS server requiring a client certificate (the device's mTLS identity),
// serving one image with Range support and counting the bytes it sends.
type imageServer struct {
	srv       *httptest.Server
	client    *tls.Config
	mu        sync.Mutex
	image     []byte
	ranges    []string
	clientCNs []string
	served    atomic.Int64
	requests  atomic.Int64
	// files of the PKI, for a child process that needs the same identity
	caFile, certFile, keyFile string
	// delay, if set, is slept after each 32 KiB written (a slow link)
	delay time.Duration
	// cutAfter, if > 0, makes the first response stop after that many bytes (connection dropped)
	cutAfter int64
	cut      atomic.Bool
	// inflight counts running handlers
	inflight sync.WaitGroup
}

// waitIdle waits until no handler runs (a killed client's response has stopped being written).
func (s *imageServer) waitIdle(t testing.TB) {
	t.Helper()
	done := make(chan struct{})
	go func() { s.inflight.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("image server handler still running 10s after its client died")
	}
}

func newImageServer(t testing.TB, image []byte) *imageServer {
	t.Helper()
	pki := testenv.NewPKI(t, "", "firmware test CA")
	srvCert, err := tls.LoadX509KeyPair(pki.ServerCertFile, pki.ServerKeyFile)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile, clientCert := pki.SoftClient(t, "dev-0001")
	s := &imageServer{image: image, caFile: pki.CAFile, certFile: certFile, keyFile: keyFile}
	s.srv = httptest.NewUnstartedServer(http.HandlerFunc(s.serve))
	s.srv.TLS = &tls.Config{
		Certificates: []tls.Certificate{srvCert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pki.Pool(),
		MinVersion:   tls.VersionTLS13,
	}
	s.srv.StartTLS()
	t.Cleanup(s.srv.Close)
	s.client = &tls.Config{
		RootCAs:            pki.Pool(),
		Certificates:       []tls.Certificate{clientCert},
		MinVersion:         tls.VersionTLS13,
		ClientSessionCache: tls.NewLRUClientSessionCache(8),
	}
	return s
}

func (s *imageServer) URL() string { return s.srv.URL + "/tpmagent/image" }

func (s *imageServer) serve(w http.ResponseWriter, r *http.Request) {
	s.requests.Add(1)
	s.inflight.Add(1)
	defer s.inflight.Done()
	s.mu.Lock()
	s.ranges = append(s.ranges, r.Header.Get("Range"))
	s.clientCNs = append(s.clientCNs, r.TLS.PeerCertificates[0].Subject.CommonName)
	img := s.image
	s.mu.Unlock()
	var out http.ResponseWriter = countingWriter{w, &s.served}
	if s.delay > 0 || s.cutAfter > 0 {
		out = &shapingWriter{ResponseWriter: out, s: s, limit: -1}
		if s.cutAfter > 0 && s.cut.CompareAndSwap(false, true) {
			out.(*shapingWriter).limit = s.cutAfter
		}
	}
	http.ServeContent(out, r, "image", time.Time{}, strings.NewReader(string(img)))
}

// shapingWriter writes in 32 KiB pieces, sleeping s.delay after each, and aborts the
// connection after limit bytes (limit < 0: never).
type shapingWriter struct {
	http.ResponseWriter
	s       *imageServer
	limit   int64
	written int64
}

func (w *shapingWriter) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		k := min(len(p), 32<<10)
		if w.limit >= 0 && w.written+int64(k) > w.limit {
			k = int(w.limit - w.written)
			m, _ := w.ResponseWriter.Write(p[:k])
			w.written += int64(m)
			w.ResponseWriter.(http.Flusher).Flush()
			panic(http.ErrAbortHandler) // drop the connection mid-body
		}
		m, err := w.ResponseWriter.Write(p[:k])
		n += m
		w.written += int64(m)
		if err != nil {
			return n, err
		}
		w.ResponseWriter.(http.Flusher).Flush()
		p = p[k:]
		if w.s.delay > 0 {
			time.Sleep(w.s.delay)
		}
	}
	return n, nil
}

func (s *imageServer) Ranges() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.ranges)
}

type countingWriter struct {
	http.ResponseWriter
	n *atomic.Int64
}

func (c countingWriter) Write(p []byte) (int, error) {
	n, err := c.ResponseWriter.Write(p)
	c.n.Add(int64(n))
	return n, err
}

func (c countingWriter) Flush() { c.ResponseWriter.(http.Flusher).Flush() }

// recorder is a Reporter that keeps every status.
type recorder struct {
	mu       sync.Mutex
	statuses []Status
	onReport func(Status)
}

func (r *recorder) Report(_ context.Context, s Status) error {
	r.mu.Lock()
	r.statuses = append(r.statuses, s)
	f := r.onReport
	r.mu.Unlock()
	if f != nil {
		f(s)
	}
	return nil
}

func (r *recorder) all() []Status {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.statuses)
}

// states returns the sequence of states with consecutive duplicates (download percents) folded.
func (r *recorder) states() []string {
	var out []string
	for _, s := range r.all() {
		if len(out) == 0 || out[len(out)-1] != s.State {
			out = append(out, s.State)
		}
	}
	return out
}

func (r *recorder) last() Status {
	all := r.all()
	if len(all) == 0 {
		return Status{}
	}
	return all[len(all)-1]
}

// device is the device side of a test: A/B file slots (slot a holds the old firmware), a state
// directory, a counter that lives outside it (standing in for TPM NV), a recorder and a
// restart hook that counts.
type device struct {
	dir      string
	stateDir string
	slots    *FileSlots
	counter  Counter
	rep      *recorder
	restarts atomic.Int32
	sources  Sources
	hardware string
	// healthTimeout is the Updater's HealthTimeout (2s unless a test shortens it).
	healthTimeout time.Duration
}

const oldFirmware = "old firmware v1\n"

func newDevice(t testing.TB, counter Counter, tlsConf *tls.Config) *device {
	t.Helper()
	dir := t.TempDir()
	d := &device{
		dir:           dir,
		stateDir:      filepath.Join(dir, "state"),
		slots:         &FileSlots{A: filepath.Join(dir, "slot-a"), B: filepath.Join(dir, "slot-b"), StatePath: filepath.Join(dir, "slots.json")},
		counter:       counter,
		rep:           &recorder{},
		sources:       Sources{TLS: tlsConf},
		hardware:      "hw-1",
		healthTimeout: 2 * time.Second,
	}
	if err := os.WriteFile(d.slots.A, []byte(oldFirmware), 0o755); err != nil {
		t.Fatal(err)
	}
	return d
}

// updater builds a new Updater on the device's directories: what a restarted agent does.
func (d *device) updater(t testing.TB, trust *TrustStore) *Updater {
	t.Helper()
	u, err := New(Config{
		StateDir:      d.stateDir,
		Hardware:      d.hardware,
		Trust:         trust,
		Counter:       d.counter,
		Installer:     d.slots,
		Reporter:      d.rep,
		OpenSource:    d.sources.Open,
		Restart:       func(context.Context) error { d.restarts.Add(1); return nil },
		HealthTimeout: d.healthTimeout,
	})
	if err != nil {
		t.Fatal(err)
	}
	return u
}

func (d *device) slotState(t testing.TB) SlotState {
	t.Helper()
	st, err := d.slots.State()
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func readFile(t testing.TB, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func counterValue(t testing.TB, c Counter) uint64 {
	t.Helper()
	v, err := c.Read(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func mustEqual[T comparable](t testing.TB, what string, got, want T) {
	t.Helper()
	if got != want {
		t.Fatalf("%s = %v, want %v", what, got, want)
	}
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
