package transport

import (
	"bufio"
	"bytes"
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"time"
)

// HandshakeOptions tunes Handshake.
type HandshakeOptions struct {
	// ClientID is the MQTT client id of the CONNECT sent after the TLS
	// handshake; empty means "tpmagent-handshake". Do not use the id of a
	// running agent: the broker would disconnect it.
	ClientID string
	// Timeout bounds the whole exchange (TCP, TLS, CONNECT/CONNACK); 0 means 15 s.
	Timeout time.Duration
	// SkipMQTT stops after the TLS handshake. In TLS 1.3 the broker's verdict
	// on the client certificate then goes unseen.
	SkipMQTT bool
}

// HandshakeTrace records one mTLS connection to a broker step by step, in the
// order of RFC 8446 §2: ClientHello → ServerHello (+ key share) → server
// Certificate + CertificateVerify → CertificateRequest → client Certificate +
// CertificateVerify (signed by the TPM) → Finished (traffic keys) → encrypted
// data (MQTT CONNECT/CONNACK). Secrets are never recorded.
type HandshakeTrace struct {
	// Peer is the broker's host:port; ServerName the name its certificate
	// was checked against (SNI unless it is an IP address).
	Peer       string `json:"peer"`
	ServerName string `json:"server_name"`

	// Version, CipherSuite and Group (key exchange) are what was negotiated.
	// ServerVerified: the broker's chain verified against broker.ca_file
	// (for a resumed session, when the session was made). ClientCertSent:
	// the broker holds our certificate for this connection, sent in this
	// handshake or, resumed, in the one that made the session.
	// TPMSignatures is cumulative for the identity's signer in this process.
	// HandshakeMs runs from the start of the TCP connect to the end of the
	// TLS handshake.
	Version        string  `json:"version"`
	CipherSuite    string  `json:"cipher_suite"`
	Group          string  `json:"group"`
	ServerVerified bool    `json:"server_verified"`
	ClientCertSent bool    `json:"client_cert_sent"`
	Resumed        bool    `json:"resumed"`
	TPMSignatures  uint64  `json:"tpm_signatures"`
	HandshakeMs    float64 `json:"handshake_ms"`
	// SignedThisHandshake reports that the device key signed a
	// CertificateVerify in this handshake (false when resumed).
	SignedThisHandshake bool `json:"signed_this_handshake"`
	// MQTT is the broker's answer to CONNECT ("accepted", "refused: …"), or
	// "" when not attempted.
	MQTT string `json:"mqtt,omitempty"`

	ClientHello        *ClientHelloTrace  `json:"client_hello,omitempty"`
	ServerHello        *ServerHelloTrace  `json:"server_hello,omitempty"`
	ServerChain        []CertTrace        `json:"server_chain,omitempty"`
	ServerVerification string             `json:"server_verification,omitempty"`
	CertificateRequest *CertRequestTrace  `json:"certificate_request,omitempty"`
	ClientCert         *CertTrace         `json:"client_cert,omitempty"`
	CertificateVerify  *SignatureTrace    `json:"certificate_verify,omitempty"`
	TrafficKeys        *TrafficKeysTrace  `json:"traffic_keys,omitempty"`
	Alerts             []string           `json:"alerts,omitempty"`
	Steps              []HandshakeStep    `json:"steps"`
	Error              string             `json:"error,omitempty"`
	Cause              string             `json:"cause,omitempty"`
	wire               *tlsWireTapSummary `json:"-"`
}

// HandshakeStep is one line of the trace: the protocol message or phase, the
// time since the connection started, and what was seen.
type HandshakeStep struct {
	Step   string  `json:"step"`
	AtMs   float64 `json:"at_ms"`
	Detail string  `json:"detail"`
}

// ClientHelloTrace is what the client offered, as read from the bytes it sent.
type ClientHelloTrace struct {
	Versions     []string `json:"versions"`
	CipherSuites []string `json:"cipher_suites"`
	Groups       []string `json:"groups"`
	KeyShares    []string `json:"key_shares"`
	SignatureAlg []string `json:"signature_algorithms"`
	ServerName   string   `json:"server_name,omitempty"`
	// PSKOffered: the client offered a session ticket (resumption attempt).
	PSKOffered bool `json:"psk_offered"`
}

// ServerHelloTrace is what the server chose, as read from the bytes it sent.
type ServerHelloTrace struct {
	Version           string `json:"version"`
	CipherSuite       string `json:"cipher_suite"`
	KeyShareGroup     string `json:"key_share_group,omitempty"`
	PSKAccepted       bool   `json:"psk_accepted"`
	HelloRetryRequest bool   `json:"hello_retry_request"`
}

