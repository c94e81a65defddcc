package daemon

// Certificate renewal in `tpmagent run`.
//
// When: at 2/3 of the certificate's lifetime, moved by ±5% of the lifetime at
// random (fleet.RenewAt with jitter 0.1) so that a fleet enrolled together
// does not come back together. How, in order (Renew, then the daemon's
// switch):
//
//  1. fleet.PrepareRenewal creates a new key at the other handle of the pair
//     (tpm.key_handle, enrol.renew_handle) and gets it attested and certified
//     by `tpmagent fleet ca serve` over MQTT, connecting with the current
//     identity;
//  2. the new pair proves itself: a full TLS handshake and MQTT CONNECT to
//     the broker with the new key and certificate (transport.Handshake);
//  3. the switch on disk: broker.cert_file is copied to broker.cert_file.prev,
//     state_dir/identity.json names the new handle, the new certificate
//     replaces broker.cert_file (each write: temporary file, fsync, rename);
//     identity.Open finds the right key after a crash between those writes;
//  4. in memory: TLSIdentity.Rotate swaps key and certificate together and
//     empties the session cache; Client.Redial reconnects once (clean
//     DISCONNECT, full handshake with the new key; unacknowledged telemetry
//     is resent from the spool, so no reading is lost);
//  5. the old key is evicted from the TPM.
//
// A failure in steps 1–3 evicts the new key and leaves the old key,
// certificate and state as they were; the attempt is retried with
// exponential backoff (1 s up to a quarter of the remaining validity, at
// most 6 h, scaled to the lifetime). The renewal state is written to
// state_dir/renewal.json (RenewalStatus; `tpmagent cert status` prints it)
// and logged. `tpmagent cert renew` forces an attempt: it drops
// state_dir/renew.request, which the loop picks up within half a second.

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/tpmagent/tpmagent/internal/atomicfile"

	"github.com/tpmagent/tpmagent/agent/config"
	"github.com/tpmagent/tpmagent/agent/identity"
	"github.com/tpmagent/tpmagent/agent/status"
	"github.com/tpmagent/tpmagent/fleet"
	"github.com/tpmagent/tpmagent/tpmkeys"
	"github.com/tpmagent/tpmagent/transport"
)

// Files in state_dir used by renewal.
const (
	// RenewalStatusFile holds the RenewalStatus of the running agent.
	RenewalStatusFile = "renewal.json"
	// RenewalRequestFile, when it appears, makes the running agent renew now.
	RenewalRequestFile = "renew.request"
)

// RenewJitter is the jitter given to fleet.RenewAt: renewal starts at 2/3 of
// the lifetime ±5% of the lifetime.
const RenewJitter = 0.1

// Renewal states in RenewalStatus.State.
const (
	RenewalScheduled = "scheduled" // waiting for RenewAt
	RenewalRunning   = "renewing"  // an attempt is under way
	RenewalRetrying  = "retrying"  // the last attempt failed; next at NextAttempt
	RenewalDisabled  = "disabled"  // no TPM key, or no renew handle
	RenewalStopped   = "stopped"   // the agent stopped
)

