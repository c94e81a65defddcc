package testenv

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// PKI is a lab certificate authority with files under Dir:
// ca.pem, ca.key, server.pem, server.key (for localhost and 127.0.0.1).
type PKI struct {
	Dir     string
	CA      *x509.Certificate
	CAKey   *ecdsa.PrivateKey
	CAFile  string
	CertPEM []byte // CA certificate PEM

	ServerCertFile string
	ServerKeyFile  string
}

// NewPKI makes a CA named cn and a server certificate for localhost under dir
// (t.TempDir() when dir is empty).
func NewPKI(t testing.TB, dir, cn string) *PKI {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(t),
		Subject:               pkix.Name{CommonName: cn, Organization: []string{"tpmagent lab"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(10 * 365 * 24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(der)
	p := &PKI{Dir: dir, CA: ca, CAKey: key, CAFile: filepath.Join(dir, "ca.pem")}
	p.CertPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	writeFile(t, p.CAFile, p.CertPEM, 0o644)
	writeKey(t, filepath.Join(dir, "ca.key"), key)
	p.ServerCertFile, p.ServerKeyFile = p.IssueServer(t, "server", []string{"localhost"}, []net.IP{net.ParseIP("127.0.0.1")}, time.Now().Add(24*time.Hour))
	return p
}

func serial(t testing.TB) *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func writeFile(t testing.TB, path string, b []byte, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, b, mode); err != nil {
		t.Fatal(err)
	}
}

func writeKey(t testing.TB, path string, key crypto.Signer) {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o644)
}

// IssueServer writes name.pem and name.key for a server certificate valid for
// the given DNS names and IPs until notAfter, and returns their paths.
func (p *PKI) IssueServer(t testing.TB, name string, dns []string, ips []net.IP, notAfter time.Time) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(t),
		Subject:      pkix.Name{CommonName: name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     notAfter,
		DNSNames:     dns,
		IPAddresses:  ips,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.CA, &key.PublicKey, p.CAKey)
	if err != nil {
		t.Fatal(err)
	}
	certFile = filepath.Join(p.Dir, name+".pem")
	keyFile = filepath.Join(p.Dir, name+".key")
	writeFile(t, certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
	writeKey(t, keyFile, key)
	return certFile, keyFile
}

// IssueClient signs a client certificate with common name cn for pub (a
// TPM-resident key's public half, say), valid from notBefore to notAfter,
// writes it to path as PEM and returns the parsed certificate.
func (p *PKI) IssueClient(t testing.TB, cn string, pub crypto.PublicKey, notBefore, notAfter time.Time, path string) *x509.Certificate {
	t.Helper()
	tmpl := &x509.Certificate{
		SerialNumber: serial(t),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    notBefore,
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.CA, pub, p.CAKey)
	if err != nil {
		t.Fatal(err)
	}
	if path != "" {
		writeFile(t, path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
	}
	c, _ := x509.ParseCertificate(der)
	return c
}

// SoftClient makes a software-key client identity with common name cn (for
// subscribers and peers in tests; devices use TPM keys) and writes
// cn.pem/cn.key under Dir. It returns the paths and a tls.Certificate.
func (p *PKI) SoftClient(t testing.TB, cn string) (certFile, keyFile string, cert tls.Certificate) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	certFile = filepath.Join(p.Dir, cn+".pem")
	keyFile = filepath.Join(p.Dir, cn+".key")
	c := p.IssueClient(t, cn, &key.PublicKey, time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour), certFile)
	writeKey(t, keyFile, key)
	return certFile, keyFile, tls.Certificate{Certificate: [][]byte{c.Raw}, PrivateKey: key, Leaf: c}
}

// Pool returns a cert pool holding the CA.
func (p *PKI) Pool() *x509.CertPool {
	pool := x509.NewCertPool()
	pool.AddCert(p.CA)
	return pool
}