// CertTrace summarises one certificate.
type CertTrace struct {
	Subject  string    `json:"subject"`
	Issuer   string    `json:"issuer"`
	NotAfter time.Time `json:"not_after"`
	Key      string    `json:"key"`
}

// CertRequestTrace is the server's CertificateRequest.
type CertRequestTrace struct {
	AcceptableCAs    []string `json:"acceptable_cas"`
	SignatureSchemes []string `json:"signature_schemes"`
}

// SignatureTrace is the client's CertificateVerify signature.
type SignatureTrace struct {
	// Handle is the TPM handle ("0x81000100") when the signer exposes one.
	Handle    string  `json:"handle,omitempty"`
	Key       string  `json:"key"`
	Hash      string  `json:"hash"`
	Ms        float64 `json:"ms"`
	Succeeded bool    `json:"succeeded"`
}

// TrafficKeysTrace describes the application traffic keys without revealing them.
type TrafficKeysTrace struct {
	Cipher   string `json:"cipher"`
	KeyBytes int    `json:"key_bytes"`
	Hash     string `json:"hash"`
}

// Handshake makes one TLS connection to addr (host:port) with the identity's
// shared configuration and session cache, then (unless opts.SkipMQTT) sends
// an MQTT CONNECT and reads the CONNACK so that the broker's verdict on the
// client certificate is seen, and disconnects. It returns the trace of every
// step it got through, also on error; the error is a *TLSError naming the
// peer and the cause.
func Handshake(ctx context.Context, addr string, id *TLSIdentity, opts HandshakeOptions) (*HandshakeTrace, error) {
	if opts.Timeout <= 0 {
		opts.Timeout = 15 * time.Second
	}
	if opts.ClientID == "" {
		opts.ClientID = "tpmagent-handshake"
	}
	ctx, cancel := context.WithTimeout(ctx, opts.Timeout)
	defer cancel()

	h := &tlsHandshakeRun{id: id, tr: &HandshakeTrace{Peer: addr}, start: time.Now()}
	err := h.run(ctx, addr, opts)
	h.finish(err)
	if err != nil {
		err = id.ExplainTLSError(addr, err, h.handshakeDone)
		h.tr.Error = err.Error()
		var te *TLSError
		if errors.As(err, &te) {
			h.tr.Cause = te.Cause
		}
		return h.tr, err
	}
	return h.tr, nil
}

// tlsHandshakeRun is the state of one traced connection.
type tlsHandshakeRun struct {
	id    *TLSIdentity
	tr    *HandshakeTrace
	start time.Time
	tap   *tlsWireTap

	mu            sync.Mutex
	tcpMs         float64
	verifiedAt    float64
	certReqAt     float64
	signStartAt   float64
	signEndAt     float64
	handshakeMs   float64
	mqttAt        float64
	cs            *tls.ConnectionState
	handshakeDone bool
}

func (h *tlsHandshakeRun) since() float64 {
	return float64(time.Since(h.start).Microseconds()) / 1000
}

func (h *tlsHandshakeRun) run(ctx context.Context, addr string, opts HandshakeOptions) error {
	if err := h.id.Check(); err != nil {
		return err
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("transport: broker address %q: %w", addr, err)
	}
	cfg := h.id.ConfigFor(host)
	h.tr.ServerName = cfg.ServerName
	cfg.VerifyConnection = h.verifyConnection
	cfg.GetClientCertificate = h.getClientCertificate

	var d net.Dialer
	raw, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	h.tcpMs = h.since()
	h.tap = newTLSWireTap(raw, h.since)
	conn := tls.Client(h.tap, cfg)
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	if err := conn.HandshakeContext(ctx); err != nil {
		h.captureUnverified(err)
		return err
	}
	h.handshakeMs = h.since()
	cs := conn.ConnectionState()
	h.cs = &cs
	h.handshakeDone = true
	if opts.SkipMQTT {
		return nil
	}
	return h.mqttConnect(conn, opts.ClientID)
}

// verifyConnection runs after Go verified the server chain (full handshake)
// or accepted the PSK (resumption).
func (h *tlsHandshakeRun) verifyConnection(cs tls.ConnectionState) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.verifiedAt = h.since()
	h.tr.ServerChain = certTraces(cs.PeerCertificates)
	h.tr.ServerVerified = len(cs.VerifiedChains) > 0
	if h.tr.ServerVerified {
		h.tr.ServerVerification = fmt.Sprintf("ok: chain of %d to a CA in broker.ca_file %s, name %q matches", len(cs.VerifiedChains[0]), h.id.CAFile(), h.tr.ServerName)
		if cs.DidResume {
			h.tr.ServerVerification = "ok: verified when the resumed session was made (" + h.tr.ServerVerification[4:] + ")"
		}
	}
	return nil
}