// RenewalStatus is the certificate renewal's part of the agent's status. The
// running agent keeps it in state_dir/renewal.json.
type RenewalStatus struct {
	State string `json:"state"`
	// KeyHandle holds the device key in use; CertSerial (hex) and
	// CertNotAfter describe its certificate.
	KeyHandle    string    `json:"key_handle"`
	CertSerial   string    `json:"cert_serial"`
	CertNotAfter time.Time `json:"cert_not_after"`
	// RenewAt is when the current certificate is due for renewal;
	// NextAttempt when the next attempt starts (after failures: the backoff).
	RenewAt     time.Time `json:"renew_at"`
	NextAttempt time.Time `json:"next_attempt,omitzero"`
	// Attempts, Failures and Renewals count in this agent process.
	Attempts uint64 `json:"attempts"`
	Failures uint64 `json:"failures"`
	Renewals uint64 `json:"renewals"`
	// LastError is the last failed attempt's error (cleared by a success).
	LastError   string    `json:"last_error,omitempty"`
	LastErrorAt time.Time `json:"last_error_at,omitzero"`
	// LastRenewal is when the last renewal switched keys; PreviousSerial
	// was the certificate before it; Reconnected says the broker connection
	// was made again with the new key (a full handshake, not resumed).
	LastRenewal    time.Time `json:"last_renewal,omitzero"`
	PreviousSerial string    `json:"previous_serial,omitempty"`
	Reconnected    bool      `json:"reconnected_with_new_key"`
	// LastRequest is the id of the last `tpmagent cert renew` request
	// handled, LastRequestResult "ok" or its error.
	LastRequest       string `json:"last_request,omitempty"`
	LastRequestResult string `json:"last_request_result,omitempty"`
	// PID is the agent's process id (`cert renew` must not renew behind the
	// back of a running agent).
	PID       int       `json:"pid"`
	UpdatedAt time.Time `json:"updated_at"`
}

// AgentAlive reports whether the agent that wrote st may still be running:
// its loop has not stopped and its process exists.
func (st *RenewalStatus) AgentAlive() bool {
	if st == nil || st.State == RenewalStopped || st.PID <= 0 {
		return false
	}
	p, err := os.FindProcess(st.PID)
	return err == nil && p.Signal(syscall.Signal(0)) == nil
}

// RenewalStatusPath returns state_dir/renewal.json.
func RenewalStatusPath(cfg *config.Config) string {
	return filepath.Join(cfg.StateDir, RenewalStatusFile)
}

// ReadRenewalStatus reads state_dir/renewal.json; (nil, nil) when the agent
// has not written one.
func ReadRenewalStatus(cfg *config.Config) (*RenewalStatus, error) {
	b, err := os.ReadFile(RenewalStatusPath(cfg))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("renewal status: %w", err)
	}
	var st RenewalStatus
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("renewal status %s: %w", RenewalStatusPath(cfg), err)
	}
	return &st, nil
}

// RequestRenewal asks the running agent to renew now: it writes
// state_dir/renew.request holding a fresh id and returns the id, which
// RenewalStatus.LastRequest shows once the attempt is over.
func RequestRenewal(cfg *config.Config) (string, error) {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	id := hex.EncodeToString(b)
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return "", fmt.Errorf("renewal request: state_dir %s: %w", cfg.StateDir, err)
	}
	if err := atomicfile.Write(filepath.Join(cfg.StateDir, RenewalRequestFile), []byte(id+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("renewal request: %w", err)
	}
	return id, nil
}

// RenewOptions describe one renewal (Renew).
type RenewOptions struct {
	Config *config.Config
	// TPM holds the current key at CurrentHandle; the new key is made at the
	// other handle of the pair (identity.OtherKeyHandle).
	TPM           *tpmkeys.TPM
	CurrentHandle uint32
	// Current is the TLS identity in use: it authenticates the requests to
	// the CA service on the broker.
	Current *transport.TLSIdentity
	// Requester replaces the MQTT requester (tests, other transports).
	Requester fleet.CertRequester
	// RequestTimeout bounds each answer of the CA service (default: 1/20 of
	// the current certificate's lifetime, 3–30 s).
	RequestTimeout time.Duration
	Logger         *slog.Logger
}

// Renewed is a renewal switched to on disk (broker.cert_file and
// state_dir/identity.json name the new key). The old key is still in the TPM:
// drop it with DropOldKey once nothing uses it.
type Renewed struct {
	// Key is the new device key (open), Cert its certificate.
	Key  *tpmkeys.Key
	Cert *x509.Certificate
	// OldHandle held the previous key; NewHandle holds Key.
	OldHandle, NewHandle uint32
	// OldSerial is the previous certificate's serial (hex).
	OldSerial string
	// Proof is the handshake that proved the new pair to the broker.
	Proof *transport.HandshakeTrace

	cfg      *config.Config
	tpm      *tpmkeys.TPM
	certPEM  []byte
	oldCert  []byte // broker.cert_file before the switch
	oldState *identity.State
}

