package pemfile

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"strings"
	"testing"
)

func TestParseSigner(t *testing.T) {
	ec, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	rk, _ := rsa.GenerateKey(rand.Reader, 2048)
	pkcs8, _ := x509.MarshalPKCS8PrivateKey(ec)
	sec1, _ := x509.MarshalECPrivateKey(ec)
	cert := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{1, 2, 3}})
	cases := []struct {
		name string
		data []byte
		want string // "" = ok; else a substring of the error
	}{
		{"pkcs8", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: pkcs8}), ""},
		{"sec1 after a certificate", append(cert, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: sec1})...), ""},
		{"pkcs1", pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(rk)}), ""},
		{"only a certificate", cert, "no PEM private key"},
		{"not PEM", []byte("hello"), "no PEM private key"},
		{"damaged", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: pkcs8[:20]}), "PRIVATE KEY block"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s, err := ParseSigner(tc.data)
			if tc.want == "" {
				if err != nil || s == nil {
					t.Fatalf("got %v, %v", s, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want %q", err, tc.want)
			}
			if tc.want == "no PEM private key" && !errors.Is(err, ErrNoKey) {
				t.Fatalf("error %v is not ErrNoKey", err)
			}
		})
	}
}

func TestCertificatesDER(t *testing.T) {
	a := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{1}})
	k := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte{9}})
	b := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{2}})
	got := CertificatesDER(append(append(append([]byte{}, a...), k...), b...))
	if len(got) != 2 || got[0][0] != 1 || got[1][0] != 2 {
		t.Fatalf("got %v, want the two certificates in order", got)
	}
	if CertificatesDER([]byte("no pem")) != nil {
		t.Fatal("want nil for data without PEM")
	}
}