// captureUnverified records the server chain of a failed verification.
func (h *tlsHandshakeRun) captureUnverified(err error) {
	var ve *tls.CertificateVerificationError
	if errors.As(err, &ve) {
		h.mu.Lock()
		h.tr.ServerChain = certTraces(ve.UnverifiedCertificates)
		h.tr.ServerVerification = "FAILED: " + ve.Err.Error()
		h.mu.Unlock()
	}
}

// getClientCertificate answers the CertificateRequest and times the
// CertificateVerify signature that follows.
func (h *tlsHandshakeRun) getClientCertificate(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
	h.mu.Lock()
	h.certReqAt = h.since()
	req := &CertRequestTrace{}
	for _, der := range cri.AcceptableCAs {
		req.AcceptableCAs = append(req.AcceptableCAs, distinguishedName(der))
	}
	for _, s := range cri.SignatureSchemes {
		req.SignatureSchemes = append(req.SignatureSchemes, signatureSchemeName(s))
	}
	h.tr.CertificateRequest = req
	h.mu.Unlock()

	cert, err := h.id.getClientCertificate(cri)
	if err != nil {
		return nil, err
	}
	c := *cert
	c.PrivateKey = &tlsTimingSigner{s: cert.PrivateKey.(crypto.Signer), h: h}
	h.mu.Lock()
	ct := certTrace(c.Leaf)
	h.tr.ClientCert = &ct
	h.tr.ClientCertSent = true
	h.mu.Unlock()
	return &c, nil
}

// tlsTimingSigner times the one signature of a traced handshake.
type tlsTimingSigner struct {
	s crypto.Signer
	h *tlsHandshakeRun
}

func (t *tlsTimingSigner) Public() crypto.PublicKey { return t.s.Public() }

func (t *tlsTimingSigner) Sign(r io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	h := t.h
	h.mu.Lock()
	h.signStartAt = h.since()
	h.mu.Unlock()
	begin := time.Now()
	sig, err := t.s.Sign(r, digest, opts)
	d := time.Since(begin)
	h.mu.Lock()
	defer h.mu.Unlock()
	h.signEndAt = h.since()
	st := &SignatureTrace{Key: keyDescription(t.s.Public()), Ms: float64(d.Microseconds()) / 1000, Succeeded: err == nil}
	if opts != nil {
		st.Hash = opts.HashFunc().String()
		if _, ok := opts.(*rsa.PSSOptions); ok {
			st.Hash += " (PSS)"
		}
	}
	if hd, ok := signerHandle(h.id.Signer()); ok {
		st.Handle = fmt.Sprintf("0x%08x", hd)
	}
	h.tr.CertificateVerify = st
	h.tr.SignedThisHandshake = err == nil
	return sig, err
}

// mqttConnect sends MQTT 3.1.1 CONNECT (clean session, no credentials: the
// broker takes the identity from the certificate) and reads CONNACK, then
// sends DISCONNECT. The TLS 1.3 broker's verdict on the client certificate
// arrives here, as an alert at the first read.
func (h *tlsHandshakeRun) mqttConnect(conn *tls.Conn, clientID string) error {
	if _, err := conn.Write(handshakeConnectPacket(clientID, 30)); err != nil {
		return err
	}
	var ack [4]byte
	if _, err := io.ReadFull(bufio.NewReader(conn), ack[:]); err != nil {
		return err
	}
	h.mqttAt = h.since()
	if ack[0] != 0x20 || ack[1] != 2 {
		h.tr.MQTT = fmt.Sprintf("unexpected packet 0x%02x", ack[0])
		return &TLSError{Peer: h.tr.Peer, Cause: CauseMQTTRefused, Msg: fmt.Sprintf("transport: broker %s answered CONNECT with packet type 0x%02x, not CONNACK: is it an MQTT broker?", h.tr.Peer, ack[0])}
	}
	if ack[3] != 0 {
		h.tr.MQTT = "refused: " + connackReason(ack[3])
		return &TLSError{Peer: h.tr.Peer, Cause: CauseMQTTRefused, Msg: fmt.Sprintf("transport: broker %s accepted the TLS connection but refused MQTT CONNECT of client id %q: %s (the broker takes the username from the certificate CN %q: check its ACL / auth config)",
			h.tr.Peer, clientID, connackReason(ack[3]), h.id.Leaf().Subject.CommonName)}
	}
	h.tr.MQTT = "accepted"
	_, _ = conn.Write([]byte{0xe0, 0x00}) // DISCONNECT
	return nil
}