// Renew renews the device certificate up to the switch on disk: a new key at
// the other handle, attested and certified by the fleet CA service, proven
// in a handshake with the broker, then broker.cert_file (the old one kept as
// .prev) and state_dir/identity.json switched to it. On error the new key is
// evicted and the old identity is untouched. The caller switches its
// in-memory identity to Renewed.Key and then calls DropOldKey.
func Renew(ctx context.Context, o RenewOptions) (*Renewed, error) {
	cfg, log := o.Config, o.Logger
	if log == nil {
		log = slog.Default()
	}
	if cfg.DeviceID == "" {
		return nil, errors.New("renew: device_id is not set")
	}
	newHandle := identity.OtherKeyHandle(cfg, o.CurrentHandle)
	if newHandle == 0 {
		return nil, fmt.Errorf("renew: enrol.renew_handle (%s) is not set or equals tpm.key_handle: set it to a free persistent handle such as 0x81000101", cfg.Enrol.RenewHandle)
	}
	if o.RequestTimeout <= 0 {
		o.RequestTimeout = requestTimeout(o.Current.Leaf())
	}
	req := o.Requester
	if req == nil {
		mr, err := dialRequester(ctx, cfg, o.Current, o.RequestTimeout)
		if err != nil {
			return nil, err
		}
		defer mr.Close()
		req = mr
	}
	ren, err := fleet.PrepareRenewal(ctx, fleet.RenewOptions{
		TPM: o.TPM, DeviceID: cfg.DeviceID, Requester: req,
		Spec: tpmkeys.KeySpec{Handle: newHandle, SRKHandle: uint32(cfg.TPM.SRKHandle), Type: cfg.TPM.KeyType},
	})
	if err != nil {
		return nil, fmt.Errorf("renew: %w", err)
	}
	r := &Renewed{Key: ren.Key, Cert: ren.Cert, certPEM: ren.CertPEM, OldHandle: o.CurrentHandle, NewHandle: newHandle,
		OldSerial: o.Current.Leaf().SerialNumber.Text(16), cfg: cfg, tpm: o.TPM}
	log.Info("renewal: new key certified", "handle", hexHandle(newHandle), "serial", r.Cert.SerialNumber.Text(16), "not_after", r.Cert.NotAfter)
	if err := r.prove(ctx, log); err != nil {
		r.discard(ctx)
		return nil, err
	}
	if err := r.commit(); err != nil {
		r.discard(ctx)
		return nil, err
	}
	return r, nil
}

// dialRequester connects the MQTT requester to the first broker that
// answers, with the current identity.
func dialRequester(ctx context.Context, cfg *config.Config, cur *transport.TLSIdentity, timeout time.Duration) (*fleet.MQTTRequester, error) {
	var errs []error
	for _, u := range cfg.Broker.URLs {
		_, _, host, err := transport.ParseBrokerURL(u, cfg.Broker.AllowPlaintext)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		r, err := fleet.NewMQTTRequester(ctx, fleet.MQTTRequesterOptions{BrokerURL: u, TLS: cur.ConfigFor(host),
			DeviceID: cfg.DeviceID, ClientID: cfg.DeviceID + "-renewal", Timeout: timeout})
		if err == nil {
			return r, nil
		}
		errs = append(errs, err)
		if ctx.Err() != nil {
			break
		}
	}
	return nil, fmt.Errorf("renew: no broker reachable for the CA service request: %w", errors.Join(errs...))
}

