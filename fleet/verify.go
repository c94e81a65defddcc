package fleet

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"encoding/hex"
	"errors"
	"fmt"
	"math/big"
	"strings"

	"github.com/google/go-tpm/tpm2"

	"github.com/tpmagent/tpmagent/tpmkeys"
)

// Reasons a bundle or an activation is refused (Refusal.Reason).
const (
	// ReasonMalformed: a field is missing or does not parse.
	ReasonMalformed = "malformed"
	// ReasonEKUntrusted: the EK certificate does not chain to a trusted manufacturer CA.
	ReasonEKUntrusted = "ek_untrusted"
	// ReasonEKMismatch: the EK public area is not the certified EK or not an EK.
	ReasonEKMismatch = "ek_mismatch"
	// ReasonBadAK: the attestation key is not a restricted fixedTPM signing key.
	ReasonBadAK = "bad_ak"
	// ReasonNotCertified: no valid TPM2_Certify by the AK: the key is not shown to be in a TPM
	// (a plain software key).
	ReasonNotCertified = "not_certified"
	// ReasonKeyNotFixed: the certified key is in the TPM but can leave it or was made outside
	// (no fixedTPM|fixedParent|sensitiveDataOrigin): a software key loaded into the TPM.
	ReasonKeyNotFixed = "key_not_fixed"
	// ReasonCSRMismatch: the CSR's key is not the certified key, or the certification is
	// for another CSR.
	ReasonCSRMismatch = "csr_mismatch"
	// ReasonBadCSR: the CSR's own signature or subject is wrong.
	ReasonBadCSR = "bad_csr"
	// ReasonActivation: the credential activation answer is wrong, late or reused.
	ReasonActivation = "activation_failed"
)

// Refusal is the error returned when the CA refuses a bundle or an activation response.
type Refusal struct {
	DeviceID string
	Reason   string // one of the Reason constants
	Detail   string
}

func (r *Refusal) Error() string {
	return fmt.Sprintf("fleet: refused device %q: %s: %s", r.DeviceID, r.Reason, r.Detail)
}

func refuse(id, reason, format string, args ...any) *Refusal {
	return &Refusal{DeviceID: id, Reason: reason, Detail: fmt.Sprintf(format, args...)}
}

// ReasonOf returns the Refusal reason of err, or "" when err is not a refusal.
func ReasonOf(err error) string {
	var r *Refusal
	if errors.As(err, &r) {
		return r.Reason
	}
	return ""
}

// Verified is an accepted bundle: everything the challenge and the issuance need.
type Verified struct {
	DeviceID string
	CSR      *x509.CertificateRequest
	EKCert   *x509.Certificate
	EKPublic tpm2.TPMTPublic
	AKName   []byte
	// KeyFingerprint is the SHA-256 of the device key's DER SubjectPublicKeyInfo (hex).
	KeyFingerprint string
	// EKFingerprint is the SHA-256 of the EK's DER SubjectPublicKeyInfo (hex): the TPM's
	// identity, stable across keys and certificates.
	EKFingerprint string
	// BundleDigest is SHA-256 over the bundle's fields; a challenge is tied to it.
	BundleDigest [32]byte
}

// oidSubjectAltName is the SAN extension. TCG EK certificates carry the TPM manufacturer,
// model and version as a critical SAN directoryName, which crypto/x509 leaves unhandled.
var oidSubjectAltName = asn1.ObjectIdentifier{2, 5, 29, 17}

