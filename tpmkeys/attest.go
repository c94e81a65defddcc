package tpmkeys

import (
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// Key attestation (device side). The flow is described here and, from the CA side, in the
// fleet package documentation; in short:
//
//  1. Attest: the device reads its EK certificate from NV, derives the EK (TCG default
//     template, so its public key is the one in the certificate), derives an attestation key
//     (AK: a restricted signing primary in the owner hierarchy; the same template always
//     yields the same key, so a later ActivateCredential finds it again without persisting
//     it), makes a CSR with the device key and has the AK certify the device key
//     (TPM2_Certify, qualifying data = SHA-256 of the CSR). The result is an
//     AttestationBundle.
//  2. The CA checks the bundle and answers with a Challenge: a random secret wrapped with
//     MakeCredential to the EK's public key and bound to the AK's name.
//  3. ActivateCredential: only the TPM holding that EK, with that AK loaded, recovers the
//     secret (TPM2_ActivateCredential with the EK's PolicySecret(TPM_RH_ENDORSEMENT)
//     session). The device returns it in an ActivationResponse and the CA issues the
//     certificate.

// TCG EK Credential Profile 2.3 NV indices of the EK certificates and TCG provisioning
// guidance's persistent EK handles.
const (
	// EKCertIndexRSA is the NV index of the RSA-2048 EK certificate (template L-1).
	EKCertIndexRSA uint32 = 0x01c00002
	// EKCertIndexECC is the NV index of the ECC NIST P-256 EK certificate (template L-2).
	EKCertIndexECC uint32 = 0x01c0000a
	// EKHandleRSA is where provisioning tools (swtpm_setup, tpm2_createek) persist the RSA EK.
	EKHandleRSA uint32 = 0x81010001
	// EKHandleECC is where provisioning tools persist the ECC EK.
	EKHandleECC uint32 = 0x81010002
)

// BundleVersion is the version of the AttestationBundle, Challenge and ActivationResponse
// formats written by this package.
const BundleVersion = 1

// AttestationBundle is what a device sends to the fleet CA to ask for a certificate. Byte
// fields are TPM wire structures (TPM 2.0 Part 2) or DER; in JSON they are base64.
type AttestationBundle struct {
	Version  int    `json:"version"`
	DeviceID string `json:"device_id"`
	// EKCert is the DER endorsement key certificate read from NV (the manufacturer's).
	EKCert []byte `json:"ek_cert"`
	// EKPublic is the EK's TPMT_PUBLIC (its key must be the one in EKCert).
	EKPublic []byte `json:"ek_public"`
	// AKPublic is the attestation key's TPMT_PUBLIC.
	AKPublic []byte `json:"ak_public"`
	// KeyPublic is the certified device key's TPMT_PUBLIC.
	KeyPublic []byte `json:"key_public"`
	// CertifyInfo is the TPMS_ATTEST returned by TPM2_Certify (the signed bytes).
	CertifyInfo []byte `json:"certify_info"`
	// CertifySignature is the AK's TPMT_SIGNATURE over CertifyInfo.
	CertifySignature []byte `json:"certify_signature"`
	// CSR is the DER PKCS#10 request signed by the device key.
	CSR []byte `json:"csr"`
}

// Challenge is the CA's credential activation challenge for one bundle.
type Challenge struct {
	Version  int    `json:"version"`
	ID       string `json:"id"`
	DeviceID string `json:"device_id"`
	// AKName is the name the credential is bound to (for a clear error on the wrong TPM).
	AKName []byte `json:"ak_name"`
	// CredentialBlob is the TPM2B_ID_OBJECT contents and EncryptedSecret the
	// TPM2B_ENCRYPTED_SECRET contents made by MakeCredential to the EK.
	CredentialBlob  []byte `json:"credential_blob"`
	EncryptedSecret []byte `json:"encrypted_secret"`
}

// ActivationResponse carries the secret the TPM recovered from a Challenge.
type ActivationResponse struct {
	Version  int    `json:"version"`
	ID       string `json:"id"`
	DeviceID string `json:"device_id"`
	Secret   []byte `json:"secret"`
}

// AKTemplate returns the attestation key template: ECC NIST P-256, ECDSA with SHA-256,
// restricted signing (it signs only TPM-generated structures such as TPM2_Certify and
// TPM2_Quote output), fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|noDA.
func AKTemplate() tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgECC,
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{
			FixedTPM:            true,
			FixedParent:         true,
			SensitiveDataOrigin: true,
			UserWithAuth:        true,
			NoDA:                true,
			Restricted:          true,
			SignEncrypt:         true,
		},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme: tpm2.TPMTECCScheme{
				Scheme:  tpm2.TPMAlgECDSA,
				Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256}),
			},
			CurveID: tpm2.TPMECCNistP256,
			KDF:     tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
			// A label in the unique field keeps this primary apart from other tools' AKs
			// made from an otherwise identical template.
			X: tpm2.TPM2BECCParameter{Buffer: []byte("tpmagent-ak")},
		}),
	}
}

