package transport

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tpmagent/tpmagent/internal/pemfile"
)

// TLSOptions describes the device's TLS client identity and trust.
type TLSOptions struct {
	// Signer is the device key, normally TPM-resident (tpmkeys). It signs the
	// TLS CertificateVerify of every full handshake and nothing else here. If
	// it has a `Handle() uint32` method the handle is named in messages; if it
	// has a `Signatures() uint64` method that count is reported as the TPM
	// signature count, otherwise the identity counts its own calls.
	Signer crypto.Signer
	// CertFile (broker.cert_file) holds the device certificate, PEM, leaf
	// first, then any intermediates to send with it.
	CertFile string
	// CAFile (broker.ca_file) holds the CA certificates (PEM) that the
	// broker's certificate must chain to.
	CAFile string
	// ServerName (broker.server_name) overrides the name checked in the
	// broker's certificate and sent as SNI. Empty: the host of the URL.
	ServerName string
	// MinTLS (broker.min_tls) is "1.3" (the default when empty) or "1.2".
	MinTLS string
	// KeyLogWriter, when set, receives the TLS secrets in NSS key log format
	// (for Wireshark). Anyone holding that file can decrypt the traffic: it is
	// off by default and logged as a warning when on.
	KeyLogWriter io.Writer
	// Logger receives warnings; nil means slog.Default().
	Logger *slog.Logger
	// Now is the clock for validity checks; nil means time.Now.
	Now func() time.Time
}

// TLSIdentity is the device's TLS client configuration: the certificate chain
// from broker.cert_file whose private key is the TPM Signer, the broker trust
// store, and one client session cache shared by every connection, so that
// reconnects resume the TLS 1.3 session without a TPM signature.
//
// A TLSIdentity is safe for concurrent use. Config returns the same
// *tls.Config each time; do not modify it.
type TLSIdentity struct {
	opts  TLSOptions
	roots *x509.CertPool
	cfg   *tls.Config
	cache *tlsSwappableCache
	log   *slog.Logger

	mu    sync.Mutex
	chain *tlsChain // current certificate and key; replaced by ReloadCertificate and Rotate
}

// tlsChain is a parsed broker.cert_file and the signer that holds its key.
type tlsChain struct {
	file   string
	leaf   *x509.Certificate
	cert   tls.Certificate
	signer *tlsCountingSigner
}

// TLS12CipherSuites are the only suites offered when min_tls is "1.2":
// ephemeral ECDHE key exchange with an AEAD. No RSA key transport, no CBC,
// no SHA-1 MACs. (TLS 1.3 suites are all AEAD and not configurable.)
var TLS12CipherSuites = []uint16{
	tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
	tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
	tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
	tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
	tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
	tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
}

// sessionCacheSize is the capacity of the client session cache: a few
// tickets for each of a handful of brokers.
const sessionCacheSize = 64