// Verify checks an attestation bundle against the trusted manufacturer (EK) CAs. Any
// certificate in trustedManufacturers is an anchor; intermediates are taken from it as well.
// It returns a *Refusal naming the reason when the bundle must not get a certificate.
func Verify(b *tpmkeys.AttestationBundle, trustedManufacturers *x509.CertPool) (*Verified, error) {
	if b == nil {
		return nil, refuse("", ReasonMalformed, "empty bundle")
	}
	id := b.DeviceID
	if id == "" {
		return nil, refuse(id, ReasonMalformed, "no device_id")
	}
	if b.Version != tpmkeys.BundleVersion {
		return nil, refuse(id, ReasonMalformed, "bundle version %d, this CA reads version %d", b.Version, tpmkeys.BundleVersion)
	}
	if trustedManufacturers == nil {
		return nil, errors.New("fleet: verify: no trusted manufacturer CAs configured (--manufacturer-ca)")
	}
	v := &Verified{DeviceID: id, BundleDigest: bundleDigest(b)}

	// 1. The EK certificate chains to a manufacturer we trust.
	if len(b.EKCert) == 0 {
		return nil, refuse(id, ReasonMalformed, "no EK certificate in the bundle")
	}
	ekCert, err := x509.ParseCertificate(b.EKCert)
	if err != nil {
		return nil, refuse(id, ReasonMalformed, "EK certificate does not parse: %v", err)
	}
	check := *ekCert
	check.UnhandledCriticalExtensions = nil
	for _, oid := range ekCert.UnhandledCriticalExtensions {
		if !oid.Equal(oidSubjectAltName) {
			check.UnhandledCriticalExtensions = append(check.UnhandledCriticalExtensions, oid)
		}
	}
	if _, err := check.Verify(x509.VerifyOptions{
		Roots:         trustedManufacturers,
		Intermediates: trustedManufacturers,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	}); err != nil {
		return nil, refuse(id, ReasonEKUntrusted, "EK certificate (issuer %q, serial %s) does not chain to a trusted "+
			"manufacturer CA: %v", ekCert.Issuer.String(), ekCert.SerialNumber, err)
	}
	v.EKCert = ekCert
	if spki, err := x509.MarshalPKIXPublicKey(ekCert.PublicKey); err == nil {
		sum := sha256.Sum256(spki)
		v.EKFingerprint = hex.EncodeToString(sum[:])
	}

	// 2. The EK public area is that certified key and an EK (restricted decryption, fixedTPM).
	ekPub, err := tpm2.Unmarshal[tpm2.TPMTPublic](b.EKPublic)
	if err != nil {
		return nil, refuse(id, ReasonMalformed, "EK public area does not parse: %v", err)
	}
	ekKey, err := tpm2.Pub(*ekPub)
	if err != nil || !samePublic(ekKey, ekCert.PublicKey) {
		return nil, refuse(id, ReasonEKMismatch, "the EK public area is not the key of the EK certificate")
	}
	if a := ekPub.ObjectAttributes; !a.FixedTPM || !a.FixedParent || !a.Restricted || !a.Decrypt || a.SignEncrypt {
		return nil, refuse(id, ReasonEKMismatch, "EK attributes %s are not an endorsement key's", attrString(a))
	}
	v.EKPublic = *ekPub

	// 3. The AK is a restricted signing key bound to its TPM.
	akPub, err := tpm2.Unmarshal[tpm2.TPMTPublic](b.AKPublic)
	if err != nil {
		return nil, refuse(id, ReasonMalformed, "AK public area does not parse: %v", err)
	}
	if a := akPub.ObjectAttributes; !a.FixedTPM || !a.FixedParent || !a.SensitiveDataOrigin || !a.Restricted ||
		!a.SignEncrypt || a.Decrypt {
		return nil, refuse(id, ReasonBadAK, "AK attributes %s: need fixedtpm|fixedparent|sensitivedataorigin|restricted|sign",
			attrString(a))
	}
	akName, err := tpm2.ObjectName(akPub)
	if err != nil {
		return nil, refuse(id, ReasonBadAK, "AK name: %v", err)
	}
	v.AKName = akName.Buffer
	akKey, err := tpm2.Pub(*akPub)
	if err != nil {
		return nil, refuse(id, ReasonBadAK, "AK public key: %v", err)
	}

	// 4. The CSR is well-formed and self-signed by its key.
	csr, err := x509.ParseCertificateRequest(b.CSR)
	if err != nil {
		return nil, refuse(id, ReasonBadCSR, "CSR does not parse: %v", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, refuse(id, ReasonBadCSR, "CSR signature: %v", err)
	}
	if csr.Subject.CommonName != id {
		return nil, refuse(id, ReasonBadCSR, "CSR subject CN %q is not the device id %q", csr.Subject.CommonName, id)
	}
	v.CSR = csr
	if spki, err := x509.MarshalPKIXPublicKey(csr.PublicKey); err == nil {
		sum := sha256.Sum256(spki)
		v.KeyFingerprint = hex.EncodeToString(sum[:])
	}

	// 5. The AK certified a key in its TPM (TPM2_Certify, signature by the AK).
	if len(b.CertifyInfo) == 0 || len(b.CertifySignature) == 0 {
		return nil, refuse(id, ReasonNotCertified, "no TPM2_Certify of the key by the attestation key: the CSR's key "+
			"is not shown to live in a TPM (a plain software key?)")
	}
	sig, err := tpm2.Unmarshal[tpm2.TPMTSignature](b.CertifySignature)
	if err != nil {
		return nil, refuse(id, ReasonNotCertified, "certify signature does not parse: %v", err)
	}
	if err := verifyTPMSignature(akKey, b.CertifyInfo, sig); err != nil {
		return nil, refuse(id, ReasonNotCertified, "the certify structure is not signed by the attestation key: %v", err)
	}
	att, err := tpm2.Unmarshal[tpm2.TPMSAttest](b.CertifyInfo)
	if err != nil {
		return nil, refuse(id, ReasonNotCertified, "certify structure does not parse: %v", err)
	}
	if att.Magic != tpm2.TPMGeneratedValue || att.Type != tpm2.TPMSTAttestCertify {
		return nil, refuse(id, ReasonNotCertified, "signed structure is not a TPM-generated TPM2_Certify result")
	}
	ci, err := att.Attested.Certify()
	if err != nil {
		return nil, refuse(id, ReasonNotCertified, "certify info: %v", err)
	}

	// 6. The certified object is the key in KeyPublic, fixed to the TPM.
	keyPub, err := tpm2.Unmarshal[tpm2.TPMTPublic](b.KeyPublic)
	if err != nil {
		return nil, refuse(id, ReasonMalformed, "key public area does not parse: %v", err)
	}
	keyName, err := tpm2.ObjectName(keyPub)
	if err != nil || !bytes.Equal(keyName.Buffer, ci.Name.Buffer) {
		return nil, refuse(id, ReasonNotCertified, "the certified object (name %x) is not the key in the bundle", ci.Name.Buffer)
	}
	if a := keyPub.ObjectAttributes; !a.FixedTPM || !a.FixedParent || !a.SensitiveDataOrigin {
		return nil, refuse(id, ReasonKeyNotFixed, "the certified key has attributes %s: it lacks "+
			"fixedtpm|fixedparent|sensitivedataorigin, so it was made outside the TPM or can leave it", attrString(a))
	}
	if a := keyPub.ObjectAttributes; !a.SignEncrypt || a.Restricted {
		return nil, refuse(id, ReasonKeyNotFixed, "the certified key has attributes %s: not an unrestricted signing key", attrString(a))
	}

	// 7. The CSR is for that key, and the certification was made for this CSR.
	certifiedKey, err := tpm2.Pub(*keyPub)
	if err != nil || !samePublic(certifiedKey, csr.PublicKey) {
		return nil, refuse(id, ReasonCSRMismatch, "the CSR's public key (%s) is not the TPM-certified key", describeKey(csr.PublicKey))
	}
	qual := sha256.Sum256(b.CSR)
	if !bytes.Equal(att.ExtraData.Buffer, qual[:]) {
		return nil, refuse(id, ReasonCSRMismatch, "the certification's qualifying data is not the SHA-256 of this CSR")
	}
	return v, nil
}

// verifyTPMSignature checks a TPM signature (ECDSA or RSASSA/RSAPSS with SHA-256) over msg.
func verifyTPMSignature(pub crypto.PublicKey, msg []byte, sig *tpm2.TPMTSignature) error {
	digest := sha256.Sum256(msg)
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		s, err := sig.Signature.ECDSA()
		if err != nil || sig.SigAlg != tpm2.TPMAlgECDSA {
			return fmt.Errorf("signature algorithm 0x%x for an ECC key", uint16(sig.SigAlg))
		}
		if s.Hash != tpm2.TPMAlgSHA256 {
			return fmt.Errorf("hash 0x%x, want SHA-256", uint16(s.Hash))
		}
		r, ss := new(big.Int).SetBytes(s.SignatureR.Buffer), new(big.Int).SetBytes(s.SignatureS.Buffer)
		if !ecdsa.Verify(k, digest[:], r, ss) {
			return errors.New("ECDSA signature does not verify")
		}
		return nil
	case *rsa.PublicKey:
		switch sig.SigAlg {
		case tpm2.TPMAlgRSASSA:
			s, err := sig.Signature.RSASSA()
			if err != nil {
				return err
			}
			return rsa.VerifyPKCS1v15(k, crypto.SHA256, digest[:], s.Sig.Buffer)
		case tpm2.TPMAlgRSAPSS:
			s, err := sig.Signature.RSAPSS()
			if err != nil {
				return err
			}
			return rsa.VerifyPSS(k, crypto.SHA256, digest[:], s.Sig.Buffer, nil)
		}
		return fmt.Errorf("signature algorithm 0x%x for an RSA key", uint16(sig.SigAlg))
	default:
		return fmt.Errorf("unsupported AK key type %T", pub)
	}
}