// prove makes a full handshake and MQTT CONNECT with the new pair.
func (r *Renewed) prove(ctx context.Context, log *slog.Logger) error {
	cfg := r.cfg
	tmp := cfg.Broker.CertFile + ".new"
	if err := atomicfile.Write(tmp, r.certPEM, 0o644); err != nil {
		return fmt.Errorf("renew: %w", err)
	}
	defer os.Remove(tmp)
	tid, err := transport.NewTLSConfig(transport.TLSOptions{Signer: r.Key, CertFile: tmp, CAFile: cfg.Broker.CAFile,
		ServerName: cfg.Broker.ServerName, MinTLS: cfg.Broker.MinTLS, Logger: log})
	if err != nil {
		return fmt.Errorf("renew: the issued certificate does not fit the new key: %w", err)
	}
	var errs []error
	for _, u := range cfg.Broker.URLs {
		scheme, hostport, _, err := transport.ParseBrokerURL(u, cfg.Broker.AllowPlaintext)
		if err != nil || scheme == "tcp" || scheme == "mqtt" {
			continue // a plaintext URL cannot prove a TLS identity
		}
		tr, err := transport.Handshake(ctx, hostport, tid, transport.HandshakeOptions{ClientID: cfg.DeviceID + "-renewal-proof", Timeout: 15 * time.Second})
		if err == nil {
			r.Proof = tr
			log.Info("renewal: new key and certificate accepted by the broker", "broker", hostport, "tls", tr.Version, "resumed", tr.Resumed)
			return nil
		}
		errs = append(errs, err)
	}
	if len(errs) == 0 {
		return errors.New("renew: broker.urls has no TLS URL to prove the new certificate on")
	}
	return fmt.Errorf("renew: the broker did not accept the new key and certificate (kept the old ones): %w", errors.Join(errs...))
}

// commit switches broker.cert_file and state_dir/identity.json to the new key.
func (r *Renewed) commit() error {
	cfg := r.cfg
	old, err := os.ReadFile(cfg.Broker.CertFile)
	if err != nil {
		return fmt.Errorf("renew: broker.cert_file %s: %w", cfg.Broker.CertFile, err)
	}
	r.oldCert = old
	if err := atomicfile.Write(cfg.Broker.CertFile+".prev", old, 0o644); err != nil {
		return fmt.Errorf("renew: keep the old certificate: %w", err)
	}
	if r.oldState, err = identity.ReadState(cfg); err != nil {
		return fmt.Errorf("renew: %w", err)
	}
	if err := identity.WriteState(cfg, &identity.State{KeyHandle: hexHandle(r.NewHandle), PreviousKeyHandle: hexHandle(r.OldHandle),
		CertSerial: r.Cert.SerialNumber.Text(16), CertNotAfter: r.Cert.NotAfter.UTC(), UpdatedAt: time.Now().UTC()}); err != nil {
		return fmt.Errorf("renew: %w", err)
	}
	if err := atomicfile.Write(cfg.Broker.CertFile, r.certPEM, 0o644); err != nil {
		r.restoreState()
		return fmt.Errorf("renew: broker.cert_file: %w", err)
	}
	return nil
}

// restoreState puts state_dir/identity.json back to what it was.
func (r *Renewed) restoreState() {
	st := r.oldState
	if st == nil {
		st = &identity.State{KeyHandle: hexHandle(r.OldHandle), UpdatedAt: time.Now().UTC()}
	}
	_ = identity.WriteState(r.cfg, st)
}

// Rollback undoes the switch on disk (broker.cert_file and identity.json back
// to the old key) and evicts the new key. For a caller that cannot switch its
// in-memory identity after Renew.
func (r *Renewed) Rollback(ctx context.Context) error {
	var errs []error
	if r.oldCert != nil {
		errs = append(errs, atomicfile.Write(r.cfg.Broker.CertFile, r.oldCert, 0o644))
	}
	r.restoreState()
	errs = append(errs, r.discard(ctx))
	return errors.Join(errs...)
}

// discard closes and evicts the new key.
func (r *Renewed) discard(ctx context.Context) error {
	r.Key.Close()
	if _, err := r.tpm.EvictKey(context.WithoutCancel(ctx), r.NewHandle); err != nil {
		return fmt.Errorf("renew: remove the new key at %s: %w", hexHandle(r.NewHandle), err)
	}
	return nil
}