// NewTLSConfig loads the certificate chain and trust store, checks that the
// certificate belongs to the Signer and is valid now, and returns the
// identity every connection uses. Errors name the file and say what to do.
func NewTLSConfig(opts TLSOptions) (*TLSIdentity, error) {
	if opts.Signer == nil {
		return nil, errors.New("transport: TLS identity needs a signer (the TPM device key): run `tpmagent key create`")
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	minVersion, err := parseMinTLS(opts.MinTLS)
	if err != nil {
		return nil, err
	}
	roots, err := loadCAFile(opts.CAFile)
	if err != nil {
		return nil, err
	}
	id := &TLSIdentity{
		opts:  opts,
		roots: roots,
		cache: newTLSSwappableCache(),
		log:   log,
	}
	ch, err := id.loadChain(newTLSCountingSigner(opts.Signer), opts.CertFile)
	if err != nil {
		return nil, err
	}
	id.chain = ch
	cfg := &tls.Config{
		MinVersion:           minVersion,
		RootCAs:              roots,
		ServerName:           opts.ServerName,
		ClientSessionCache:   id.cache,
		GetClientCertificate: id.getClientCertificate,
		KeyLogWriter:         opts.KeyLogWriter,
	}
	if minVersion == tls.VersionTLS12 {
		cfg.CipherSuites = TLS12CipherSuites
	}
	id.cfg = cfg
	if opts.KeyLogWriter != nil {
		log.Warn("transport: TLS key logging is ON: every session secret is written to the key log file; anyone with that file can decrypt the broker traffic. Use only for debugging and delete the file afterwards",
			"min_tls", tls.VersionName(minVersion))
	}
	return id, nil
}

// parseMinTLS maps broker.min_tls to a TLS version.
func parseMinTLS(s string) (uint16, error) {
	switch strings.TrimSpace(s) {
	case "", "1.3", "tls1.3", "TLS1.3":
		return tls.VersionTLS13, nil
	case "1.2", "tls1.2", "TLS1.2":
		return tls.VersionTLS12, nil
	}
	return 0, fmt.Errorf("transport: broker.min_tls %q is not supported: use \"1.3\" (default) or \"1.2\"", s)
}

// loadCAFile reads broker.ca_file into a pool.
func loadCAFile(path string) (*x509.CertPool, error) {
	if path == "" {
		return nil, errors.New("transport: broker.ca_file is empty: set it to the PEM file of the CA that signed the broker's certificate")
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("transport: broker.ca_file %s: %w", path, err)
	}
	pool := x509.NewCertPool()
	n := 0
	for _, der := range pemfile.CertificatesDER(b) {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("transport: broker.ca_file %s: certificate %d: %w", path, n+1, err)
		}
		pool.AddCert(c)
		n++
	}
	if n == 0 {
		return nil, fmt.Errorf("transport: broker.ca_file %s: no PEM CERTIFICATE block found: it must hold the broker's CA certificate", path)
	}
	return pool, nil
}

// loadChain reads broker.cert_file (path) and checks it against signer and the clock.
func (id *TLSIdentity) loadChain(signer *tlsCountingSigner, path string) (*tlsChain, error) {
	if path == "" {
		return nil, errors.New("transport: broker.cert_file is empty: set it to the device certificate (PEM) issued for the TPM key (tpmagent key csr)")
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("transport: broker.cert_file %s: %w", path, err)
	}
	ders := pemfile.CertificatesDER(b)
	if len(ders) == 0 {
		return nil, fmt.Errorf("transport: broker.cert_file %s: no PEM CERTIFICATE block found", path)
	}
	leaf, err := x509.ParseCertificate(ders[0])
	if err != nil {
		return nil, fmt.Errorf("transport: broker.cert_file %s: %w", path, err)
	}
	ch := &tlsChain{
		file:   path,
		leaf:   leaf,
		cert:   tls.Certificate{Certificate: ders, PrivateKey: signer, Leaf: leaf},
		signer: signer,
	}
	if err := id.checkChain(ch); err != nil {
		return nil, err
	}
	return ch, nil
}

