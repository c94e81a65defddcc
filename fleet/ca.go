package fleet

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha1"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/tpmagent/tpmagent/internal/pemfile"
)

// CASigner is the fleet CA's signing key and certificate. FileSigner keeps the key in a
// PEM file (lab); a PKCS#11 or TPM-held CA key fits by implementing crypto.Signer.
type CASigner interface {
	crypto.Signer
	// Certificate returns the CA certificate whose key signs.
	Certificate() *x509.Certificate
}

// FileSigner is a CASigner whose private key is a PEM file.
type FileSigner struct {
	crypto.Signer
	cert *x509.Certificate
}

// Certificate implements CASigner.
func (f *FileSigner) Certificate() *x509.Certificate { return f.cert }

// LoadFileSigner reads a CA certificate (PEM) and its private key (PEM: PKCS#8, SEC 1 or
// PKCS#1) and checks that they belong together and that the certificate is a CA.
func LoadFileSigner(certFile, keyFile string) (*FileSigner, error) {
	certs, err := ReadCertificates(certFile)
	if err != nil {
		return nil, err
	}
	cert := certs[0]
	if !cert.IsCA {
		return nil, fmt.Errorf("fleet: CA certificate %s (%s) is not a CA certificate (basicConstraints CA:TRUE)", certFile, cert.Subject)
	}
	key, err := readPrivateKey(keyFile)
	if err != nil {
		return nil, err
	}
	if !samePublic(key.Public(), cert.PublicKey) {
		return nil, fmt.Errorf("fleet: CA key %s does not belong to CA certificate %s", keyFile, certFile)
	}
	return &FileSigner{Signer: key, cert: cert}, nil
}

// ReadCertificates reads all PEM certificates of a file (at least one).
func ReadCertificates(path string) ([]*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("fleet: read certificates: %w", err)
	}
	var out []*x509.Certificate
	for _, der := range pemfile.CertificatesDER(b) {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("fleet: %s: certificate %d: %w", path, len(out)+1, err)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		// DER (swtpm writes EK certificates as DER .crt files).
		if c, err := x509.ParseCertificate(b); err == nil {
			return []*x509.Certificate{c}, nil
		}
		return nil, fmt.Errorf("fleet: %s: no PEM certificate found", path)
	}
	return out, nil
}

// CertPoolFromFiles builds a pool from every certificate in the files (the trusted
// manufacturer CAs, e.g. swtpm-localca's root and issuer certificates).
func CertPoolFromFiles(paths ...string) (*x509.CertPool, error) {
	pool := x509.NewCertPool()
	n := 0
	for _, p := range paths {
		certs, err := ReadCertificates(p)
		if err != nil {
			return nil, err
		}
		for _, c := range certs {
			pool.AddCert(c)
			n++
		}
	}
	if n == 0 {
		return nil, errors.New("fleet: no trusted manufacturer CA certificates given")
	}
	return pool, nil
}

func readPrivateKey(path string) (crypto.Signer, error) {
	s, err := pemfile.LoadSigner(path)
	if err != nil {
		return nil, fmt.Errorf("fleet: key: %w", err)
	}
	return s, nil
}

// DefaultValidity is the lifetime of a device certificate.
const DefaultValidity = 365 * 24 * time.Hour

// CA issues device client certificates.
type CA struct {
	Signer CASigner
	// Validity of issued certificates (DefaultValidity when 0); capped at the CA's NotAfter.
	Validity time.Duration
	// Now is the clock (time.Now when nil).
	Now func() time.Time
}

func (c *CA) now() time.Time {
	if c.Now != nil {
		return c.Now()
	}
	return time.Now()
}

// Issue signs a client certificate for a verified bundle: subject CN = device id, the CSR's
// key, digitalSignature, extKeyUsage clientAuth, a random 128-bit serial.
func (c *CA) Issue(v *Verified) (*x509.Certificate, error) {
	return c.IssueFor(v.DeviceID, v.CSR.PublicKey, x509.ExtKeyUsageClientAuth, nil, nil)
}

// IssueFor signs a certificate for pub with CN=cn and the given extended key usage (and, for
// servers, DNS names and IPs). The CA's own MQTT identity and the lab broker use it.
func (c *CA) IssueFor(cn string, pub crypto.PublicKey, eku x509.ExtKeyUsage, dns []string, ips []net.IP) (*x509.Certificate, error) {
	if c.Signer == nil {
		return nil, errors.New("fleet: CA has no signer")
	}
	ca := c.Signer.Certificate()
	validity := c.Validity
	if validity <= 0 {
		validity = DefaultValidity
	}
	now := c.now()
	notAfter := now.Add(validity)
	if notAfter.After(ca.NotAfter) {
		notAfter = ca.NotAfter
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial.Add(serial, big.NewInt(1)),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    now.Add(-time.Minute),
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{eku},
		DNSNames:     dns,
		IPAddresses:  ips,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, pub, c.Signer)
	if err != nil {
		return nil, fmt.Errorf("fleet: issue certificate for %s: %w", cn, err)
	}
	return x509.ParseCertificate(der)
}