// DropOldKey closes old (the previous key, if open) and evicts the key at
// OldHandle from the TPM.
func (r *Renewed) DropOldKey(ctx context.Context, old *tpmkeys.Key) error {
	if old != nil {
		old.Close()
	}
	if _, err := r.tpm.EvictKey(ctx, r.OldHandle); err != nil {
		return fmt.Errorf("renew: evict the old key at %s (the next renewal replaces it): %w", hexHandle(r.OldHandle), err)
	}
	return nil
}

func hexHandle(h uint32) string { return fmt.Sprintf("0x%08x", h) }

// requestTimeout scales the wait for each CA answer to the certificate's
// lifetime: 1/20 of it, 3–30 s.
func requestTimeout(c *x509.Certificate) time.Duration {
	return min(max(c.NotAfter.Sub(c.NotBefore)/20, 3*time.Second), 30*time.Second)
}

// retryDelay is the wait after the n-th consecutive failure (n ≥ 1):
// exponential from a base of lifetime/200 (1 s–5 min), capped at a quarter of
// the remaining validity (at least the base, at most 6 h), uniform in
// [d/2, d].
func retryDelay(c *x509.Certificate, now time.Time, n int) time.Duration {
	base := min(max(c.NotAfter.Sub(c.NotBefore)/200, time.Second), 5*time.Minute)
	limit := min(max(c.NotAfter.Sub(now)/4, base), 6*time.Hour)
	d := limit
	if n-1 < 32 {
		if x := base << uint(n-1); x > 0 && x < limit {
			d = x
		}
	}
	return d/2 + mrand.N(d/2+1)
}

// renewalState is the certificate renewal's part of a daemon run: the key in
// use (it changes with every renewal) and the status.
type renewalState struct {
	mu     sync.Mutex
	key    *tpmkeys.Key // current device key
	handle uint32
	before uint64 // signatures made by keys rotated out in this process
	status RenewalStatus
	path   string // state_dir/renewal.json ("" before start)
}

// RenewalStatus returns a copy of the renewal status.
func (r *renewalState) Status() RenewalStatus {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.status
}

// signatures counts TPM signatures of every device key used in this process.
func (r *renewalState) signatures() uint64 {
	r.mu.Lock()
	k, n := r.key, r.before
	r.mu.Unlock()
	return n + k.Signatures()
}

// update changes the status under the lock and writes renewal.json.
func (r *renewalState) update(log *slog.Logger, fn func(*RenewalStatus)) {
	r.mu.Lock()
	fn(&r.status)
	r.status.PID = os.Getpid()
	r.status.UpdatedAt = time.Now().UTC()
	b, _ := json.MarshalIndent(r.status, "", "  ")
	path := r.path
	r.mu.Unlock()
	if path == "" {
		return
	}
	if err := atomicfile.Write(path, append(b, '\n'), 0o600); err != nil {
		log.Warn("renewal: status not written", "err", err)
	}
}

// certificate is the status socket's view of the renewal.
func (r *renewalState) certificate() status.Certificate {
	st := r.Status()
	return status.Certificate{KeyHandle: st.KeyHandle, Serial: st.CertSerial, NotAfter: st.CertNotAfter, RenewAt: st.RenewAt,
		RenewalState: st.State, Renewals: st.Renewals, Failures: st.Failures}
}