// handshakeConnectPacket encodes an MQTT 3.1.1 CONNECT with clean session.
func handshakeConnectPacket(clientID string, keepalive uint16) []byte {
	var vh bytes.Buffer
	vh.Write([]byte{0, 4, 'M', 'Q', 'T', 'T', 4, 0x02})
	_ = binary.Write(&vh, binary.BigEndian, keepalive)
	_ = binary.Write(&vh, binary.BigEndian, uint16(len(clientID)))
	vh.WriteString(clientID)
	out := []byte{0x10}
	n := vh.Len()
	for {
		b := byte(n % 128)
		n /= 128
		if n > 0 {
			b |= 0x80
		}
		out = append(out, b)
		if n == 0 {
			break
		}
	}
	return append(out, vh.Bytes()...)
}

// connackReason names an MQTT 3.1.1 CONNACK return code.
func connackReason(rc byte) string {
	switch rc {
	case 1:
		return "unacceptable protocol version (1)"
	case 2:
		return "client identifier rejected (2)"
	case 3:
		return "server unavailable (3)"
	case 4:
		return "bad user name or password (4)"
	case 5:
		return "not authorized (5)"
	}
	return fmt.Sprintf("return code %d", rc)
}

// finish fills the summary fields and the ordered steps from what was seen.
func (h *tlsHandshakeRun) finish(runErr error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	tr := h.tr
	tr.TPMSignatures = h.id.Signatures()
	var wire tlsWireTapSummary
	if h.tap != nil {
		wire = h.tap.summary()
	}
	tr.wire = &wire
	tr.ClientHello = wire.clientHello
	tr.ServerHello = wire.serverHello
	tr.Alerts = wire.alerts
	if h.cs != nil {
		cs := h.cs
		tr.Version = tls.VersionName(cs.Version)
		tr.CipherSuite = tls.CipherSuiteName(cs.CipherSuite)
		if cs.CurveID != 0 {
			tr.Group = cs.CurveID.String()
		}
		tr.Resumed = cs.DidResume
		tr.HandshakeMs = h.handshakeMs
		tr.TrafficKeys = trafficKeys(cs.CipherSuite)
		if cs.DidResume && !tr.ClientCertSent {
			// The resumed session was made by a full handshake of this
			// identity, in which the certificate was sent and signed for;
			// the PSK carries that authentication (RFC 8446 §2.2).
			tr.ClientCertSent = true
		}
	} else if wire.serverHello != nil {
		tr.Version = wire.serverHello.Version
		tr.CipherSuite = wire.serverHello.CipherSuite
		tr.Group = wire.serverHello.KeyShareGroup
	}

	add := func(step string, at float64, format string, args ...any) {
		tr.Steps = append(tr.Steps, HandshakeStep{Step: step, AtMs: at, Detail: fmt.Sprintf(format, args...)})
	}
	if h.tcpMs > 0 {
		add("TCP", h.tcpMs, "connected to %s", tr.Peer)
	}
	if ch := wire.clientHello; ch != nil {
		psk := "no session ticket"
		if ch.PSKOffered {
			psk = "session ticket offered (resumption attempt)"
		}
		add("ClientHello", wire.clientHelloAt, "versions %s; suites %s; groups %s; key shares %s; SNI %q; %s",
			strings.Join(ch.Versions, ","), strings.Join(ch.CipherSuites, ","), strings.Join(ch.Groups, ","),
			strings.Join(ch.KeyShares, ","), ch.ServerName, psk)
	}
	if sh := wire.serverHello; sh != nil {
		d := fmt.Sprintf("%s, %s, key exchange %s", sh.Version, sh.CipherSuite, orDash(sh.KeyShareGroup))
		if sh.PSKAccepted {
			d += ", session ticket accepted (PSK + (EC)DHE, no certificates)"
		} else {
			d += ", full handshake"
		}
		if sh.HelloRetryRequest {
			d += " (after HelloRetryRequest)"
		}
		add("ServerHello", wire.serverHelloAt, "%s", d)
		if sh.Version == "TLS 1.3" {
			add("HandshakeKeys", wire.serverHelloAt, "handshake traffic keys derived from the %s shared secret (HKDF-%s); the rest of the handshake is encrypted",
				orDash(sh.KeyShareGroup), suiteHash(sh.CipherSuite))
		}
	}
	for _, a := range wire.alerts {
		add("Alert", wire.alertAt, "received %s", a)
	}
	if len(tr.ServerChain) > 0 && !tr.Resumed {
		var parts []string
		for i, c := range tr.ServerChain {
			parts = append(parts, fmt.Sprintf("[%d] %s (issuer %s, %s, expires %s)", i, c.Subject, c.Issuer, c.Key, c.NotAfter.UTC().Format(time.RFC3339)))
		}
		add("Certificate", h.verifiedAt, "server chain %s", strings.Join(parts, "; "))
	}
	if tr.ServerVerification != "" {
		add("Verify", h.verifiedAt, "server certificate %s", tr.ServerVerification)
	}
	if cr := tr.CertificateRequest; cr != nil {
		cas := "any"
		if len(cr.AcceptableCAs) > 0 {
			cas = strings.Join(cr.AcceptableCAs, " | ")
		}
		add("CertificateRequest", h.certReqAt, "acceptable CAs %s; signature schemes %s", cas, strings.Join(cr.SignatureSchemes, ","))
	}
	if c := tr.ClientCert; c != nil {
		add("Certificate", h.certReqAt, "client certificate sent: %s (issuer %s, %s, expires %s) from broker.cert_file %s",
			c.Subject, c.Issuer, c.Key, c.NotAfter.UTC().Format(time.RFC3339), h.id.CertFile())
	}
	if sv := tr.CertificateVerify; sv != nil {
		who := "device key"
		if sv.Handle != "" {
			who = "TPM key " + sv.Handle
		}
		status := "signed"
		if !sv.Succeeded {
			status = "FAILED to sign"
		}
		add("CertificateVerify", h.signEndAt, "%s by %s (%s, %s) in %.1f ms", status, who, sv.Key, sv.Hash, sv.Ms)
	}
	if h.cs != nil {
		if tr.Resumed {
			add("Resumption", h.handshakeMs, "resumed: yes: no certificates exchanged, no TPM signature")
		} else {
			add("Resumption", h.handshakeMs, "resumed: no (full handshake)")
		}
		if tk := tr.TrafficKeys; tk != nil {
			add("Finished", h.handshakeMs, "application traffic keys derived: %s, %d-byte keys, HKDF-%s (keys never printed)", tk.Cipher, tk.KeyBytes, tk.Hash)
		}
	}
	if h.cs != nil {
		add("Total", h.handshakeMs, "TLS handshake %.1f ms; device key signatures so far %d", h.handshakeMs, tr.TPMSignatures)
	}
	if tr.MQTT != "" {
		add("MQTT", h.mqttAt, "CONNECT/CONNACK over the encrypted channel: %s (%d encrypted records received)", tr.MQTT, wire.encryptedIn)
	}
	if runErr != nil {
		add("Error", h.since(), "%v", runErr)
	}
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// Text renders the trace one step per line.
func (t *HandshakeTrace) Text() string {
	var b strings.Builder
	for _, s := range t.Steps {
		fmt.Fprintf(&b, "%8.1f ms  %-18s %s\n", s.AtMs, s.Step, s.Detail)
	}
	return b.String()
}

// certTraces summarises a chain.
func certTraces(cs []*x509.Certificate) []CertTrace {
	out := make([]CertTrace, 0, len(cs))
	for _, c := range cs {
		out = append(out, certTrace(c))
	}
	return out
}

func certTrace(c *x509.Certificate) CertTrace {
	if c == nil {
		return CertTrace{}
	}
	return CertTrace{Subject: c.Subject.String(), Issuer: c.Issuer.String(), NotAfter: c.NotAfter, Key: keyDescription(c.PublicKey)}
}

// distinguishedName renders a DER-encoded X.501 name.
func distinguishedName(der []byte) string {
	var seq pkix.RDNSequence
	if rest, err := asn1.Unmarshal(der, &seq); err != nil || len(rest) > 0 {
		return fmt.Sprintf("(%d bytes)", len(der))
	}
	var n pkix.Name
	n.FillFromRDNSequence(&seq)
	return n.String()
}

// trafficKeys describes the AEAD of a suite.
func trafficKeys(suite uint16) *TrafficKeysTrace {
	name := tls.CipherSuiteName(suite)
	tk := &TrafficKeysTrace{Hash: suiteHash(name)}
	switch {
	case strings.Contains(name, "AES_128_GCM"):
		tk.Cipher, tk.KeyBytes = "AES-128-GCM", 16
	case strings.Contains(name, "AES_256_GCM"):
		tk.Cipher, tk.KeyBytes = "AES-256-GCM", 32
	case strings.Contains(name, "CHACHA20_POLY1305"):
		tk.Cipher, tk.KeyBytes = "ChaCha20-Poly1305", 32
	default:
		tk.Cipher = name
	}
	return tk
}

func suiteHash(suite string) string {
	if strings.HasSuffix(suite, "SHA384") {
		return "SHA-384"
	}
	return "SHA-256"
}

// tlsWireTap is a net.Conn that reads the plaintext part of the TLS record
// stream in both directions: ClientHello, ServerHello and unencrypted
// alerts. What it reports is what crossed the wire, not what the
// configuration intended. It never sees a secret: everything after
// ChangeCipherSpec (or ServerHello, in TLS 1.3) is only counted.
type tlsWireTap struct {
	net.Conn
	now func() float64

	mu  sync.Mutex
	out tlsRecordParser
	in  tlsRecordParser
	sum tlsWireTapSummary
}

// tlsWireTapSummary is what the tap saw.
type tlsWireTapSummary struct {
	clientHello   *ClientHelloTrace
	clientHelloAt float64
	serverHello   *ServerHelloTrace
	serverHelloAt float64
	alerts        []string
	alertAt       float64
	encryptedIn   int
}

// tlsRecordParser reassembles TLS records and handshake messages of one direction.
type tlsRecordParser struct {
	buf       []byte // incomplete record bytes
	hs        []byte // incomplete handshake message bytes
	encrypted bool   // after ChangeCipherSpec: records are opaque
	done      bool   // stop parsing (too much data or malformed)
}

func newTLSWireTap(c net.Conn, now func() float64) *tlsWireTap {
	return &tlsWireTap{Conn: c, now: now}
}

func (w *tlsWireTap) Write(b []byte) (int, error) {
	w.mu.Lock()
	w.out.feed(b, func(typ byte, body []byte) { w.record(true, typ, body) })
	w.mu.Unlock()
	return w.Conn.Write(b)
}

func (w *tlsWireTap) Read(b []byte) (int, error) {
	n, err := w.Conn.Read(b)
	if n > 0 {
		w.mu.Lock()
		w.in.feed(b[:n], func(typ byte, body []byte) { w.record(false, typ, body) })
		w.mu.Unlock()
	}
	return n, err
}

func (w *tlsWireTap) summary() tlsWireTapSummary {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.sum
}

// TLS record content types and handshake message types (RFC 8446 §5.1, §4).
const (
	tlsRecordChangeCipherSpec = 20
	tlsRecordAlert            = 21
	tlsRecordHandshake        = 22
	tlsRecordApplicationData  = 23

	tlsMsgClientHello = 1
	tlsMsgServerHello = 2
)

// feed appends bytes and calls rec for every complete record.
func (p *tlsRecordParser) feed(b []byte, rec func(typ byte, body []byte)) {
	if p.done {
		return
	}
	p.buf = append(p.buf, b...)
	for len(p.buf) >= 5 {
		n := int(binary.BigEndian.Uint16(p.buf[3:5]))
		if n > 1<<15 {
			p.done, p.buf = true, nil
			return
		}
		if len(p.buf) < 5+n {
			break
		}
		rec(p.buf[0], p.buf[5:5+n])
		p.buf = p.buf[5+n:]
	}
	if len(p.buf) == 0 {
		p.buf = nil
	}
}

// record handles one record in the given direction.
func (w *tlsWireTap) record(out bool, typ byte, body []byte) {
	p := &w.in
	if out {
		p = &w.out
	}
	switch typ {
	case tlsRecordChangeCipherSpec:
		p.encrypted = true
	case tlsRecordAlert:
		if p.encrypted || len(body) != 2 || out {
			return
		}
		level := "warning"
		if body[0] == 2 {
			level = "fatal"
		}
		w.sum.alerts = append(w.sum.alerts, fmt.Sprintf("%s alert %d (%s) from the server in plaintext", level, body[1], tlsAlertName(body[1])))
		w.sum.alertAt = w.now()
	case tlsRecordHandshake:
		if p.encrypted {
			return
		}
		p.hs = append(p.hs, body...)
		for len(p.hs) >= 4 {
			n := int(p.hs[1])<<16 | int(p.hs[2])<<8 | int(p.hs[3])
			if len(p.hs) < 4+n {
				break
			}
			w.message(out, p.hs[0], p.hs[4:4+n])
			p.hs = p.hs[4+n:]
		}
	case tlsRecordApplicationData:
		if !out {
			w.sum.encryptedIn++
		}
	}
}

// message handles one plaintext handshake message.
func (w *tlsWireTap) message(out bool, typ byte, body []byte) {
	switch {
	case out && typ == tlsMsgClientHello && w.sum.clientHello == nil:
		if ch, ok := parseClientHello(body); ok {
			w.sum.clientHello, w.sum.clientHelloAt = ch, w.now()
		}
	case !out && typ == tlsMsgServerHello:
		if sh, ok := parseServerHello(body); ok {
			// A HelloRetryRequest is followed by the real ServerHello.
			if w.sum.serverHello != nil && w.sum.serverHello.HelloRetryRequest {
				sh.HelloRetryRequest = true
			}
			w.sum.serverHello, w.sum.serverHelloAt = sh, w.now()
		}
	}
}

// tlsBytes is a cursor over a handshake message.
type tlsBytes []byte

func (b *tlsBytes) u8() (int, bool) {
	if len(*b) < 1 {
		return 0, false
	}
	v := (*b)[0]
	*b = (*b)[1:]
	return int(v), true
}

func (b *tlsBytes) u16() (int, bool) {
	if len(*b) < 2 {
		return 0, false
	}
	v := binary.BigEndian.Uint16(*b)
	*b = (*b)[2:]
	return int(v), true
}

func (b *tlsBytes) bytes(n int) (tlsBytes, bool) {
	if len(*b) < n {
		return nil, false
	}
	v := (*b)[:n]
	*b = (*b)[n:]
	return v, true
}

func (b *tlsBytes) vec8() (tlsBytes, bool) {
	n, ok := b.u8()
	if !ok {
		return nil, false
	}
	return b.bytes(n)
}

func (b *tlsBytes) vec16() (tlsBytes, bool) {
	n, ok := b.u16()
	if !ok {
		return nil, false
	}
	return b.bytes(n)
}

// TLS extension numbers (RFC 8446 §4.2).
const (
	tlsExtServerName          = 0
	tlsExtSupportedGroups     = 10
	tlsExtSignatureAlgorithms = 13
	tlsExtPreSharedKey        = 41
	tlsExtSupportedVersions   = 43
	tlsExtKeyShare            = 51
)

// parseExtensions splits an extensions block.
func parseExtensions(b tlsBytes) (map[int]tlsBytes, bool) {
	exts := map[int]tlsBytes{}
	for len(b) > 0 {
		typ, ok1 := b.u16()
		data, ok2 := b.vec16()
		if !ok1 || !ok2 {
			return nil, false
		}
		exts[typ] = data
	}
	return exts, true
}

// parseClientHello reads RFC 8446 §4.1.2.
func parseClientHello(body []byte) (*ClientHelloTrace, bool) {
	b := tlsBytes(body)
	legacy, ok := b.u16()
	if !ok {
		return nil, false
	}
	if _, ok := b.bytes(32); !ok { // random
		return nil, false
	}
	if _, ok := b.vec8(); !ok { // legacy_session_id
		return nil, false
	}
	suites, ok := b.vec16()
	if !ok {
		return nil, false
	}
	if _, ok := b.vec8(); !ok { // compression
		return nil, false
	}
	ch := &ClientHelloTrace{}
	for len(suites) >= 2 {
		s, _ := suites.u16()
		ch.CipherSuites = append(ch.CipherSuites, tls.CipherSuiteName(uint16(s)))
	}
	extBlock, _ := b.vec16()
	exts, ok := parseExtensions(extBlock)
	if !ok {
		return nil, false
	}
	if v, ok := exts[tlsExtSupportedVersions]; ok {
		list, _ := v.vec8()
		for len(list) >= 2 {
			x, _ := list.u16()
			ch.Versions = append(ch.Versions, tls.VersionName(uint16(x)))
		}
	} else {
		ch.Versions = []string{tls.VersionName(uint16(legacy))}
	}
	if v, ok := exts[tlsExtSupportedGroups]; ok {
		list, _ := v.vec16()
		for len(list) >= 2 {
			x, _ := list.u16()
			ch.Groups = append(ch.Groups, tls.CurveID(x).String())
		}
	}
	if v, ok := exts[tlsExtKeyShare]; ok {
		list, _ := v.vec16()
		for len(list) >= 4 {
			g, _ := list.u16()
			if _, ok := list.vec16(); !ok {
				break
			}
			ch.KeyShares = append(ch.KeyShares, tls.CurveID(g).String())
		}
	}
	if v, ok := exts[tlsExtSignatureAlgorithms]; ok {
		list, _ := v.vec16()
		for len(list) >= 2 {
			x, _ := list.u16()
			ch.SignatureAlg = append(ch.SignatureAlg, signatureSchemeName(tls.SignatureScheme(x)))
		}
	}
	if v, ok := exts[tlsExtServerName]; ok {
		list, _ := v.vec16()
		if t, ok := list.u8(); ok && t == 0 {
			name, _ := list.vec16()
			ch.ServerName = string(name)
		}
	}
	_, ch.PSKOffered = exts[tlsExtPreSharedKey]
	return ch, true
}

// helloRetryRequestRandom marks a ServerHello as HelloRetryRequest (RFC 8446 §4.1.3).
var helloRetryRequestRandom = []byte{
	0xCF, 0x21, 0xAD, 0x74, 0xE5, 0x9A, 0x61, 0x11, 0xBE, 0x1D, 0x8C, 0x02, 0x1E, 0x65, 0xB8, 0x91,
	0xC2, 0xA2, 0x11, 0x16, 0x7A, 0xBB, 0x8C, 0x5E, 0x07, 0x9E, 0x09, 0xE2, 0xC8, 0xA8, 0x33, 0x9C,
}

// parseServerHello reads RFC 8446 §4.1.3 (and a TLS 1.2 ServerHello).
func parseServerHello(body []byte) (*ServerHelloTrace, bool) {
	b := tlsBytes(body)
	legacy, ok := b.u16()
	if !ok {
		return nil, false
	}
	random, ok := b.bytes(32)
	if !ok {
		return nil, false
	}
	if _, ok := b.vec8(); !ok {
		return nil, false
	}
	suite, ok := b.u16()
	if !ok {
		return nil, false
	}
	if _, ok := b.u8(); !ok {
		return nil, false
	}
	sh := &ServerHelloTrace{
		Version:           tls.VersionName(uint16(legacy)),
		CipherSuite:       tls.CipherSuiteName(uint16(suite)),
		HelloRetryRequest: bytes.Equal(random, helloRetryRequestRandom),
	}
	extBlock, _ := b.vec16()
	exts, ok := parseExtensions(extBlock)
	if !ok {
		return sh, true
	}
	if v, ok := exts[tlsExtSupportedVersions]; ok {
		if x, ok := v.u16(); ok {
			sh.Version = tls.VersionName(uint16(x))
		}
	}
	if v, ok := exts[tlsExtKeyShare]; ok {
		if g, ok := v.u16(); ok {
			sh.KeyShareGroup = tls.CurveID(g).String()
		}
	}
	_, sh.PSKAccepted = exts[tlsExtPreSharedKey]
	return sh, true
}

// signatureSchemeName names a signature scheme, including those Go does
// not implement but OpenSSL brokers offer (RFC 8446 §4.2.3).
func signatureSchemeName(s tls.SignatureScheme) string {
	switch s {
	case 0x0808:
		return "Ed448"
	case 0x0809:
		return "PSSPSSWithSHA256"
	case 0x080a:
		return "PSSPSSWithSHA384"
	case 0x080b:
		return "PSSPSSWithSHA512"
	case 0x0301:
		return "PKCS1WithSHA224"
	case 0x0303:
		return "ECDSAWithSHA224"
	}
	return s.String()
}

// tlsAlertName names a TLS alert description (RFC 8446 §6).
func tlsAlertName(d byte) string {
	switch d {
	case 0:
		return "close_notify"
	case 10:
		return "unexpected_message"
	case 20:
		return "bad_record_mac"
	case 40:
		return "handshake_failure"
	case 42:
		return "bad_certificate"
	case 43:
		return "unsupported_certificate"
	case 44:
		return "certificate_revoked"
	case 45:
		return "certificate_expired"
	case 46:
		return "certificate_unknown"
	case 47:
		return "illegal_parameter"
	case 48:
		return "unknown_ca"
	case 49:
		return "access_denied"
	case 50:
		return "decode_error"
	case 51:
		return "decrypt_error"
	case 70:
		return "protocol_version"
	case 71:
		return "insufficient_security"
	case 80:
		return "internal_error"
	case 109:
		return "missing_extension"
	case 110:
		return "unsupported_extension"
	case 112:
		return "unrecognized_name"
	case 116:
		return "certificate_required"
	case 120:
		return "no_application_protocol"
	}
	return "unknown"
}