// ErrNoEKCertificate: neither EK certificate NV index holds a certificate.
var ErrNoEKCertificate = errors.New("no EK certificate in the TPM")

// EKCertificate returns the DER EK certificate stored in NV (RSA index first, then ECC).
func (t *TPM) EKCertificate(ctx context.Context) ([]byte, error) {
	var der []byte
	err := t.do(ctx, func(tp transport.TPM) error {
		var err error
		der, _, err = readEKCert(tp)
		return err
	})
	return der, err
}

// Attest makes an AttestationBundle for key with a CSR for CN=cn (and dns as SANs). Every
// transient object it creates (EK unless persisted, AK) is flushed on every path.
func (t *TPM) Attest(ctx context.Context, key *Key, cn string, dns []string) (*AttestationBundle, error) {
	if key == nil || key.tpm != t {
		return nil, errors.New("tpmkeys: attest: the key must be loaded from this TPM")
	}
	csr, err := CreateCSR(key, cn, dns)
	if err != nil {
		return nil, err
	}
	qual := sha256.Sum256(csr)
	b := &AttestationBundle{Version: BundleVersion, DeviceID: cn, CSR: csr, KeyPublic: tpm2.Marshal(key.public)}
	err = t.do(ctx, func(tp transport.TPM) error {
		ek, err := loadEK(tp)
		if err != nil {
			return err
		}
		defer ek.close(tp)
		b.EKCert = ek.cert
		b.EKPublic = tpm2.Marshal(ek.public)

		ak, err := loadAK(tp)
		if err != nil {
			return err
		}
		defer flush(tp, ak.handle)
		b.AKPublic = tpm2.Marshal(ak.public)

		cr, err := tpm2.Certify{
			ObjectHandle:   tpm2.AuthHandle{Handle: key.handle, Name: key.name, Auth: tpm2.PasswordAuth(nil)},
			SignHandle:     tpm2.AuthHandle{Handle: ak.handle, Name: ak.name, Auth: tpm2.PasswordAuth(nil)},
			QualifyingData: tpm2.TPM2BData{Buffer: qual[:]},
			InScheme:       tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
		}.Execute(tp)
		if err != nil {
			return fmt.Errorf("tpmkeys: certify key 0x%x with the attestation key: %w", uint32(key.handle), err)
		}
		b.CertifyInfo = cr.CertifyInfo.Bytes()
		b.CertifySignature = tpm2.Marshal(cr.Signature)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return b, nil
}

// ActivateCredential answers a CA challenge: it derives the EK and the AK again and runs
// TPM2_ActivateCredential with the EK's PolicySecret(TPM_RH_ENDORSEMENT) policy session. It
// fails when the challenge was made for another TPM (its AK name or EK differ). The policy
// session and all transient objects are flushed on every path.
func (t *TPM) ActivateCredential(ctx context.Context, ch *Challenge) (*ActivationResponse, error) {
	if ch == nil || len(ch.CredentialBlob) == 0 || len(ch.EncryptedSecret) == 0 {
		return nil, errors.New("tpmkeys: activate credential: empty challenge")
	}
	var secret []byte
	err := t.do(ctx, func(tp transport.TPM) error {
		ek, err := loadEK(tp)
		if err != nil {
			return err
		}
		defer ek.close(tp)
		ak, err := loadAK(tp)
		if err != nil {
			return err
		}
		defer flush(tp, ak.handle)
		if len(ch.AKName) > 0 && string(ch.AKName) != string(ak.name.Buffer) {
			return fmt.Errorf("tpmkeys: activate credential: challenge %s is bound to AK name %x, this TPM's AK is %x: "+
				"the challenge was made for another TPM's bundle", ch.ID, ch.AKName, ak.name.Buffer)
		}
		rsp, err := tpm2.ActivateCredential{
			ActivateHandle: tpm2.AuthHandle{Handle: ak.handle, Name: ak.name, Auth: tpm2.PasswordAuth(nil)},
			KeyHandle: tpm2.AuthHandle{Handle: ek.handle, Name: ek.name,
				Auth: tpm2.Policy(tpm2.TPMAlgSHA256, 16, ekPolicy)},
			CredentialBlob: tpm2.TPM2BIDObject{Buffer: ch.CredentialBlob},
			Secret:         tpm2.TPM2BEncryptedSecret{Buffer: ch.EncryptedSecret},
		}.Execute(tp)
		if err != nil {
			return fmt.Errorf("tpmkeys: activate credential %s: %w (the challenge was not made for this TPM's EK and AK)", ch.ID, err)
		}
		secret = rsp.CertInfo.Buffer
		return nil
	})
	if err != nil {
		return nil, err
	}
	return &ActivationResponse{Version: BundleVersion, ID: ch.ID, DeviceID: ch.DeviceID, Secret: secret}, nil
}

// ekPolicy satisfies the TCG default EK policy: PolicySecret(TPM_RH_ENDORSEMENT) with the
// (empty) endorsement hierarchy authorization.
func ekPolicy(tp transport.TPM, handle tpm2.TPMISHPolicy, nonceTPM tpm2.TPM2BNonce) error {
	_, err := tpm2.PolicySecret{
		AuthHandle:    tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
		PolicySession: handle,
		NonceTPM:      nonceTPM,
	}.Execute(tp)
	if err != nil {
		return fmt.Errorf("EK policy: PolicySecret(endorsement) (the endorsement hierarchy auth must be empty): %w", err)
	}
	return nil
}

// loadedObject is a key available in the TPM for the duration of one operation.
type loadedObject struct {
	handle    tpm2.TPMHandle
	name      tpm2.TPM2BName
	public    tpm2.TPMTPublic
	transient bool
	cert      []byte
}

func (o *loadedObject) close(tp transport.TPM) {
	if o.transient {
		flush(tp, o.handle)
	}
}

// loadAK creates the attestation key as a transient primary in the owner hierarchy.
func loadAK(tp transport.TPM) (*loadedObject, error) {
	cp, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(AKTemplate())}.Execute(tp)
	if err != nil {
		return nil, fmt.Errorf("tpmkeys: create attestation key (owner hierarchy; its auth must be empty): %w", err)
	}
	pub, err := cp.OutPublic.Contents()
	if err != nil {
		flush(tp, cp.ObjectHandle)
		return nil, fmt.Errorf("tpmkeys: attestation key: parse public area: %w", err)
	}
	return &loadedObject{handle: cp.ObjectHandle, name: cp.Name, public: *pub, transient: true}, nil
}

// loadEK reads the EK certificate and makes the matching EK available: the persistent EK at
// the TCG handle when its key is the certificate's, otherwise a transient primary made from
// the TCG default template (which a conforming TPM derives to the certified key).
func loadEK(tp transport.TPM) (*loadedObject, error) {
	der, idx, err := readEKCert(tp)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("tpmkeys: EK certificate in NV 0x%x does not parse: %w", idx, err)
	}
	tmpl, persistent := tpm2.RSAEKTemplate, EKHandleRSA
	if idx == EKCertIndexECC {
		tmpl, persistent = tpm2.ECCEKTemplate, EKHandleECC
	}
	if ki, err := readKey(tp, tpm2.TPMHandle(persistent)); err == nil {
		if pub, err := tpm2.Pub(ki.public); err == nil && samePublic(pub, cert.PublicKey) &&
			ki.public.ObjectAttributes.Restricted && ki.public.ObjectAttributes.Decrypt {
			return &loadedObject{handle: tpm2.TPMHandle(persistent), name: ki.name, public: ki.public, cert: der}, nil
		}
	}
	cp, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHEndorsement, InPublic: tpm2.New2B(tmpl)}.Execute(tp)
	if err != nil {
		return nil, fmt.Errorf("tpmkeys: create EK from the TCG default template (endorsement hierarchy; its auth must be empty): %w", err)
	}
	ek := &loadedObject{handle: cp.ObjectHandle, name: cp.Name, transient: true, cert: der}
	p, err := cp.OutPublic.Contents()
	if err != nil {
		ek.close(tp)
		return nil, fmt.Errorf("tpmkeys: EK: parse public area: %w", err)
	}
	ek.public = *p
	pub, err := tpm2.Pub(*p)
	if err != nil || !samePublic(pub, cert.PublicKey) {
		ek.close(tp)
		return nil, fmt.Errorf("tpmkeys: the EK derived from the TCG default template does not match the EK certificate "+
			"in NV 0x%x (issuer %s): the certificate is for another key template or another TPM", idx, cert.Issuer)
	}
	return ek, nil
}