// startRenewal starts the certificate renewal loop (see the top of this
// file). It is off for a key file identity and without enrol.renew_handle.
func (d *daemon) startRenewal(ctx context.Context) error {
	r := &d.renewal
	if d.id == nil || d.id.Key == nil || d.id.TPM == nil {
		r.status.State = RenewalDisabled
		d.log.Info("certificate renewal off: the identity is not a TPM key")
		return nil
	}
	r.key, r.handle = d.id.Key, d.id.Key.Handle()
	d.counters.TPMSignatures = r.signatures
	d.counters.Certificate = r.certificate
	if err := os.MkdirAll(d.cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("run: state_dir %s: %w", d.cfg.StateDir, err)
	}
	r.path = RenewalStatusPath(d.cfg)
	leaf := d.tls.Leaf()
	if identity.OtherKeyHandle(d.cfg, r.handle) == 0 {
		r.update(d.log, func(s *RenewalStatus) {
			*s = RenewalStatus{State: RenewalDisabled, KeyHandle: hexHandle(r.handle), CertSerial: leaf.SerialNumber.Text(16), CertNotAfter: leaf.NotAfter}
		})
		d.log.Warn("certificate renewal off: enrol.renew_handle is not set or equals tpm.key_handle", "renew_handle", d.cfg.Enrol.RenewHandle.String())
		return nil
	}
	// A request left from before this start is stale.
	_ = os.Remove(filepath.Join(d.cfg.StateDir, RenewalRequestFile))
	go d.renewLoop(ctx)
	return nil
}

// renewLoop waits for RenewAt (or a `cert renew` request), renews, and
// retries failures with backoff, until ctx ends.
func (d *daemon) renewLoop(ctx context.Context) {
	r := &d.renewal
	defer r.update(d.log, func(s *RenewalStatus) { s.State = RenewalStopped; s.NextAttempt = time.Time{} })
	failures := 0
	leaf := d.tls.Leaf()
	next := fleet.RenewAt(leaf, RenewJitter)
	r.update(d.log, func(s *RenewalStatus) {
		s.State, s.KeyHandle, s.RenewAt, s.NextAttempt = RenewalScheduled, hexHandle(r.handle), next, next
		s.CertSerial, s.CertNotAfter = leaf.SerialNumber.Text(16), leaf.NotAfter
	})
	d.log.Info("certificate renewal scheduled", "serial", leaf.SerialNumber.Text(16), "not_after", leaf.NotAfter, "renew_at", next, "handle", hexHandle(r.handle))
	poll := time.NewTicker(500 * time.Millisecond)
	defer poll.Stop()
	reqPath := filepath.Join(d.cfg.StateDir, RenewalRequestFile)
	for {
		request := ""
		timer := time.NewTimer(time.Until(next))
	wait:
		for {
			select {
			case <-ctx.Done():
				timer.Stop()
				return
			case <-timer.C:
				break wait
			case <-poll.C:
				if b, err := os.ReadFile(reqPath); err == nil {
					_ = os.Remove(reqPath)
					request = strings.TrimSpace(string(b))
					if request == "" {
						request = "-"
					}
					timer.Stop()
					d.log.Info("certificate renewal requested (tpmagent cert renew)", "request", request)
					break wait
				}
			}
		}
		err := d.renewNow(ctx)
		if ctx.Err() != nil {
			return
		}
		now := time.Now()
		if err == nil {
			failures = 0
			leaf = d.tls.Leaf()
			next = fleet.RenewAt(leaf, RenewJitter)
		} else {
			failures++
			leaf = d.tls.Leaf()
			next = now.Add(retryDelay(leaf, now, failures))
			d.counters.SetError(fmt.Errorf("certificate renewal: %w", err))
			lvl := slog.LevelWarn
			if now.After(leaf.NotAfter) {
				lvl = slog.LevelError
				err = fmt.Errorf("%w; the certificate expired on %s: if the broker refuses it, re-enrol with `tpmagent cert request --bootstrap-cert`", err, leaf.NotAfter.UTC().Format(time.RFC3339))
			}
			d.log.Log(ctx, lvl, "certificate renewal failed; keeping the current key and certificate", "attempt", failures, "retry_in", time.Until(next).Round(time.Millisecond), "not_after", leaf.NotAfter, "err", err)
		}
		r.update(d.log, func(s *RenewalStatus) {
			s.State, s.NextAttempt = RenewalScheduled, next
			s.KeyHandle, s.CertSerial, s.CertNotAfter = hexHandle(r.handle), leaf.SerialNumber.Text(16), leaf.NotAfter
			if err == nil {
				s.RenewAt = next
				s.LastError, s.LastErrorAt = "", time.Time{}
			} else {
				s.State = RenewalRetrying
				s.Failures++
				s.LastError, s.LastErrorAt = err.Error(), now.UTC()
			}
			if request != "" {
				s.LastRequest, s.LastRequestResult = request, "ok"
				if err != nil {
					s.LastRequestResult = err.Error()
				}
			}
		})
	}
}

