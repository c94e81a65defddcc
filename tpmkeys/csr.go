package tpmkeys

import (
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
)

// CreateCSR returns a DER PKCS#10 certificate signing request for signer's public key with
// subject CN=cn and the DNS names in dns as subjectAltName entries (an entry that parses as
// an IP address becomes an IP SAN). With a *Key the signature is made inside the TPM:
// ECDSA-with-SHA256 for ECC keys, sha256WithRSAEncryption (PKCS#1 v1.5) for RSA keys.
func CreateCSR(signer crypto.Signer, cn string, dns []string) ([]byte, error) {
	if cn == "" {
		return nil, errors.New("tpmkeys: CSR: empty common name: pass the device id (--cn)")
	}
	tmpl := &x509.CertificateRequest{Subject: pkix.Name{CommonName: cn}}
	for _, n := range dns {
		if n == "" {
			return nil, errors.New("tpmkeys: CSR: empty DNS name")
		}
		if ip := net.ParseIP(n); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, signer)
	if err != nil {
		return nil, fmt.Errorf("tpmkeys: CSR for CN=%s: %w", cn, err)
	}
	return der, nil
}

// EncodeCSRPEM wraps a DER CSR in a "CERTIFICATE REQUEST" PEM block.
func EncodeCSRPEM(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

// PublicKeyPEM returns the key's SubjectPublicKeyInfo as a "PUBLIC KEY" PEM block (the
// format of `openssl pkey -pubout` and `tpm2_readpublic -f pem`).
func (k *Key) PublicKeyPEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: k.spki})
}