func samePublic(a, b crypto.PublicKey) bool {
	e, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && e.Equal(b)
}

func describeKey(pub crypto.PublicKey) string {
	spki, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return fmt.Sprintf("%T", pub)
	}
	sum := sha256.Sum256(spki)
	return fmt.Sprintf("%T sha256:%x", pub, sum[:8])
}

func attrString(a tpm2.TPMAObject) string {
	var out []string
	add := func(set bool, name string) {
		if set {
			out = append(out, name)
		}
	}
	add(a.FixedTPM, "fixedtpm")
	add(a.FixedParent, "fixedparent")
	add(a.SensitiveDataOrigin, "sensitivedataorigin")
	add(a.UserWithAuth, "userwithauth")
	add(a.AdminWithPolicy, "adminwithpolicy")
	add(a.Restricted, "restricted")
	add(a.Decrypt, "decrypt")
	add(a.SignEncrypt, "sign")
	if len(out) == 0 {
		return "(none)"
	}
	return strings.Join(out, "|")
}

// bundleDigest hashes every field of the bundle (length-prefixed) so that a challenge and
// its pending state belong to exactly one bundle.
func bundleDigest(b *tpmkeys.AttestationBundle) [32]byte {
	h := sha256.New()
	for _, f := range [][]byte{[]byte(b.DeviceID), b.EKCert, b.EKPublic, b.AKPublic, b.KeyPublic, b.CertifyInfo,
		b.CertifySignature, b.CSR} {
		var l [4]byte
		l[0], l[1], l[2], l[3] = byte(len(f)>>24), byte(len(f)>>16), byte(len(f)>>8), byte(len(f))
		h.Write(l[:])
		h.Write(f)
	}
	var out [32]byte
	copy(out[:], h.Sum(nil))
	return out
}