// checkChain verifies that the certificate's key is the signer's key and that
// the certificate is valid now.
func (id *TLSIdentity) checkChain(ch *tlsChain) error {
	certFP, err := PublicKeyFingerprint(ch.leaf.PublicKey)
	if err != nil {
		return fmt.Errorf("transport: broker.cert_file %s: %w", ch.file, err)
	}
	keyFP, err := PublicKeyFingerprint(ch.signer.Public())
	if err != nil {
		return fmt.Errorf("transport: device key %s: %w", keyName(ch.signer.s), err)
	}
	if certFP != keyFP {
		return fmt.Errorf("transport: broker.cert_file %s: certificate public key (sha256 %s) is not the %s (sha256 %s): issue a certificate for this key (tpmagent key csr)",
			ch.file, certFP[:16], keyName(ch.signer.s), keyFP[:16])
	}
	now := id.opts.Now()
	if now.After(ch.leaf.NotAfter) {
		return fmt.Errorf("transport: broker.cert_file %s: certificate %q expired on %s (now %s): renew it (tpmagent key csr, have the CA sign it, replace the file)",
			ch.file, ch.leaf.Subject.String(), ch.leaf.NotAfter.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
	}
	if now.Before(ch.leaf.NotBefore) {
		return fmt.Errorf("transport: broker.cert_file %s: certificate %q is not valid before %s (now %s): check the device clock",
			ch.file, ch.leaf.Subject.String(), ch.leaf.NotBefore.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
	}
	return nil
}

// keyName describes a signer for messages: "TPM key at 0x81000100" when it
// exposes a handle, "device key" otherwise.
func keyName(s crypto.Signer) string {
	if h, ok := signerHandle(s); ok {
		return fmt.Sprintf("TPM key at 0x%08x", h)
	}
	return "device key"
}

// signerHandle returns the TPM handle of s if it exposes one.
func signerHandle(s crypto.Signer) (uint32, bool) {
	if h, ok := s.(interface{ Handle() uint32 }); ok {
		return h.Handle(), true
	}
	return 0, false
}

// PublicKeyFingerprint is the hex SHA-256 of the key's DER SubjectPublicKeyInfo
// (the fingerprint `tpmagent key show` prints).
func PublicKeyFingerprint(pub crypto.PublicKey) (string, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", fmt.Errorf("public key fingerprint: %w", err)
	}
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:]), nil
}

// Check re-checks the current certificate against the signer and the clock;
// call it before connecting. A server does not re-check expiry on a resumed
// session, so this is the place that notices an expired certificate.
func (id *TLSIdentity) Check() error {
	return id.checkChain(id.current())
}

func (id *TLSIdentity) current() *tlsChain {
	id.mu.Lock()
	defer id.mu.Unlock()
	return id.chain
}

// Config returns the shared client configuration (the same pointer each
// call): RootCAs from broker.ca_file, ServerName from broker.server_name (when
// empty, tls.Dial and paho take it from the URL host), the minimum version,
// the client certificate through GetClientCertificate, and the shared session
// cache. Do not modify it; Clone it to set a ServerName.
func (id *TLSIdentity) Config() *tls.Config { return id.cfg }

// ConfigFor returns a clone of Config with ServerName set to host unless
// broker.server_name overrides it. The clone shares the session cache.
func (id *TLSIdentity) ConfigFor(host string) *tls.Config {
	c := id.cfg.Clone()
	if c.ServerName == "" {
		c.ServerName = host
	}
	return c
}

// Leaf returns the device certificate currently in use.
func (id *TLSIdentity) Leaf() *x509.Certificate { return id.current().leaf }

// CertFile returns the certificate file in use: broker.cert_file, or the
// file the last Rotate named.
func (id *TLSIdentity) CertFile() string { return id.current().file }

// CAFile returns broker.ca_file.
func (id *TLSIdentity) CAFile() string { return id.opts.CAFile }

// Signatures returns how many signatures the current device key has made:
// the signer's own count (`Signatures() uint64`, cumulative in this process
// for a tpmkeys signer) if it has one, else the calls made through this
// identity. After Rotate it counts the new key.
func (id *TLSIdentity) Signatures() uint64 {
	cs := id.current().signer
	if s, ok := cs.s.(interface{ Signatures() uint64 }); ok {
		return s.Signatures()
	}
	return cs.n.Load()
}

// ResetSessionCache drops every cached TLS session: the next connection does a
// full handshake (one TPM signature). Call it after the certificate or the
// broker changes.
func (id *TLSIdentity) ResetSessionCache() { id.cache.reset() }

