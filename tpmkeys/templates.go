package tpmkeys

import (
	"fmt"

	"github.com/google/go-tpm/tpm2"
)

// Key types accepted in KeySpec.Type and the `tpm.key_type` setting.
const (
	KeyTypeECCP256 = "ecc-p256"
	KeyTypeRSA2048 = "rsa-2048"
)

// KeyTypes lists the supported key types, default first.
var KeyTypes = []string{KeyTypeECCP256, KeyTypeRSA2048}

// SRKTemplate returns the TCG reference ECC P-256 storage root key template (TCG TPM v2.0
// Provisioning Guidance, 7.5.1): restricted decrypt, AES-128-CFB, noDA, empty auth.
// tpm2-tools' `tpm2_createprimary -C o -G ecc256:aes128cfb` creates the same key.
func SRKTemplate() tpm2.TPMTPublic { return tpm2.ECCSRKTemplate }

// signingAttributes are the device key's attributes: bound to this TPM and to its parent
// (never duplicable), generated inside the TPM, usable with its (empty) auth value in an HMAC
// session, unrestricted signing.
var signingAttributes = tpm2.TPMAObject{
	FixedTPM:            true,
	FixedParent:         true,
	SensitiveDataOrigin: true,
	UserWithAuth:        true,
	SignEncrypt:         true,
}

// DeviceKeyTemplate returns the public template of a device key of the given type. The
// signing scheme is TPM_ALG_NULL so that the caller chooses per signature: ECDSA with SHA-256,
// SHA-384 or SHA-512; RSA PKCS#1 v1.5 or PSS.
func DeviceKeyTemplate(keyType string) (tpm2.TPMTPublic, error) {
	switch keyType {
	case KeyTypeECCP256:
		return tpm2.TPMTPublic{
			Type:             tpm2.TPMAlgECC,
			NameAlg:          tpm2.TPMAlgSHA256,
			ObjectAttributes: signingAttributes,
			Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
				Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
				Scheme:    tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
				CurveID:   tpm2.TPMECCNistP256,
				KDF:       tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
			}),
		}, nil
	case KeyTypeRSA2048:
		return tpm2.TPMTPublic{
			Type:             tpm2.TPMAlgRSA,
			NameAlg:          tpm2.TPMAlgSHA256,
			ObjectAttributes: signingAttributes,
			Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &tpm2.TPMSRSAParms{
				Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
				Scheme:    tpm2.TPMTRSAScheme{Scheme: tpm2.TPMAlgNull},
				KeyBits:   2048,
			}),
		}, nil
	default:
		return tpm2.TPMTPublic{}, fmt.Errorf("%w: %q (supported: %s, %s)", ErrUnsupportedKeyType, keyType, KeyTypeECCP256, KeyTypeRSA2048)
	}
}

// keyTypeOf names the type of a public area: "ecc-p256", "rsa-2048", or a description of an
// unsupported type such as "ecc-p384", "rsa-3072", "keyedhash".
func keyTypeOf(pub *tpm2.TPMTPublic) (name string, supported bool) {
	switch pub.Type {
	case tpm2.TPMAlgECC:
		d, err := pub.Parameters.ECCDetail()
		if err != nil {
			return "ecc", false
		}
		switch d.CurveID {
		case tpm2.TPMECCNistP256:
			return KeyTypeECCP256, true
		case tpm2.TPMECCNistP384:
			return "ecc-p384", false
		case tpm2.TPMECCNistP521:
			return "ecc-p521", false
		default:
			return fmt.Sprintf("ecc-curve-0x%x", uint16(d.CurveID)), false
		}
	case tpm2.TPMAlgRSA:
		d, err := pub.Parameters.RSADetail()
		if err != nil {
			return "rsa", false
		}
		name := fmt.Sprintf("rsa-%d", d.KeyBits)
		return name, name == KeyTypeRSA2048
	case tpm2.TPMAlgKeyedHash:
		return "keyedhash", false
	case tpm2.TPMAlgSymCipher:
		return "symcipher", false
	default:
		return fmt.Sprintf("alg-0x%x", uint16(pub.Type)), false
	}
}

// attributeNames returns the set object attributes in tpm2-tools' order and spelling
// (`tpm2_readpublic` prints them joined by '|').
func attributeNames(a tpm2.TPMAObject) []string {
	var out []string
	add := func(set bool, name string) {
		if set {
			out = append(out, name)
		}
	}
	add(a.FixedTPM, "fixedtpm")
	add(a.STClear, "stclear")
	add(a.FixedParent, "fixedparent")
	add(a.SensitiveDataOrigin, "sensitivedataorigin")
	add(a.UserWithAuth, "userwithauth")
	add(a.AdminWithPolicy, "adminwithpolicy")
	add(a.FirmwareLimited, "firmwarelimited")
	add(a.NoDA, "noda")
	add(a.EncryptedDuplication, "encryptedduplication")
	add(a.Restricted, "restricted")
	add(a.Decrypt, "decrypt")
	add(a.SignEncrypt, "sign")
	add(a.X509Sign, "x509sign")
	return out
}
