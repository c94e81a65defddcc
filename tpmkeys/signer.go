package tpmkeys

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"encoding/asn1"
	"errors"
	"fmt"
	"io"
	"math/big"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

var _ crypto.Signer = (*Key)(nil)

// Sign signs digest inside the TPM; it implements crypto.Signer and ignores rand (the TPM
// has its own RNG). It is SignContext with context.Background().
func (k *Key) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return k.SignContext(context.Background(), digest, opts)
}

// SignContext signs digest, which must be the output of opts.HashFunc() (SHA-1, SHA-256,
// SHA-384 or SHA-512; prehashed, never a raw message), inside the TPM:
//
//   - ECC keys return an ECDSA signature as ASN.1 DER SEQUENCE{r, s};
//   - RSA keys return PKCS#1 v1.5 (RSASSA) unless opts is *rsa.PSSOptions, then RSASSA-PSS
//     with MGF1 of the same hash and a salt as long as the hash (what TPM 2.0 implementations
//     following the reference code use, and what TLS 1.3 requires). opts.SaltLength must be
//     rsa.PSSSaltLengthEqualsHash, rsa.PSSSaltLengthAuto or the hash size.
//
// Every signature is verified against the public key before it is returned. ctx bounds the
// wait for the TPM lock and retry backoff; a command sent to the TPM runs to its end.
// The digest travels encrypted (AES-128-CFB session parameter encryption).
func (k *Key) SignContext(ctx context.Context, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if opts == nil {
		return nil, fmt.Errorf("tpmkeys: sign with key 0x%x: nil SignerOpts: pass the hash function", uint32(k.handle))
	}
	h := opts.HashFunc()
	hashAlg, err := tpmHash(h)
	if err != nil {
		return nil, fmt.Errorf("tpmkeys: sign with key 0x%x: %w", uint32(k.handle), err)
	}
	if len(digest) != h.Size() {
		return nil, fmt.Errorf("tpmkeys: sign with key 0x%x: digest is %d bytes, %v needs %d",
			uint32(k.handle), len(digest), h, h.Size())
	}
	pss, isPSS := opts.(*rsa.PSSOptions)
	if isPSS && pss.SaltLength != rsa.PSSSaltLengthEqualsHash && pss.SaltLength != rsa.PSSSaltLengthAuto && pss.SaltLength != h.Size() {
		return nil, fmt.Errorf("tpmkeys: sign with key 0x%x: PSS salt length %d not supported: the TPM uses "+
			"the hash length (%d)", uint32(k.handle), pss.SaltLength, h.Size())
	}
	scheme, err := k.sigScheme(hashAlg, isPSS)
	if err != nil {
		return nil, err
	}

	var sig tpm2.TPMTSignature
	err = k.tpm.do(ctx, func(tp transport.TPM) error {
		var err error
		for attempt := 0; attempt < 2; attempt++ {
			var sess tpm2.Session
			sess, err = k.session(tp)
			if err == nil {
				var rsp *tpm2.SignResponse
				rsp, err = tpm2.Sign{
					KeyHandle:  tpm2.AuthHandle{Handle: k.handle, Name: k.name, Auth: sess},
					Digest:     tpm2.TPM2BDigest{Buffer: digest},
					InScheme:   scheme,
					Validation: tpm2.TPMTTKHashCheck{Tag: tpm2.TPMSTHashCheck, Hierarchy: tpm2.TPMRHNull},
				}.Execute(tp)
				if err == nil {
					sig = rsp.Signature
					return nil
				}
			}
			// The session may be gone (TPM reset, reconnect) or out of step: forget it and
			// try once more with a fresh one, unless the TPM rejected a parameter.
			_ = k.dropSession(tp)
			if isParameterError(err) || ctx.Err() != nil {
				break
			}
		}
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("tpmkeys: sign with key 0x%x: %w", uint32(k.handle), err)
	}
	out, err := k.encodeAndVerify(sig, h, digest, isPSS && pss.SaltLength == rsa.PSSSaltLengthAuto)
	if err != nil {
		return nil, fmt.Errorf("tpmkeys: sign with key 0x%x: %w", uint32(k.handle), err)
	}
	k.sigs.Add(1)
	return out, nil
}

// session returns the key's signing session, starting it when needed: an HMAC session
// salted with the SRK (the salt is encrypted to the SRK's public key, so the session key is
// unknown to a bus observer) with AES-128-CFB encryption of the first command parameter.
// Response encryption (EncryptOut) is not used: TPM2_Sign's first response parameter is not
// a TPM2B and the TPM rejects it with TPM_RC_ATTRIBUTES.
func (k *Key) session(tp transport.TPM) (tpm2.Session, error) {
	if k.sess != nil {
		return k.sess, nil
	}
	sess, _, err := tpm2.HMACSession(tp, tpm2.TPMAlgSHA256, 16,
		tpm2.Salted(k.srkHandle, k.srkPub),
		tpm2.AESEncryption(128, tpm2.EncryptIn))
	if err != nil {
		return nil, fmt.Errorf("start salted session with SRK 0x%x: %w", uint32(k.srkHandle), err)
	}
	k.sess = sess
	k.sessionStarts.Add(1)
	return sess, nil
}

// dropSession flushes and forgets the signing session. Must run under the TPM lock.
func (k *Key) dropSession(tp transport.TPM) error {
	if k.sess == nil {
		return nil
	}
	h := k.sess.Handle()
	k.sess = nil
	if h == tpm2.TPMRHNull {
		return nil
	}
	_, err := tpm2.FlushContext{FlushHandle: h}.Execute(tp)
	return err
}

func isParameterError(err error) bool {
	var f tpm2.TPMFmt1Error
	if errors.As(err, &f) {
		isParam, _ := f.Parameter()
		return isParam
	}
	return false
}

func tpmHash(h crypto.Hash) (tpm2.TPMIAlgHash, error) {
	switch h {
	case crypto.SHA1:
		return tpm2.TPMAlgSHA1, nil
	case crypto.SHA256:
		return tpm2.TPMAlgSHA256, nil
	case crypto.SHA384:
		return tpm2.TPMAlgSHA384, nil
	case crypto.SHA512:
		return tpm2.TPMAlgSHA512, nil
	case 0:
		return 0, errors.New("unhashed (raw) signing is not supported: pass a SHA-2 digest")
	default:
		return 0, fmt.Errorf("hash %v not supported (SHA-1, SHA-256, SHA-384, SHA-512)", h)
	}
}

// sigScheme picks the TPM signature scheme. A key with a fixed scheme (e.g. made by
// tpm2-tools with -G ecc256:ecdsa-sha256) can only sign with that scheme and hash.
func (k *Key) sigScheme(hashAlg tpm2.TPMIAlgHash, pss bool) (tpm2.TPMTSigScheme, error) {
	var alg tpm2.TPMAlgID
	switch {
	case k.public.Type == tpm2.TPMAlgECC:
		alg = tpm2.TPMAlgECDSA
		if pss {
			return tpm2.TPMTSigScheme{}, fmt.Errorf("tpmkeys: sign with key 0x%x: PSS options for an ECC key", uint32(k.handle))
		}
	case pss:
		alg = tpm2.TPMAlgRSAPSS
	default:
		alg = tpm2.TPMAlgRSASSA
	}
	fixedAlg, fixedHash := k.fixedScheme()
	if fixedAlg != tpm2.TPMAlgNull && (fixedAlg != alg || fixedHash != hashAlg) {
		return tpm2.TPMTSigScheme{}, fmt.Errorf("tpmkeys: sign with key 0x%x: the key only allows scheme 0x%x "+
			"with hash 0x%x, asked for scheme 0x%x with hash 0x%x", uint32(k.handle), uint16(fixedAlg),
			uint16(fixedHash), uint16(alg), uint16(hashAlg))
	}
	return tpm2.TPMTSigScheme{
		Scheme:  alg,
		Details: tpm2.NewTPMUSigScheme(alg, &tpm2.TPMSSchemeHash{HashAlg: hashAlg}),
	}, nil
}

// fixedScheme returns the scheme and hash fixed in the key's public area, or TPM_ALG_NULL.
func (k *Key) fixedScheme() (tpm2.TPMAlgID, tpm2.TPMIAlgHash) {
	var s *tpm2.TPMUAsymScheme
	var alg tpm2.TPMAlgID
	switch k.public.Type {
	case tpm2.TPMAlgECC:
		d, err := k.public.Parameters.ECCDetail()
		if err != nil {
			return tpm2.TPMAlgNull, 0
		}
		alg, s = d.Scheme.Scheme, &d.Scheme.Details
	case tpm2.TPMAlgRSA:
		d, err := k.public.Parameters.RSADetail()
		if err != nil {
			return tpm2.TPMAlgNull, 0
		}
		alg, s = d.Scheme.Scheme, &d.Scheme.Details
	}
	switch alg {
	case tpm2.TPMAlgECDSA:
		if d, err := s.ECDSA(); err == nil {
			return alg, d.HashAlg
		}
	case tpm2.TPMAlgRSASSA:
		if d, err := s.RSASSA(); err == nil {
			return alg, d.HashAlg
		}
	case tpm2.TPMAlgRSAPSS:
		if d, err := s.RSAPSS(); err == nil {
			return alg, d.HashAlg
		}
	case tpm2.TPMAlgNull, 0:
		return tpm2.TPMAlgNull, 0
	}
	return alg, 0 // a scheme we cannot sign with (e.g. ECDAA, SM2): every request mismatches
}

// encodeAndVerify turns the TPM's signature into crypto.Signer form and checks it.
func (k *Key) encodeAndVerify(sig tpm2.TPMTSignature, h crypto.Hash, digest []byte, pssAuto bool) ([]byte, error) {
	switch pub := k.pub.(type) {
	case *ecdsa.PublicKey:
		e, err := sig.Signature.ECDSA()
		if err != nil {
			return nil, fmt.Errorf("TPM returned a non-ECDSA signature: %w", err)
		}
		der, err := asn1.Marshal(struct{ R, S *big.Int }{
			new(big.Int).SetBytes(e.SignatureR.Buffer), new(big.Int).SetBytes(e.SignatureS.Buffer),
		})
		if err != nil {
			return nil, err
		}
		if !ecdsa.VerifyASN1(pub, digest, der) {
			return nil, errors.New("the TPM's ECDSA signature does not verify with the key's public key")
		}
		return der, nil
	case *rsa.PublicKey:
		switch sig.SigAlg {
		case tpm2.TPMAlgRSASSA:
			s, err := sig.Signature.RSASSA()
			if err != nil {
				return nil, err
			}
			if err := rsa.VerifyPKCS1v15(pub, h, digest, s.Sig.Buffer); err != nil {
				return nil, fmt.Errorf("the TPM's PKCS#1 v1.5 signature does not verify: %w", err)
			}
			return s.Sig.Buffer, nil
		case tpm2.TPMAlgRSAPSS:
			s, err := sig.Signature.RSAPSS()
			if err != nil {
				return nil, err
			}
			salt := rsa.PSSSaltLengthEqualsHash
			if pssAuto {
				salt = rsa.PSSSaltLengthAuto
			}
			if err := rsa.VerifyPSS(pub, h, digest, s.Sig.Buffer, &rsa.PSSOptions{SaltLength: salt, Hash: h}); err != nil {
				return nil, fmt.Errorf("the TPM's PSS signature does not verify with salt length = hash length "+
					"(this TPM may use another salt length): %w", err)
			}
			return s.Sig.Buffer, nil
		default:
			return nil, fmt.Errorf("TPM returned signature algorithm 0x%x for an RSA key", uint16(sig.SigAlg))
		}
	default:
		return nil, fmt.Errorf("unexpected public key type %T", k.pub)
	}
}