// ReloadCertificate re-reads the certificate file (broker.cert_file, or the
// one the last Rotate named), checks it against the current signer like
// NewTLSConfig does, uses it for the next full handshake and resets the
// session cache so that no session made with the old certificate resumes.
// On error the old certificate stays in use.
func (id *TLSIdentity) ReloadCertificate() error {
	cur := id.current()
	ch, err := id.loadChain(cur.signer, cur.file)
	if err != nil {
		return err
	}
	id.mu.Lock()
	id.chain = ch
	id.mu.Unlock()
	id.cache.reset()
	return nil
}

// getClientCertificate answers the broker's CertificateRequest.
func (id *TLSIdentity) getClientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	ch := id.current()
	if err := id.checkChain(ch); err != nil {
		return nil, err
	}
	c := ch.cert
	return &c, nil
}

// tlsCountingSigner wraps the device key: it counts signatures and refuses
// SHA-1 digests (which TLS 1.2 could otherwise ask for).
type tlsCountingSigner struct {
	s crypto.Signer
	n atomic.Uint64
}

func newTLSCountingSigner(s crypto.Signer) *tlsCountingSigner { return &tlsCountingSigner{s: s} }

// Public returns the device key's public half.
func (c *tlsCountingSigner) Public() crypto.PublicKey { return c.s.Public() }

// Sign signs digest with the device key.
func (c *tlsCountingSigner) Sign(r io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if opts != nil && opts.HashFunc() == crypto.SHA1 {
		return nil, errors.New("transport: refusing a SHA-1 signature with the device key")
	}
	c.n.Add(1)
	return c.s.Sign(r, digest, opts)
}

// tlsSwappableCache is a tls.ClientSessionCache whose contents can be dropped
// without modifying the tls.Config that holds it.
type tlsSwappableCache struct {
	cur atomic.Pointer[tls.ClientSessionCache]
}

func newTLSSwappableCache() *tlsSwappableCache {
	c := &tlsSwappableCache{}
	c.reset()
	return c
}

func (c *tlsSwappableCache) reset() {
	lru := tls.NewLRUClientSessionCache(sessionCacheSize)
	c.cur.Store(&lru)
}

// Get implements tls.ClientSessionCache.
func (c *tlsSwappableCache) Get(key string) (*tls.ClientSessionState, bool) {
	return (*c.cur.Load()).Get(key)
}

// Put implements tls.ClientSessionCache.
func (c *tlsSwappableCache) Put(key string, cs *tls.ClientSessionState) {
	(*c.cur.Load()).Put(key, cs)
}

// ParseBrokerURL validates one of broker.urls. TLS schemes are mqtts, ssl and
// tls (default port 8883); plaintext schemes tcp and mqtt (default port 1883)
// are refused unless allowPlaintext (broker.allow_plaintext) is set. It
// returns the lower-case scheme, host:port to dial and the host alone (for
// SNI and certificate checks).
func ParseBrokerURL(raw string, allowPlaintext bool) (scheme, hostport, host string, err error) {
	u, err := url.Parse(strings.TrimSpace(raw))
	if err != nil {
		return "", "", "", fmt.Errorf("transport: broker.urls %q: %w", raw, err)
	}
	scheme = strings.ToLower(u.Scheme)
	var defPort string
	switch scheme {
	case "mqtts", "ssl", "tls":
		defPort = "8883"
	case "tcp", "mqtt":
		if !allowPlaintext {
			return "", "", "", fmt.Errorf("transport: broker.urls %q is plaintext MQTT (no TLS, no client certificate, readable on the network): use mqtts://host:8883, or set broker.allow_plaintext: true to allow it", raw)
		}
		defPort = "1883"
	case "":
		return "", "", "", fmt.Errorf("transport: broker.urls %q has no scheme: write mqtts://host:8883", raw)
	default:
		return "", "", "", fmt.Errorf("transport: broker.urls %q: scheme %q is not supported: use mqtts:// (or ssl://, tls://)", raw, u.Scheme)
	}
	host = u.Hostname()
	if host == "" {
		return "", "", "", fmt.Errorf("transport: broker.urls %q has no host: write %s://host:%s", raw, scheme, defPort)
	}
	if u.Path != "" && u.Path != "/" {
		return "", "", "", fmt.Errorf("transport: broker.urls %q: a path is not allowed (websockets are not supported)", raw)
	}
	port := u.Port()
	if port == "" {
		port = defPort
	}
	return scheme, net.JoinHostPort(host, port), host, nil
}

