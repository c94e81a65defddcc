package firmware

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// TestHTTPSConnectionDropResumes: the server drops the connection mid-body ("unexpected EOF");
// the downloader asks the same source again from where the stream stopped.
func TestHTTPSConnectionDropResumes(t *testing.T) {
	const size = 1 << 20
	rel := newRelease(t, AlgEd25519, size)
	srv := newImageServer(t, rel.image)
	srv.cutAfter = 300_000
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
	ranges := srv.Ranges()
	if len(ranges) != 2 {
		t.Fatalf("ranges %v, want 2 requests", ranges)
	}
	mustEqual(t, "bytes fetched", d.BytesFetched(), int64(size))
	mustEqual(t, "second range", ranges[1], fmt.Sprintf("bytes=%d-%d", srv.cutAfter, size-1))
}

// TestAgentKilledMidDownloadResumes runs the updater in a child process (this test binary),
// SIGKILLs it in the middle of an HTTPS download, then resumes in this process on the same
// state directory: the bytes persisted before the kill are re-hashed from disk, not fetched.
func TestAgentKilledMidDownloadResumes(t *testing.T) {
	if os.Getenv("FIRMWARE_CHILD_AGENT") == "1" {
		runChildAgent()
		return
	}
	const size = 4 << 20
	rel := newRelease(t, AlgEd25519, size)
	srv := newImageServer(t, rel.image)
	srv.delay = 4 * time.Millisecond // ≈ 0.5 s for the whole image: room to kill mid-stream
	job := rel.sign(t, rel.manifest(t, "2.0.0", srv.URL()))
	counter := FileCounter{Path: filepath.Join(t.TempDir(), "nv-counter")}
	d := newDevice(t, counter, srv.client)

	jobFile := filepath.Join(d.dir, "job.json")
	trustFile := filepath.Join(d.dir, "trust.pem")
	os.WriteFile(jobFile, job, 0o600)
	der, _ := x509.MarshalPKIXPublicKey(rel.key.Public())
	os.WriteFile(trustFile, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o644)

	cmd := exec.Command(os.Args[0], "-test.run=^TestAgentKilledMidDownloadResumes$", "-test.count=1")
	cmd.Env = append(os.Environ(), "FIRMWARE_CHILD_AGENT=1",
		"CHILD_DIR="+d.dir, "CHILD_COUNTER="+counter.Path, "CHILD_JOB="+jobFile, "CHILD_TRUST="+trustFile,
		"CHILD_CA="+srv.caFile, "CHILD_CERT="+srv.certFile, "CHILD_KEY="+srv.keyFile)
	out := &tailBuffer{max: 4096}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for srv.served.Load() < size*4/10 {
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("child agent did not download 40%% in 30s: %s", out)
		}
		time.Sleep(2 * time.Millisecond)
	}
	if err := cmd.Process.Kill(); err != nil { // SIGKILL: no chance to persist anything more
		t.Fatal(err)
	}
	werr := cmd.Wait()
	if ee, ok := werr.(*exec.ExitError); !ok || ee.ExitCode() != -1 {
		t.Fatalf("child was not killed mid-download (%v): %s", werr, out)
	}
	srv.waitIdle(t)
	servedBefore := srv.served.Load()

	var st downloadState
	data, err := os.ReadFile(filepath.Join(d.stateDir, downloadFile))
	if err != nil {
		t.Fatalf("no persisted progress after the kill: %v", err)
	}
	json.Unmarshal(data, &st)
	if st.Offset <= 0 || st.Offset >= size {
		t.Fatalf("persisted offset %d of %d", st.Offset, size)
	}

	// The agent starts again; the retained job is delivered again.
	u := d.updater(t, rel.trust)
	if err := u.HandleJob(context.Background(), job); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "bytes re-hashed from disk", u.BytesRehashed(), st.Offset)
	mustEqual(t, "bytes fetched after restart", u.BytesFetched(), size-st.Offset)
	mustEqual(t, "bytes the server sent after restart", srv.served.Load()-servedBefore, size-st.Offset)
	ranges := srv.Ranges()
	mustEqual(t, "resume range", ranges[len(ranges)-1], fmt.Sprintf("bytes=%d-%d", st.Offset, size-1))
	mustEqual(t, "installed image", readFile(t, d.slots.B), string(rel.image))
	t.Logf("killed after the server sent %d bytes; %d were persisted; resumed fetch %d bytes", servedBefore, st.Offset, u.BytesFetched())
}

// runChildAgent is the child side of TestAgentKilledMidDownloadResumes: an Updater configured
// like the parent's device, persisting every 64 KiB, handling the job until it is killed.
func runChildAgent() {
	fail := func(err error) {
		fmt.Fprintln(os.Stderr, "child agent:", err)
		os.Exit(2)
	}
	dir := os.Getenv("CHILD_DIR")
	trust, err := LoadTrustStore(os.Getenv("CHILD_TRUST"))
	if err != nil {
		fail(err)
	}
	job, err := os.ReadFile(os.Getenv("CHILD_JOB"))
	if err != nil {
		fail(err)
	}
	caPEM, err := os.ReadFile(os.Getenv("CHILD_CA"))
	if err != nil {
		fail(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	cert, err := tls.LoadX509KeyPair(os.Getenv("CHILD_CERT"), os.Getenv("CHILD_KEY"))
	if err != nil {
		fail(err)
	}
	u, err := New(Config{
		StateDir:     filepath.Join(dir, "state"),
		Hardware:     "hw-1",
		Trust:        trust,
		Counter:      FileCounter{Path: os.Getenv("CHILD_COUNTER")},
		Installer:    &FileSlots{A: filepath.Join(dir, "slot-a"), B: filepath.Join(dir, "slot-b"), StatePath: filepath.Join(dir, "slots.json")},
		OpenSource:   Sources{TLS: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13}}.Open,
		PersistEvery: 64 << 10,
	})
	if err != nil {
		fail(err)
	}
	err = u.HandleJob(context.Background(), job)
	fmt.Fprintln(os.Stderr, "child agent finished before it was killed:", err)
	os.Exit(3)
}
