package daemon

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tpmagent/tpmagent/agent/batch"
	"github.com/tpmagent/tpmagent/agent/config"
	"github.com/tpmagent/tpmagent/agent/identity"
	"github.com/tpmagent/tpmagent/agent/source"
	"github.com/tpmagent/tpmagent/agent/status"
	"github.com/tpmagent/tpmagent/fleet"
	"github.com/tpmagent/tpmagent/internal/testenv"
	"github.com/tpmagent/tpmagent/tpmkeys"
	"github.com/tpmagent/tpmagent/transport"
)

// renewLab is an enrolled device and its fleet: a swtpm with an EK
// certificate from a per-test manufacturer CA, a fleet CA (fleet.InitCA) that
// the broker trusts, a TLS mosquitto, the CA service (fleet.Service, served
// over MQTT once startCA runs), and the device's agent configuration with a
// certificate issued by the fleet CA for a key at tpm.key_handle.
type renewLab struct {
	t        *testing.T
	id       string
	caDir    string
	svc      *fleet.Service
	broker   *testenv.Mosquitto
	sw       *testenv.Swtpm
	cfg      *config.Config
	first    *x509.Certificate // the enrolment certificate
	firstPub crypto.PublicKey
	stopCA   func()
}

func newRenewLab(t *testing.T, validity time.Duration) *renewLab {
	t.Helper()
	testenv.NeedTool(t, "swtpm_setup", "swtpm-tools")
	localca := testenv.NeedTool(t, "swtpm_localca", "swtpm-tools")
	l := &renewLab{t: t, id: "dev-renew", caDir: t.TempDir(), stopCA: func() {}}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	// The "manufacturer": swtpm_setup --create-ek-cert with its own swtpm-localca.
	mdir := t.TempDir()
	mca := filepath.Join(mdir, "ca")
	if err := os.MkdirAll(mca, 0o755); err != nil {
		t.Fatal(err)
	}
	writeTestFile(t, filepath.Join(mdir, "localca.conf"), fmt.Sprintf("statedir = %s\nsigningkey = %s/signkey.pem\nissuercert = %s/issuercert.pem\ncertserial = %s/certserial\n", mca, mca, mca, mca))
	writeTestFile(t, filepath.Join(mdir, "localca.options"), "--platform-manufacturer tpmagent-test\n--platform-version 2.1\n--platform-model swtpm\n")
	writeTestFile(t, filepath.Join(mdir, "setup.conf"), fmt.Sprintf("create_certs_tool = %s\ncreate_certs_tool_config = %s/localca.conf\ncreate_certs_tool_options = %s/localca.options\nactive_pcr_banks = sha256\n", localca, mdir, mdir))
	l.sw = testenv.StartSwtpm(t)
	l.sw.Stop()
	if out, err := exec.Command("swtpm_setup", "--tpm2", "--create-ek-cert", "--overwrite", "--tpmstate", l.sw.StateDir(),
		"--config", filepath.Join(mdir, "setup.conf"), "--logfile", filepath.Join(mdir, "setup.log")).CombinedOutput(); err != nil {
		log, _ := os.ReadFile(filepath.Join(mdir, "setup.log"))
		t.Fatalf("swtpm_setup: %v\n%s\n%s", err, out, log)
	}
	l.sw.Restart()
	manufacturers, err := fleet.CertPoolFromFiles(filepath.Join(mca, "swtpm-localca-rootca-cert.pem"), filepath.Join(mca, "issuercert.pem"))
	if err != nil {
		t.Fatal(err)
	}

	// The fleet CA, its service and the broker.
	if _, err := fleet.InitCA(l.caDir, "renewal test fleet CA", []string{"localhost", "127.0.0.1"}); err != nil {
		t.Fatal(err)
	}
	signer, err := fleet.LoadFileSigner(filepath.Join(l.caDir, fleet.CACertFile), filepath.Join(l.caDir, fleet.CAKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	l.svc = &fleet.Service{CA: &fleet.CA{Signer: signer, Validity: validity}, Manufacturers: manufacturers}
	l.broker = testenv.StartMosquitto(t, testenv.MosquittoOptions{PKI: &testenv.PKI{Dir: l.caDir, CAFile: filepath.Join(l.caDir, fleet.CACertFile),
		ServerCertFile: filepath.Join(l.caDir, fleet.BrokerCertFile), ServerKeyFile: filepath.Join(l.caDir, fleet.BrokerKeyFile)}})

	// Enrolment: the device key at tpm.key_handle, certified by the fleet CA.
	dir := t.TempDir()
	cfg, err := config.Load("", false, nil)
	if err != nil {
		t.Fatal(err)
	}
	cfg.DeviceID = l.id
	cfg.StateDir = filepath.Join(dir, "state")
	cfg.TPM.Device = l.sw.URL()
	cfg.Broker.URLs = []string{l.broker.URL()}
	cfg.Broker.CAFile = filepath.Join(l.caDir, fleet.CACertFile)
	cfg.Broker.CertFile = filepath.Join(dir, "device.pem")
	cfg.Broker.BackoffBase = 100 * time.Millisecond
	cfg.Broker.BackoffMax = time.Second
	cfg.Telemetry.Socket = filepath.Join(dir, "telemetry.sock")
	cfg.Telemetry.QoS = 1
	cfg.Status.Socket = filepath.Join(dir, "status.sock")
	cfg.Spool.Dir = filepath.Join(dir, "spool")
	cfg.Metrics.Listen = ""
	l.cfg = cfg
	tp, err := tpmkeys.Open(ctx, l.sw.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Close()
	spec := tpmkeys.KeySpec{Handle: uint32(cfg.TPM.KeyHandle), SRKHandle: uint32(cfg.TPM.SRKHandle), Type: cfg.TPM.KeyType}
	if _, err := tp.CreateKey(ctx, spec, false); err != nil {
		t.Fatal(err)
	}
	k, err := tp.OpenKey(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	certPEM, cert, err := fleet.Enrol(ctx, &fleet.KeyAttester{TPM: tp, Key: k, DeviceID: l.id}, fleet.LocalRequester{Service: l.svc})
	if err != nil {
		t.Fatalf("enrol: %v", err)
	}
	writeTestFile(t, cfg.Broker.CertFile, string(certPEM))
	l.first, l.firstPub = cert, k.Public()
	return l
}

func writeTestFile(t *testing.T, path, s string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
}

// startCA serves the CA service over MQTT (like `tpmagent fleet ca serve`).
func (l *renewLab) startCA() {
	t := l.t
	t.Helper()
	pair, err := tls.LoadX509KeyPair(filepath.Join(l.caDir, fleet.ServiceCertFile), filepath.Join(l.caDir, fleet.ServiceKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	pool, _ := fleet.CertPoolFromFiles(filepath.Join(l.caDir, fleet.CACertFile))
	ctx, stop := context.WithCancel(context.Background())
	ready := make(chan struct{}, 1)
	served := make(chan error, 1)
	go func() {
		served <- l.svc.Serve(ctx, fleet.ServeOptions{BrokerURL: l.broker.URL(), Ready: ready,
			TLS: &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: pool, Certificates: []tls.Certificate{pair}}})
	}()
	select {
	case <-ready:
	case err := <-served:
		t.Fatalf("CA service: %v", err)
	case <-time.After(20 * time.Second):
		t.Fatal("CA service did not subscribe")
	}
	l.stopCA = func() { stop(); <-served }
	t.Cleanup(func() { l.stopCA() })
}

// seqSubscriber counts the distinct reading values (sequence numbers) that
// arrive on the device's telemetry topic.
type seqSubscriber struct {
	mu   sync.Mutex
	seen map[int64]int
	msgs int
}

func (l *renewLab) subscribe() *seqSubscriber {
	t := l.t
	t.Helper()
	ca, _ := fleet.LoadFileSigner(filepath.Join(l.caDir, fleet.CACertFile), filepath.Join(l.caDir, fleet.CAKeyFile))
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := (&fleet.CA{Signer: ca}).IssueFor("subscriber", key.Public(), x509.ExtKeyUsageClientAuth, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	pool, _ := fleet.CertPoolFromFiles(filepath.Join(l.caDir, fleet.CACertFile))
	tlsCfg := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{{Certificate: [][]byte{cert.Raw}, PrivateKey: key, Leaf: cert}}}
	s := &seqSubscriber{seen: map[int64]int{}}
	// A persistent session: the broker queues for it while it reconnects.
	startSubscriber(t, l.broker.URL(), tlsCfg, false, "devices/"+l.id+"/telemetry", func(m transport.Message) {
		rs, err := batch.Decode(m.Payload)
		s.mu.Lock()
		defer s.mu.Unlock()
		s.msgs++
		if err == nil {
			for _, r := range rs {
				s.seen[int64(r.Value)]++
			}
		}
	})
	return s
}

// missing returns how many of 0..n-1 never arrived, and the first of them.
func (s *seqSubscriber) missing(n int) (int, int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	miss, first := 0, -1
	for i := 0; i < n; i++ {
		if s.seen[int64(i)] == 0 {
			if first < 0 {
				first = i
			}
			miss++
		}
	}
	return miss, first
}

func (s *seqSubscriber) distinct() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.seen)
}

// sender writes readings 0, 1, 2, … to the telemetry socket at rate per
// second until stop; wait returns how many were sent and accepted.
type sender struct {
	stop chan struct{}
	done chan struct{}
	sent int
	ok   int
	err  error
}

func startSender(t *testing.T, socket string, rate int) *sender {
	t.Helper()
	s := &sender{stop: make(chan struct{}), done: make(chan struct{})}
	pr, pw := io.Pipe()
	res := make(chan struct{})
	go func() {
		defer close(res)
		ok, rejected, err := source.Send(context.Background(), socket, pr, nil)
		s.ok = ok
		if err == nil && rejected > 0 {
			err = fmt.Errorf("%d readings rejected", rejected)
		}
		s.err = err
		// Fail the writer's next write instead of blocking it forever when
		// Send ends early (connection refused or broken).
		pr.CloseWithError(fmt.Errorf("sender: Send returned early: %v", err))
	}()
	go func() {
		defer close(s.done)
		const tick = 10 * time.Millisecond
		per := rate / int(time.Second/tick)
		tk := time.NewTicker(tick)
		defer tk.Stop()
		start := time.Now()
		for {
			select {
			case <-s.stop:
				pw.Close()
				<-res
				return
			case now := <-tk.C:
				// Catch up after a late tick so that the average rate holds.
				want := int(now.Sub(start)/tick) * per
				var b bytes.Buffer
				for ; s.sent < want; s.sent++ {
					fmt.Fprintf(&b, "{\"name\":\"seq\",\"value\":%d}\n", s.sent)
				}
				if _, err := pw.Write(b.Bytes()); err != nil {
					<-res
					if s.err == nil {
						s.err = err
					}
					return
				}
			}
		}
	}()
	return s
}

func (s *sender) wait(t *testing.T) int {
	t.Helper()
	close(s.stop)
	<-s.done
	if s.err != nil || s.ok != s.sent {
		t.Fatalf("sender: %d sent, %d accepted: %v", s.sent, s.ok, s.err)
	}
	return s.sent
}

// lockedBuffer collects the agent's log.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// runAgent starts the daemon; the returned func stops it and waits.
func (l *renewLab) runAgent() (stop func(), log *lockedBuffer) {
	t := l.t
	t.Helper()
	log = &lockedBuffer{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, Options{Config: l.cfg, Logger: slog.New(slog.NewTextHandler(log, nil)), Notifier: nil})
	}()
	waitSocket(t, l.cfg.Telemetry.Socket)
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("run: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Error("run did not stop after cancel")
		}
	}
	t.Cleanup(func() {
		stop()
		if t.Failed() {
			t.Logf("agent log:\n%s", log.String())
		}
	})
	return stop, log
}

func (l *renewLab) renewalStatus() RenewalStatus {
	st, err := ReadRenewalStatus(l.cfg)
	if err != nil {
		l.t.Fatal(err)
	}
	if st == nil {
		return RenewalStatus{}
	}
	return *st
}

// quietStatus waits until no renewal runs or is about to start (so that the
// agent can be stopped with that status on disk) and returns the status.
func (l *renewLab) quietStatus() RenewalStatus {
	deadline := time.Now().Add(30 * time.Second)
	for {
		st := l.renewalStatus()
		if st.State != RenewalRunning && time.Until(st.NextAttempt) > 3*time.Second {
			return st
		}
		if time.Now().After(deadline) {
			l.t.Fatalf("renewal never quiet: %+v", st)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (l *renewLab) agentStatus() status.Snapshot {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := status.Fetch(ctx, l.cfg.Status.Socket)
	if err != nil {
		l.t.Fatal(err)
	}
	return s
}

// waitAll waits until the subscriber has every reading 0..n-1.
func waitAll(t *testing.T, sub *seqSubscriber, n int, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		miss, first := sub.missing(n)
		if miss == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d readings never arrived (first missing: %d)", miss, n, first)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// tpmKeys opens the device's TPM (the agent must be stopped: swtpm serves one
// client) and returns the public keys at tpm.key_handle and
// enrol.renew_handle (nil when empty).
func (l *renewLab) tpmKeys() map[uint32]crypto.PublicKey {
	t := l.t
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tp, err := tpmkeys.Open(ctx, l.sw.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Close()
	out := map[uint32]crypto.PublicKey{}
	for _, h := range []uint32{uint32(l.cfg.TPM.KeyHandle), uint32(l.cfg.Enrol.RenewHandle)} {
		present, err := tp.KeyPresent(ctx, h)
		if err != nil {
			t.Fatal(err)
		}
		out[h] = nil
		if present {
			k, err := tp.LoadKey(ctx, h, uint32(l.cfg.TPM.SRKHandle))
			if err != nil {
				t.Fatal(err)
			}
			out[h] = k.Public()
			k.Close()
		}
	}
	return out
}

func certFileLeaf(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatalf("%s: no PEM", path)
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func samePub(a, b crypto.PublicKey) bool {
	k, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && b != nil && k.Equal(b)
}

// TestRenewalWhilePublishing: certificates of 60 s lifetime (as the fleet CA
// issues them: valid until 60 s after issue). The agent publishes 1,000
// readings/s while it renews at 2/3 of the lifetime, before expiry, over
// MQTT through the CA service; it keeps going past the expiry of the
// enrolment certificate. Every reading arrives; each renewal costs exactly
// one reconnect, made with a full handshake signed by the new key; the
// certificate file and identity.json name the new key; the old key is gone
// from the TPM.
func TestRenewalWhilePublishing(t *testing.T) {
	l := newRenewLab(t, 60*time.Second)
	l.startCA()
	sub := l.subscribe()
	stop, log := l.runAgent()
	snd := startSender(t, l.cfg.Telemetry.Socket, 1000)

	var firstRenewalSeen time.Time
	deadline := l.first.NotAfter.Add(3 * time.Second)
	for time.Now().Before(deadline) {
		st := l.renewalStatus()
		if st.Renewals > 0 && firstRenewalSeen.IsZero() {
			firstRenewalSeen = time.Now()
			t.Logf("first renewal at %s (enrolment certificate: not_before %s, not_after %s, %.0f s before expiry): %+v",
				st.LastRenewal.Format(time.TimeOnly), l.first.NotBefore.Format(time.TimeOnly), l.first.NotAfter.Format(time.TimeOnly),
				l.first.NotAfter.Sub(st.LastRenewal).Seconds(), st)
		}
		time.Sleep(200 * time.Millisecond)
	}
	n := snd.wait(t)
	waitAll(t, sub, n, 30*time.Second)
	st := l.quietStatus()
	snap := l.agentStatus()
	t.Logf("%d readings sent at 1000/s over %.0f s, all %d received; renewals %d, reconnects %d, TPM signatures %d; status %+v",
		n, float64(n)/1000, sub.distinct(), st.Renewals, snap.Reconnects, snap.TPMSignatures, st)

	if firstRenewalSeen.IsZero() || st.Renewals == 0 {
		t.Fatalf("no renewal before the enrolment certificate expired (%s); status %+v", l.first.NotAfter, st)
	}
	// 2/3 of the lifetime ± 5 %, before expiry.
	life := l.first.NotAfter.Sub(l.first.NotBefore)
	if earliest := l.first.NotBefore.Add(life * 2 / 3).Add(-life / 20).Add(-time.Second); firstRenewalSeen.Before(earliest) || !firstRenewalSeen.Before(l.first.NotAfter) {
		t.Fatalf("first renewal seen at %s, want between %s and the expiry %s", firstRenewalSeen, earliest, l.first.NotAfter)
	}
	if st.Failures != 0 || st.Attempts != st.Renewals || !st.Reconnected {
		t.Fatalf("renewal status %+v: want every attempt to renew and reconnect with the new key", st)
	}
	if snap.Reconnects != st.Renewals {
		t.Fatalf("%d reconnects for %d renewals: want exactly one per renewal", snap.Reconnects, st.Renewals)
	}
	if got := strings.Count(l.broker.LogText(), "as "+l.id+"-renewal-proof "); got != int(st.Renewals) {
		t.Errorf("broker log shows %d proving handshakes for %d renewals", got, st.Renewals)
	}
	if !strings.Contains(log.String(), "renewal: reconnected with the new key (full handshake)") {
		t.Error("agent log does not show the reconnect with the new key")
	}
	stop()

	// On disk and in the TPM.
	leaf := certFileLeaf(t, l.cfg.Broker.CertFile)
	if leaf.SerialNumber.Text(16) != st.CertSerial || leaf.SerialNumber.Cmp(l.first.SerialNumber) == 0 {
		t.Fatalf("broker.cert_file serial %x, status %s, enrolment %x", leaf.SerialNumber, st.CertSerial, l.first.SerialNumber)
	}
	if prev := certFileLeaf(t, l.cfg.Broker.CertFile+".prev"); prev.SerialNumber.Text(16) != st.PreviousSerial {
		t.Fatalf("%s.prev holds serial %x, want the previous certificate %s", l.cfg.Broker.CertFile, prev.SerialNumber, st.PreviousSerial)
	}
	ist, err := identity.ReadState(l.cfg)
	if err != nil || ist == nil || ist.KeyHandle != st.KeyHandle || ist.CertSerial != st.CertSerial {
		t.Fatalf("identity.json %+v (%v), renewal status %+v", ist, err, st)
	}
	active, _ := config.ParseHandle(st.KeyHandle)
	other := identity.OtherKeyHandle(l.cfg, uint32(active))
	keys := l.tpmKeys()
	if !samePub(leaf.PublicKey, keys[uint32(active)]) {
		t.Fatalf("the key at %s is not the one broker.cert_file certifies", st.KeyHandle)
	}
	if keys[other] != nil {
		t.Fatalf("the old key at 0x%x is still in the TPM", other)
	}
	for h, pub := range keys {
		if samePub(l.firstPub, pub) {
			t.Fatalf("the enrolment key is still in the TPM at 0x%x", h)
		}
	}
	// A restart finds the renewed identity.
	id, err := identity.Open(context.Background(), l.cfg, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	if id.Key.Handle() != uint32(active) {
		t.Errorf("identity.Open after renewal: handle 0x%x, want %s", id.Key.Handle(), st.KeyHandle)
	}
	id.Close()
}

// TestRenewalCADown: the fleet CA service is down when renewal is due. The
// agent keeps its key and certificate and keeps publishing (no reading lost,
// no reconnect) while it retries with backoff; once the service is up, a
// `tpmagent cert renew` request (state_dir/renew.request) renews at once.
func TestRenewalCADown(t *testing.T) {
	l := newRenewLab(t, 45*time.Second) // renewal due 10 s ± 5 s after enrolment
	sub := l.subscribe()
	stop, _ := l.runAgent()
	snd := startSender(t, l.cfg.Telemetry.Socket, 1000)

	const wantFailures = 3
	deadline := time.Now().Add(40 * time.Second)
	var st RenewalStatus
	for st = l.renewalStatus(); st.Failures < wantFailures; st = l.renewalStatus() {
		if time.Now().After(deadline) {
			t.Fatalf("only %d failed attempts; status %+v", st.Failures, st)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("CA down: %+v", st)
	if st.State != RenewalRetrying || st.Renewals != 0 || !strings.Contains(st.LastError, "fleet ca serve") || st.Attempts < wantFailures {
		t.Fatalf("status while the CA is down: %+v", st)
	}
	if !st.NextAttempt.After(st.LastErrorAt) {
		t.Fatalf("next attempt %s not after the last failure %s", st.NextAttempt, st.LastErrorAt)
	}
	if leaf := certFileLeaf(t, l.cfg.Broker.CertFile); leaf.SerialNumber.Cmp(l.first.SerialNumber) != 0 {
		t.Fatal("a failed renewal replaced broker.cert_file")
	}
	if ist, _ := identity.ReadState(l.cfg); ist != nil {
		t.Fatalf("a failed renewal wrote identity.json: %+v", ist)
	}
	snap := l.agentStatus()
	if snap.Reconnects != 0 || !snap.Connected || !strings.Contains(snap.LastError, "certificate renewal") {
		t.Fatalf("agent status while the CA is down: %+v", snap)
	}
	mid := snd.sent
	waitAll(t, sub, mid-2000, 20*time.Second) // publishing goes on with the old identity

	// The CA comes back; a forced renewal goes through now.
	l.startCA()
	req, err := RequestRenewal(l.cfg)
	if err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(30 * time.Second)
	for st = l.renewalStatus(); st.LastRequest != req; st = l.renewalStatus() {
		if time.Now().After(deadline) {
			t.Fatalf("request %s not handled; status %+v", req, st)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if st.LastRequestResult != "ok" || st.Renewals == 0 || st.State != RenewalScheduled || st.LastError != "" {
		t.Fatalf("after the forced renewal: %+v", st)
	}
	if !time.Now().Before(l.first.NotAfter) {
		t.Fatalf("renewed only after the enrolment certificate expired (%s)", l.first.NotAfter)
	}
	n := snd.wait(t)
	waitAll(t, sub, n, 30*time.Second)
	st = l.quietStatus()
	snap = l.agentStatus()
	if snap.Reconnects != st.Renewals {
		t.Fatalf("%d reconnects for %d renewals", snap.Reconnects, st.Renewals)
	}
	t.Logf("%d readings, all received; after the CA came back: %+v", n, st)
	stop()

	// Failed attempts left no key behind; the successful one evicted the old key.
	keys := l.tpmKeys()
	active, _ := config.ParseHandle(st.KeyHandle)
	if keys[uint32(active)] == nil || keys[identity.OtherKeyHandle(l.cfg, uint32(active))] != nil {
		t.Fatalf("TPM keys after recovery: %v (active %s)", keys, st.KeyHandle)
	}
}

// TestRenewRefusedByBrokerKeepsIdentity: a certificate the broker does not
// accept (issued by a CA it does not trust) fails the proving handshake;
// Renew evicts the new key and leaves broker.cert_file and identity.json
// untouched.
func TestRenewRefusedByBrokerKeepsIdentity(t *testing.T) {
	l := newRenewLab(t, time.Hour)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	rogueDir := t.TempDir()
	if _, err := fleet.InitCA(rogueDir, "rogue CA", []string{"localhost"}); err != nil {
		t.Fatal(err)
	}
	rogueSigner, err := fleet.LoadFileSigner(filepath.Join(rogueDir, fleet.CACertFile), filepath.Join(rogueDir, fleet.CAKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	rogue := &fleet.Service{CA: &fleet.CA{Signer: rogueSigner}, Manufacturers: l.svc.Manufacturers}

	id, err := identity.Open(ctx, l.cfg, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer id.Close()
	cur, err := transport.NewTLSConfig(transport.TLSOptions{Signer: id.Signer, CertFile: l.cfg.Broker.CertFile, CAFile: l.cfg.Broker.CAFile})
	if err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(l.cfg.Broker.CertFile)
	_, err = Renew(ctx, RenewOptions{Config: l.cfg, TPM: id.TPM, CurrentHandle: id.Key.Handle(), Current: cur, Requester: fleet.LocalRequester{Service: rogue}})
	if err == nil || !strings.Contains(err.Error(), "did not accept the new key") {
		t.Fatalf("Renew with a certificate the broker does not trust: %v", err)
	}
	t.Logf("refused: %v", err)
	after, _ := os.ReadFile(l.cfg.Broker.CertFile)
	if !bytes.Equal(before, after) {
		t.Fatal("broker.cert_file changed")
	}
	if st, _ := identity.ReadState(l.cfg); st != nil {
		t.Fatalf("identity.json written: %+v", st)
	}
	if ok, _ := id.TPM.KeyPresent(ctx, uint32(l.cfg.Enrol.RenewHandle)); ok {
		t.Fatal("the new key stayed in the TPM")
	}
	if ok, _ := id.TPM.KeyPresent(ctx, uint32(l.cfg.TPM.KeyHandle)); !ok {
		t.Fatal("the current key is gone")
	}
	if _, err := os.Stat(l.cfg.Broker.CertFile + ".new"); err == nil {
		t.Fatal("the temporary certificate file was left behind")
	}
}

func TestRetryDelayAndTimeout(t *testing.T) {
	now := time.Now()
	mk := func(life, left time.Duration) *x509.Certificate {
		return &x509.Certificate{NotBefore: now.Add(left - life), NotAfter: now.Add(left)}
	}
	tests := []struct {
		name       string
		cert       *x509.Certificate
		n          int
		lo, hi     time.Duration
		reqTimeout time.Duration
	}{
		{"60 s certificate, first failure", mk(120*time.Second, 40*time.Second), 1, 500 * time.Millisecond, time.Second, 6 * time.Second},
		{"60 s certificate, capped at a quarter of what is left", mk(120*time.Second, 40*time.Second), 8, 5 * time.Second, 10 * time.Second, 6 * time.Second},
		{"one year, first failure", mk(365*24*time.Hour, 120*24*time.Hour), 1, 150 * time.Second, 5 * time.Minute, 30 * time.Second},
		{"one year, many failures: at most 6 h", mk(365*24*time.Hour, 120*24*time.Hour), 40, 3 * time.Hour, 6 * time.Hour, 30 * time.Second},
		{"expired: the base", mk(120*time.Second, -time.Minute), 5, 500 * time.Millisecond, time.Second, 6 * time.Second},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			for i := 0; i < 100; i++ {
				if d := retryDelay(tc.cert, now, tc.n); d < tc.lo || d > tc.hi {
					t.Fatalf("retryDelay = %v, want within [%v, %v]", d, tc.lo, tc.hi)
				}
			}
			if got := requestTimeout(tc.cert); got != tc.reqTimeout {
				t.Fatalf("requestTimeout = %v, want %v", got, tc.reqTimeout)
			}
		})
	}
}