// TLSError explains a failed TLS connection to a broker: Peer is host:port,
// Cause a short machine-friendly name (see the Cause* constants), and the
// message says what to do. Err is the underlying crypto/tls or net error.
type TLSError struct {
	Peer  string
	Cause string
	Msg   string
	Err   error
}

// Causes reported in TLSError.Cause.
const (
	CauseUnknownCA       = "unknown_ca"        // broker cert not signed by broker.ca_file
	CauseNameMismatch    = "name_mismatch"     // broker cert for another name
	CauseServerExpired   = "server_expired"    // broker cert expired or not yet valid
	CauseProtocolVersion = "protocol_version"  // no common TLS version
	CauseClientRejected  = "client_rejected"   // broker rejected our certificate
	CauseHandshake       = "handshake_failure" // other TLS failure
	CauseNetwork         = "network"           // TCP connect / IO failure
	CauseMQTTRefused     = "mqtt_refused"      // CONNACK with a non-zero code
)

// Error implements error.
func (e *TLSError) Error() string { return e.Msg }

// Unwrap returns the underlying error.
func (e *TLSError) Unwrap() error { return e.Err }

// ExplainTLSError turns an error from a TLS dial, handshake or the first read
// after it into a *TLSError naming the peer and the cause. afterHandshake
// says that the handshake had completed (in TLS 1.3 the broker's verdict on
// the client certificate arrives then, at the first read). Errors it does not
// recognise are wrapped with the peer name.
func (id *TLSIdentity) ExplainTLSError(peer string, err error, afterHandshake bool) error {
	if err == nil {
		return nil
	}
	var te *TLSError
	if errors.As(err, &te) {
		return err
	}
	mk := func(cause, format string, args ...any) error {
		return &TLSError{Peer: peer, Cause: cause, Msg: fmt.Sprintf(format, args...), Err: err}
	}
	caFile, certFile := id.opts.CAFile, id.current().file

	var unknown x509.UnknownAuthorityError
	var host x509.HostnameError
	var invalid x509.CertificateInvalidError
	switch {
	case errors.As(err, &unknown):
		leaf, top := "", ""
		if unknown.Cert != nil {
			top = unknown.Cert.Issuer.String()
		}
		var ve *tls.CertificateVerificationError
		if errors.As(err, &ve) && len(ve.UnverifiedCertificates) > 0 {
			leaf = ve.UnverifiedCertificates[0].Subject.String()
		}
		return mk(CauseUnknownCA, "transport: broker %s: its certificate %q (chain ending at issuer %q) is not signed by a CA in broker.ca_file %s: set broker.ca_file to the CA that signed the broker certificate (or check you reach the right broker)",
			peer, leaf, top, caFile)
	case errors.As(err, &host):
		var names []string
		if host.Certificate != nil {
			names = append(names, host.Certificate.DNSNames...)
			for _, ip := range host.Certificate.IPAddresses {
				names = append(names, ip.String())
			}
		}
		return mk(CauseNameMismatch, "transport: broker %s: its certificate is for %s, not for %q: connect with a name in the certificate or set broker.server_name to one",
			peer, strings.Join(names, ", "), host.Host)
	case errors.As(err, &invalid):
		if invalid.Reason == x509.Expired {
			return mk(CauseServerExpired, "transport: broker %s: its certificate is expired or not yet valid (%s): renew the broker certificate or fix the device clock", peer, invalid.Detail)
		}
		return mk(CauseHandshake, "transport: broker %s: its certificate is not acceptable: %v", peer, invalid)
	}

	var ve *tls.CertificateVerificationError
	if errors.As(err, &ve) {
		return mk(CauseHandshake, "transport: broker %s: certificate verification failed against broker.ca_file %s: %v", peer, caFile, ve.Err)
	}

	alert := remoteAlert(err)
	switch alert {
	case "protocol version not supported":
		return mk(CauseProtocolVersion, "transport: broker %s: no common TLS version (alert %q): the broker does not speak TLS %s or newer (broker.min_tls is %q): enable TLS 1.3 on the broker, or set broker.min_tls: \"1.2\" if you accept TLS 1.2",
			peer, alert, tls.VersionName(id.cfg.MinVersion)[4:], id.minTLS())
	case "unknown certificate authority", "bad certificate", "certificate required", "unsupported certificate", "certificate revoked", "certificate expired", "certificate unknown", "access denied", "decrypt error":
		return mk(CauseClientRejected, "transport: broker %s rejected the client certificate from broker.cert_file %s (%q, issued by %q) with alert %q: have it issued by a CA the broker trusts (its cafile), or add this CA to the broker",
			peer, certFile, id.Leaf().Subject.String(), id.Leaf().Issuer.String(), alert)
	case "handshake failure", "insufficient security":
		return mk(CauseHandshake, "transport: broker %s: TLS handshake failure (alert %q): no common cipher suite or key-exchange group; with broker.min_tls %q only ECDHE+AEAD suites are offered", peer, alert, id.minTLS())
	case "":
	default:
		return mk(CauseHandshake, "transport: broker %s: TLS alert %q", peer, alert)
	}
	if strings.Contains(err.Error(), "server selected unsupported protocol version") {
		return mk(CauseProtocolVersion, "transport: broker %s: the broker offered an older TLS version than broker.min_tls %q allows: enable TLS 1.3 on the broker, or set broker.min_tls: \"1.2\"", peer, id.minTLS())
	}
	var ne net.Error
	var oe *net.OpError
	if errors.Is(err, context.DeadlineExceeded) || errors.As(err, &ne) && ne.Timeout() {
		return mk(CauseNetwork, "transport: broker %s: timed out: %v", peer, err)
	}
	if afterHandshake && (errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) || strings.Contains(err.Error(), "connection reset")) {
		return mk(CauseClientRejected, "transport: broker %s rejected the client certificate from broker.cert_file %s (%q, issued by %q), most likely: it closed the connection right after the TLS handshake without an alert; see the broker log, and have the certificate issued by a CA the broker trusts: %v",
			peer, certFile, id.Leaf().Subject.String(), id.Leaf().Issuer.String(), err)
	}
	if errors.As(err, &oe) && oe.Op == "dial" {
		return mk(CauseNetwork, "transport: broker %s: cannot connect: %v: check broker.urls and that the broker is running", peer, oe.Err)
	}
	if strings.HasPrefix(err.Error(), "transport:") {
		return err
	}
	return mk(CauseHandshake, "transport: broker %s: TLS: %v", peer, err)
}

// minTLS returns the configured broker.min_tls as written, "1.3" by default.
func (id *TLSIdentity) minTLS() string {
	if id.opts.MinTLS == "" {
		return "1.3"
	}
	return id.opts.MinTLS
}

// remoteAlert returns the description of a TLS alert the peer sent ("unknown
// certificate authority"), or "" if err is not a received alert.
func remoteAlert(err error) string {
	var oe *net.OpError
	if errors.As(err, &oe) && oe.Op == "remote error" && oe.Err != nil {
		return strings.TrimPrefix(oe.Err.Error(), "tls: ")
	}
	return ""
}

// keyDescription names the algorithm of a public key ("ECDSA P-256").
func keyDescription(pub crypto.PublicKey) string {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		return "ECDSA " + k.Curve.Params().Name
	case *rsa.PublicKey:
		return fmt.Sprintf("RSA-%d", k.N.BitLen())
	case ed25519.PublicKey:
		return "Ed25519"
	}
	return fmt.Sprintf("%T", pub)
}
