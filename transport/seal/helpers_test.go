package seal

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"testing"
	"time"
)

// testCA is an in-memory certificate authority for tests.
type testCA struct {
	key  crypto.Signer
	cert *x509.Certificate
	der  []byte
}

var serialNo int64

func newTestCA(t testing.TB, cn string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return selfSignedCA(t, cn, key, time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour))
}

func selfSignedCA(t testing.TB, cn string, key crypto.Signer, notBefore, notAfter time.Time) *testCA {
	t.Helper()
	serialNo++
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(serialNo),
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{key: key, cert: cert, der: der}
}

// issue returns a DER leaf certificate for pub with CN cn.
func (ca *testCA) issue(t testing.TB, cn string, pub crypto.PublicKey) []byte {
	t.Helper()
	return ca.issueAt(t, cn, pub, ca.cert.NotBefore, ca.cert.NotAfter)
}

func (ca *testCA) issueAt(t testing.TB, cn string, pub crypto.PublicKey, notBefore, notAfter time.Time) []byte {
	t.Helper()
	serialNo++
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serialNo),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    notBefore,
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, pub, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// intermediate returns a CA signed by ca.
func (ca *testCA) intermediate(t testing.TB, cn string) *testCA {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	serialNo++
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(serialNo),
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             ca.cert.NotBefore,
		NotAfter:              ca.cert.NotAfter,
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{key: key, cert: cert, der: der}
}

func (ca *testCA) pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.cert)
	return p
}

// testDevice is a device with a software ECDSA key (the same crypto.Signer
// code path as the TPM key).
type testDevice struct {
	id    string
	key   crypto.Signer
	chain [][]byte
}

func newTestDevice(t testing.TB, ca *testCA, id string) *testDevice {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return &testDevice{id: id, key: key, chain: [][]byte{ca.issue(t, id, key.Public())}}
}

// clock is a settable clock for Sealer and Collector options.
type clock struct{ t time.Time }

func (c *clock) Now() time.Time       { return c.t }
func (c *clock) Add(d time.Duration)  { c.t = c.t.Add(d) }
func newClock() *clock                { return &clock{t: time.Now()} }
func telemetryTopic(id string) string { return "devices/" + id + "/telemetry" }
func mustKey(t testing.TB, s Suite) *PrivateKey {
	t.Helper()
	k, err := GenerateCollectorKey(s)
	if err != nil {
		t.Fatal(err)
	}
	return k
}