// EncodeCertPEM returns the certificates as consecutive PEM blocks.
func EncodeCertPEM(certs ...*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out
}

// Files of a CA directory made by InitCA.
const (
	CACertFile     = "ca.pem"
	CAKeyFile      = "ca.key"
	BrokerCertFile = "broker.pem"
	BrokerKeyFile  = "broker.key"
	// ServiceCertFile/ServiceKeyFile are the CA service's own MQTT identity (CN ServiceUser).
	ServiceCertFile = "fleet-ca.pem"
	ServiceKeyFile  = "fleet-ca.key"
	// ServiceUser is the MQTT user name (certificate CN) of the CA service.
	ServiceUser = "fleet-ca"
)

// InitCA creates a lab fleet CA in dir unless ca.pem and ca.key exist already (then they
// are reused: created is false): an ECDSA P-256 CA valid 10 years, a broker server
// certificate for brokerNames (DNS names or IPs) and the CA service's client identity.
// Private keys are written with mode 0600.
func InitCA(dir, cn string, brokerNames []string) (created bool, err error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return false, fmt.Errorf("fleet: CA directory: %w", err)
	}
	certPath, keyPath := filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile)
	var signer *FileSigner
	if _, err := os.Stat(certPath); err == nil {
		signer, err = LoadFileSigner(certPath, keyPath)
		if err != nil {
			return false, fmt.Errorf("fleet: reuse CA in %s: %w", dir, err)
		}
	} else if errors.Is(err, fs.ErrNotExist) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return false, err
		}
		skid, _ := x509.MarshalPKIXPublicKey(&key.PublicKey)
		ski := sha1.Sum(skid)
		now := time.Now()
		tmpl := &x509.Certificate{
			SerialNumber:          big.NewInt(now.UnixNano()),
			Subject:               pkix.Name{CommonName: cn, Organization: []string{"tpmagent fleet"}},
			NotBefore:             now.Add(-time.Hour),
			NotAfter:              now.Add(10 * 365 * 24 * time.Hour),
			IsCA:                  true,
			BasicConstraintsValid: true,
			MaxPathLenZero:        true,
			KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
			SubjectKeyId:          ski[:],
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
		if err != nil {
			return false, err
		}
		cert, _ := x509.ParseCertificate(der)
		if err := writeKey(keyPath, key); err != nil {
			return false, err
		}
		if err := os.WriteFile(certPath, EncodeCertPEM(cert), 0o644); err != nil {
			return false, err
		}
		signer = &FileSigner{Signer: key, cert: cert}
		created = true
	} else {
		return false, err
	}
	ca := &CA{Signer: signer, Validity: 5 * 365 * 24 * time.Hour}
	if _, err := os.Stat(filepath.Join(dir, BrokerCertFile)); created || errors.Is(err, fs.ErrNotExist) {
		var dns []string
		var ips []net.IP
		for _, n := range brokerNames {
			if ip := net.ParseIP(n); ip != nil {
				ips = append(ips, ip)
			} else if n != "" {
				dns = append(dns, n)
			}
		}
		if err := issueFileIdentity(ca, dir, BrokerCertFile, BrokerKeyFile, "broker", x509.ExtKeyUsageServerAuth, dns, ips); err != nil {
			return created, err
		}
	}
	if _, err := os.Stat(filepath.Join(dir, ServiceCertFile)); created || errors.Is(err, fs.ErrNotExist) {
		if err := issueFileIdentity(ca, dir, ServiceCertFile, ServiceKeyFile, ServiceUser, x509.ExtKeyUsageClientAuth, nil, nil); err != nil {
			return created, err
		}
	}
	return created, nil
}

func issueFileIdentity(ca *CA, dir, certName, keyName, cn string, eku x509.ExtKeyUsage, dns []string, ips []net.IP) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	cert, err := ca.IssueFor(cn, &key.PublicKey, eku, dns, ips)
	if err != nil {
		return err
	}
	if err := writeKey(filepath.Join(dir, keyName), key); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, certName), EncodeCertPEM(cert), 0o644)
}

func writeKey(path string, key crypto.Signer) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		return fmt.Errorf("fleet: write key: %w", err)
	}
	return os.Chmod(path, 0o600)
}