// reconnectWait bounds how long a renewal waits for the broker connection to
// come back with the new key before it evicts the old key anyway.
const reconnectWait = 20 * time.Second

// renewNow runs one renewal: Renew, Rotate, Redial, evict the old key.
func (d *daemon) renewNow(ctx context.Context) error {
	r := &d.renewal
	r.mu.Lock()
	oldKey, oldHandle := r.key, r.handle
	r.mu.Unlock()
	r.update(d.log, func(s *RenewalStatus) { s.State = RenewalRunning; s.Attempts++ })
	ren, err := Renew(ctx, RenewOptions{Config: d.cfg, TPM: d.id.TPM, CurrentHandle: oldHandle, Current: d.tls, Logger: d.log})
	if err != nil {
		return err
	}
	if err := d.tls.Rotate(ren.Key, d.cfg.Broker.CertFile); err != nil {
		if rerr := ren.Rollback(ctx); rerr != nil {
			err = fmt.Errorf("%w (rollback: %v)", err, rerr)
		}
		return fmt.Errorf("renew: switch the TLS identity: %w", err)
	}
	r.mu.Lock()
	r.key, r.handle = ren.Key, ren.NewHandle
	r.before += oldKey.Signatures()
	r.mu.Unlock()
	d.log.Info("certificate renewed: new key and certificate in use",
		"serial", ren.Cert.SerialNumber.Text(16), "not_after", ren.Cert.NotAfter, "handle", hexHandle(ren.NewHandle),
		"previous_serial", ren.OldSerial, "previous_handle", hexHandle(oldHandle), "cert_file", d.cfg.Broker.CertFile)

	reconnected := d.redialWithNewKey(ctx, ren.Key)
	if err := ren.DropOldKey(context.WithoutCancel(ctx), oldKey); err != nil {
		d.log.Warn("renewal: old key not removed", "err", err)
		d.counters.SetError(err)
	} else {
		d.log.Info("renewal: old key evicted from the TPM", "handle", hexHandle(oldHandle))
	}
	r.update(d.log, func(s *RenewalStatus) {
		s.Renewals++
		s.LastRenewal, s.PreviousSerial, s.Reconnected = time.Now().UTC(), ren.OldSerial, reconnected
	})
	return nil
}

// redialWithNewKey moves the live broker connection to the new pair (one
// reconnect) and reports whether it came back with a full handshake signed
// by the new key within reconnectWait. When offline it does nothing: the
// next connection uses the new pair anyway.
func (d *daemon) redialWithNewKey(ctx context.Context, key *tpmkeys.Key) bool {
	if d.client == nil {
		return false
	}
	sigs := key.Signatures()
	if !d.client.Redial("certificate renewed") {
		d.log.Info("renewal: broker offline; the next connection uses the new certificate")
		return false
	}
	deadline := time.Now().Add(reconnectWait)
	for time.Now().Before(deadline) {
		if cs, ok := d.client.ConnectionState(); ok && d.client.Connected() && !cs.DidResume && key.Signatures() > sigs {
			d.log.Info("renewal: reconnected with the new key (full handshake)", "tls", tls.VersionName(cs.Version))
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(20 * time.Millisecond):
		}
	}
	d.log.Warn("renewal: no reconnection with the new key yet; the client keeps trying", "waited", reconnectWait)
	return false
}