func samePublic(a, b crypto.PublicKey) bool {
	e, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && e.Equal(b)
}

// readEKCert reads the RSA EK certificate, or the ECC one when there is none.
func readEKCert(tp transport.TPM) ([]byte, uint32, error) {
	for _, idx := range []uint32{EKCertIndexRSA, EKCertIndexECC} {
		der, err := readNV(tp, idx)
		if errors.Is(err, tpm2.TPMRCHandle) {
			continue
		}
		if err != nil {
			return nil, 0, fmt.Errorf("tpmkeys: read EK certificate from NV 0x%x: %w", idx, err)
		}
		return trimDER(der), idx, nil
	}
	return nil, 0, fmt.Errorf("tpmkeys: %w: NV 0x%x (RSA) and 0x%x (ECC) are empty; the TPM was not provisioned "+
		"with an EK certificate (swtpm: `swtpm_setup --tpm2 --create-ek-cert`)", ErrNoEKCertificate, EKCertIndexRSA, EKCertIndexECC)
}

// readNV reads a whole NV index with its own (empty) authorization, or the owner's when the
// index allows only that.
func readNV(tp transport.TPM, idx uint32) ([]byte, error) {
	rp, err := tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(idx)}.Execute(tp)
	if err != nil {
		return nil, err
	}
	pub, err := rp.NVPublic.Contents()
	if err != nil {
		return nil, err
	}
	nv := tpm2.NamedHandle{Handle: tpm2.TPMHandle(idx), Name: rp.NVName}
	auth := tpm2.AuthHandle{Handle: nv.Handle, Name: nv.Name, Auth: tpm2.PasswordAuth(nil)}
	if !pub.Attributes.AuthRead && pub.Attributes.OwnerRead {
		auth = tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)}
	}
	const chunk = 512
	out := make([]byte, 0, pub.DataSize)
	for off := 0; off < int(pub.DataSize); off += chunk {
		n := min(chunk, int(pub.DataSize)-off)
		r, err := tpm2.NVRead{AuthHandle: auth, NVIndex: nv, Size: uint16(n), Offset: uint16(off)}.Execute(tp)
		if err != nil {
			return nil, err
		}
		out = append(out, r.Data.Buffer...)
	}
	return out, nil
}

// trimDER cuts NV padding after a DER SEQUENCE (some TPMs pad certificates with zeros or
// 0xff).
func trimDER(b []byte) []byte {
	if len(b) < 4 || b[0] != 0x30 {
		return b
	}
	var n, hdr int
	switch {
	case b[1] < 0x80:
		n, hdr = int(b[1]), 2
	case b[1] == 0x81:
		n, hdr = int(b[2]), 3
	case b[1] == 0x82:
		n, hdr = int(b[2])<<8|int(b[3]), 4
	default:
		return b
	}
	if hdr+n <= len(b) {
		return b[:hdr+n]
	}
	return b
}
