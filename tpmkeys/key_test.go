package tpmkeys

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

var wantAttrs = []string{"fixedtpm", "fixedparent", "sensitivedataorigin", "userwithauth", "sign"}

func TestCreateLoadSign(t *testing.T) {
	sha256Digest := sha256.Sum256([]byte("hello"))
	sha384Digest := sha512.Sum384([]byte("hello"))
	for _, typ := range KeyTypes {
		t.Run(typ, func(t *testing.T) {
			tpm, _ := openSim(t)
			ctx := testCtx(t)
			res, err := tpm.CreateKey(ctx, KeySpec{Type: typ}, false)
			if err != nil {
				t.Fatal(err)
			}
			if !res.Created || !res.SRKCreated || res.Replaced || res.Handle != DefaultKeyHandle || res.SRKHandle != DefaultSRKHandle {
				t.Fatalf("CreateKey result = %+v", res)
			}
			k, err := tpm.OpenKey(ctx, KeySpec{Type: typ})
			if err != nil {
				t.Fatal(err)
			}
			if k.Type() != typ || k.Handle() != DefaultKeyHandle {
				t.Fatalf("key type %q handle 0x%x", k.Type(), k.Handle())
			}
			if got := k.Attributes(); !reflect.DeepEqual(got, wantAttrs) {
				t.Fatalf("Attributes() = %v, want %v", got, wantAttrs)
			}
			spki, _ := x509.MarshalPKIXPublicKey(k.Public())
			if fp := sha256.Sum256(spki); k.FingerprintSHA256() != fmt.Sprintf("%x", fp) {
				t.Fatalf("fingerprint %s", k.FingerprintSHA256())
			}

			type signCase struct {
				name   string
				digest []byte
				opts   crypto.SignerOpts
				verify func(sig []byte) error
			}
			var cases []signCase
			switch pub := k.Public().(type) {
			case *ecdsa.PublicKey:
				for _, c := range []struct {
					d []byte
					h crypto.Hash
				}{{sha256Digest[:], crypto.SHA256}, {sha384Digest[:], crypto.SHA384}} {
					cases = append(cases, signCase{"ecdsa-" + c.h.String(), c.d, c.h, func(sig []byte) error {
						if !ecdsa.VerifyASN1(pub, c.d, sig) {
							return errors.New("ecdsa.VerifyASN1 failed")
						}
						return nil
					}})
				}
			case *rsa.PublicKey:
				if pub.N.BitLen() != 2048 {
					t.Fatalf("RSA key has %d bits", pub.N.BitLen())
				}
				cases = append(cases,
					signCase{"pkcs1v15", sha256Digest[:], crypto.SHA256, func(sig []byte) error {
						return rsa.VerifyPKCS1v15(pub, crypto.SHA256, sha256Digest[:], sig)
					}},
					signCase{"pss-equalshash", sha256Digest[:], &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA256}, func(sig []byte) error {
						return rsa.VerifyPSS(pub, crypto.SHA256, sha256Digest[:], sig, &rsa.PSSOptions{SaltLength: 32})
					}},
					signCase{"pss-auto-sha384", sha384Digest[:], &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthAuto, Hash: crypto.SHA384}, func(sig []byte) error {
						return rsa.VerifyPSS(pub, crypto.SHA384, sha384Digest[:], sig, &rsa.PSSOptions{SaltLength: 48})
					}},
				)
			}
			for i, c := range cases {
				sig, err := k.Sign(nil, c.digest, c.opts)
				if err != nil {
					t.Fatalf("%s: %v", c.name, err)
				}
				if err := c.verify(sig); err != nil {
					t.Fatalf("%s: %v", c.name, err)
				}
				if got := k.Signatures(); got != uint64(i+1) {
					t.Fatalf("Signatures() = %d after %d", got, i+1)
				}
			}

			// Bad requests fail before the TPM and are not counted.
			n := k.Signatures()
			if _, err := k.Sign(nil, sha256Digest[:10], crypto.SHA256); err == nil {
				t.Fatal("short digest accepted")
			}
			if _, err := k.Sign(nil, sha256Digest[:], crypto.Hash(0)); err == nil {
				t.Fatal("raw signing accepted")
			}
			if _, ok := k.Public().(*rsa.PublicKey); ok {
				if _, err := k.Sign(nil, sha256Digest[:], &rsa.PSSOptions{SaltLength: 20, Hash: crypto.SHA256}); err == nil {
					t.Fatal("PSS salt length 20 accepted")
				}
			}
			if k.Signatures() != n {
				t.Fatal("failed signatures counted")
			}

			// Idempotent: a second create keeps the key.
			res, err = tpm.CreateKey(ctx, KeySpec{Type: typ}, false)
			if err != nil || res.Created || res.Replaced || res.SRKCreated {
				t.Fatalf("second CreateKey = %+v, %v", res, err)
			}
			k2, err := tpm.LoadKey(ctx, DefaultKeyHandle, DefaultSRKHandle)
			if err != nil {
				t.Fatal(err)
			}
			if k2.FingerprintSHA256() != k.FingerprintSHA256() {
				t.Fatal("idempotent CreateKey changed the key")
			}
			// force replaces it.
			res, err = tpm.CreateKey(ctx, KeySpec{Type: typ}, true)
			if err != nil || !res.Created || !res.Replaced {
				t.Fatalf("forced CreateKey = %+v, %v", res, err)
			}
			k3, err := tpm.LoadKey(ctx, DefaultKeyHandle, DefaultSRKHandle)
			if err != nil {
				t.Fatal(err)
			}
			if k3.FingerprintSHA256() == k.FingerprintSHA256() {
				t.Fatal("forced CreateKey kept the old key")
			}
			for _, kk := range []*Key{k, k2, k3} {
				if err := kk.Close(); err != nil {
					t.Fatal(err)
				}
			}
			if tr, se := loadedHandles(t, tpm); len(tr)+len(se) != 0 {
				t.Fatalf("left in the TPM: transient %x, sessions %x", tr, se)
			}
		})
	}
}

func TestCSRSignedInTPM(t *testing.T) {
	tpm, _ := openSim(t)
	ctx := testCtx(t)
	k := defaultKey(t, ctx, tpm)
	der, err := CreateCSR(k, "dev-0001", []string{"dev-0001.local", "127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		t.Fatal(err)
	}
	if err := csr.CheckSignature(); err != nil {
		t.Fatalf("CSR signature: %v", err)
	}
	if csr.Subject.CommonName != "dev-0001" || !slices.Equal(csr.DNSNames, []string{"dev-0001.local"}) || len(csr.IPAddresses) != 1 {
		t.Fatalf("CSR subject %v dns %v ip %v", csr.Subject, csr.DNSNames, csr.IPAddresses)
	}
	spki, _ := x509.MarshalPKIXPublicKey(csr.PublicKey)
	if !bytes.Equal(spki, k.PublicKeyDER()) {
		t.Fatal("CSR public key differs from the TPM key")
	}
	if k.Signatures() != 1 {
		t.Fatalf("Signatures() = %d", k.Signatures())
	}
	if !strings.HasPrefix(string(EncodeCSRPEM(der)), "-----BEGIN CERTIFICATE REQUEST-----") {
		t.Fatal("PEM")
	}
	if _, err := CreateCSR(k, "", nil); err == nil {
		t.Fatal("empty CN accepted")
	}
}

// TestLoadKeyRefuses puts objects that are not usable device keys at persistent handles, as
// another tool could, and checks that LoadKey refuses each with an error naming the handle,
// the attributes found and what to do.
func TestLoadKeyRefuses(t *testing.T) {
	tpm, _ := openSim(t)
	ctx := testCtx(t)
	ecc := func(attrs tpm2.TPMAObject, curve tpm2.TPMECCCurve, scheme tpm2.TPMTECCScheme, sym tpm2.TPMTSymDefObject) tpm2.TPMTPublic {
		return tpm2.TPMTPublic{
			Type: tpm2.TPMAlgECC, NameAlg: tpm2.TPMAlgSHA256, ObjectAttributes: attrs,
			Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
				Symmetric: sym, Scheme: scheme, CurveID: curve, KDF: tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
			}),
		}
	}
	null := tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull}
	nullScheme := tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull}
	ecdsaSHA256 := tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgECDSA, Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256})}
	base := signingAttributes
	decryptOnly := base
	decryptOnly.SignEncrypt, decryptOnly.Decrypt = false, true
	restricted := base
	restricted.Restricted = true
	policyOnly := base
	policyOnly.UserWithAuth = false

	cases := []struct {
		name    string
		handle  uint32
		tmpl    tpm2.TPMTPublic
		want    error
		wantMsg []string
	}{
		{"decrypt-only", 0x81000201, ecc(decryptOnly, tpm2.TPMECCNistP256, nullScheme, null), ErrNotSigningKey,
			[]string{"0x81000201", "decrypt", "no sign", "--force"}},
		{"restricted", 0x81000202, ecc(restricted, tpm2.TPMECCNistP256, ecdsaSHA256, null), ErrRestrictedKey,
			[]string{"0x81000202", "restricted|sign", "--force"}},
		{"p384", 0x81000203, ecc(base, tpm2.TPMECCNistP384, nullScheme, null), ErrUnsupportedKeyType,
			[]string{"0x81000203", "ecc-p384", "ecc-p256, rsa-2048"}},
		{"policy-only", 0x81000204, ecc(policyOnly, tpm2.TPMECCNistP256, nullScheme, null), ErrPolicyOnlyKey,
			[]string{"0x81000204", "no userwithauth"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			persistForeign(t, tpm, c.handle, c.tmpl)
			_, err := tpm.LoadKey(ctx, c.handle, DefaultSRKHandle)
			if !errors.Is(err, c.want) {
				t.Fatalf("LoadKey = %v, want %v", err, c.want)
			}
			for _, m := range c.wantMsg {
				if !strings.Contains(err.Error(), m) {
					t.Errorf("error %q does not mention %q", err, m)
				}
			}
			// CreateKey at that handle refuses too, and force replaces the object.
			if _, err := tpm.CreateKey(ctx, KeySpec{Handle: c.handle}, false); !errors.Is(err, c.want) {
				t.Fatalf("CreateKey over it = %v, want %v", err, c.want)
			}
			if res, err := tpm.CreateKey(ctx, KeySpec{Handle: c.handle}, true); err != nil || !res.Replaced {
				t.Fatalf("CreateKey --force = %+v, %v", res, err)
			}
			k, err := tpm.LoadKey(ctx, c.handle, DefaultSRKHandle)
			if err != nil {
				t.Fatal(err)
			}
			k.Close()
		})
	}

	// A foreign key with a fixed scheme (tpm2_create -G ecc256:ecdsa-sha256) is usable,
	// with that scheme only.
	persistForeign(t, tpm, 0x81000205, ecc(base, tpm2.TPMECCNistP256, ecdsaSHA256, null))
	k, err := tpm.LoadKey(ctx, 0x81000205, DefaultSRKHandle)
	if err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256([]byte("x"))
	sig, err := k.Sign(nil, d[:], crypto.SHA256)
	if err != nil || !ecdsa.VerifyASN1(k.Public().(*ecdsa.PublicKey), d[:], sig) {
		t.Fatalf("sign with fixed-scheme key: %v", err)
	}
	d384 := sha512.Sum384([]byte("x"))
	if _, err := k.Sign(nil, d384[:], crypto.SHA384); err == nil || !strings.Contains(err.Error(), "only allows") {
		t.Fatalf("SHA-384 with an ECDSA-SHA256 key: %v", err)
	}
}

func TestKeyErrors(t *testing.T) {
	tpm, _ := openSim(t)
	ctx := testCtx(t)

	_, err := tpm.LoadKey(ctx, DefaultKeyHandle, DefaultSRKHandle)
	if !errors.Is(err, ErrKeyNotFound) || !strings.Contains(err.Error(), "0x81000100") || !strings.Contains(err.Error(), "tpmagent key create") {
		t.Fatalf("missing key: %v", err)
	}
	if _, err := tpm.CreateKey(ctx, KeySpec{Type: "ed25519"}, false); !errors.Is(err, ErrUnsupportedKeyType) || !strings.Contains(err.Error(), "ed25519") {
		t.Fatalf("unknown type: %v", err)
	}
	if _, err := tpm.CreateKey(ctx, KeySpec{Handle: 0x01000100}, false); !errors.Is(err, ErrBadHandle) {
		t.Fatalf("non-persistent handle: %v", err)
	}
	if _, err := tpm.CreateKey(ctx, KeySpec{Handle: 0x81000002}, false); err == nil {
		t.Fatal("key handle == SRK handle accepted")
	}
	// Wrong type: an ECC key where RSA is configured.
	if _, err := tpm.CreateKey(ctx, KeySpec{Type: KeyTypeECCP256}, false); err != nil {
		t.Fatal(err)
	}
	_, err = tpm.CreateKey(ctx, KeySpec{Type: KeyTypeRSA2048}, false)
	if !errors.Is(err, ErrKeyTypeMismatch) || !strings.Contains(err.Error(), "ecc-p256") || !strings.Contains(err.Error(), "rsa-2048") {
		t.Fatalf("type mismatch on create: %v", err)
	}
	if _, err := tpm.OpenKey(ctx, KeySpec{Type: KeyTypeRSA2048}); !errors.Is(err, ErrKeyTypeMismatch) {
		t.Fatalf("type mismatch on open: %v", err)
	}
	// SRK handle holding a signing key is refused.
	if _, err := tpm.EnsureSRK(ctx, DefaultKeyHandle); err == nil || !strings.Contains(err.Error(), "not a storage key") {
		t.Fatalf("EnsureSRK on a signing key: %v", err)
	}
	if tr, se := loadedHandles(t, tpm); len(tr)+len(se) != 0 {
		t.Fatalf("left in the TPM: transient %x, sessions %x", tr, se)
	}
}

// TestSignAfterReset resets the TPM (a reboot: sessions are gone) between signatures.
func TestSignAfterReset(t *testing.T) {
	tpm, sim := openSim(t)
	ctx := testCtx(t)
	k := defaultKey(t, ctx, tpm)
	d := sha256.Sum256([]byte("x"))
	for i := 0; i < 3; i++ {
		if _, err := k.Sign(nil, d[:], crypto.SHA256); err != nil {
			t.Fatalf("sign %d: %v", i, err)
		}
		if err := sim.Reset(); err != nil {
			t.Fatal(err)
		}
	}
	if k.Signatures() != 3 || k.SessionStarts() != 3 {
		t.Fatalf("Signatures() = %d, SessionStarts() = %d, want 3 and 3 (a new session after each reset)", k.Signatures(), k.SessionStarts())
	}
}

func TestConcurrentSignNoLeaks(t *testing.T) {
	tpm, _ := openSim(t)
	ctx := testCtx(t)
	k := defaultKey(t, ctx, tpm)
	const workers, each = 8, 25
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < each; i++ {
				d := sha256.Sum256([]byte{byte(w), byte(i)})
				sig, err := k.SignContext(ctx, d[:], crypto.SHA256)
				if err == nil && !ecdsa.VerifyASN1(k.Public().(*ecdsa.PublicKey), d[:], sig) {
					err = errors.New("bad signature")
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if k.Signatures() != workers*each || k.SessionStarts() != 1 {
		t.Fatalf("Signatures() = %d, SessionStarts() = %d", k.Signatures(), k.SessionStarts())
	}
	tr, se := loadedHandles(t, tpm)
	if len(tr) != 0 || len(se) != 1 {
		t.Fatalf("while the key is open: transient %x, sessions %x; want none and the one signing session", tr, se)
	}
	k.Close()
	if tr, se := loadedHandles(t, tpm); len(tr)+len(se) != 0 {
		t.Fatalf("after Close: transient %x, sessions %x", tr, se)
	}
}

func TestTPMCloseFlushesSessions(t *testing.T) {
	tpm, sim := openSim(t)
	ctx := testCtx(t)
	k := defaultKey(t, ctx, tpm)
	d := sha256.Sum256([]byte("x"))
	if _, err := k.Sign(nil, d[:], crypto.SHA256); err != nil {
		t.Fatal(err)
	}
	// Close the TPM without closing the simulator underneath: look with a second wrapper.
	tpm.rt.next = transport.FromReadWriter(sim)
	if err := tpm.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := k.Sign(nil, d[:], crypto.SHA256); !errors.Is(err, ErrClosed) {
		t.Fatalf("sign after Close: %v", err)
	}
	if err := k.Close(); err != nil {
		t.Fatal(err)
	}
	other := OpenTransport(transport.FromReadWriter(sim), "simulator")
	if tr, se := loadedHandles(t, other); len(tr)+len(se) != 0 {
		t.Fatalf("after TPM.Close: transient %x, sessions %x", tr, se)
	}
}

// recordingTPM keeps a copy of every command sent.
type recordingTPM struct {
	next transport.TPM
	cmds [][]byte
}

func (r *recordingTPM) Send(cmd []byte) ([]byte, error) {
	r.cmds = append(r.cmds, append([]byte(nil), cmd...))
	return r.next.Send(cmd)
}

// TestSignParameterEncryption checks on the wire that the digest never travels in clear and
// that the session is salted with the SRK.
func TestSignParameterEncryption(t *testing.T) {
	tpm, _ := openSim(t)
	ctx := testCtx(t)
	k := defaultKey(t, ctx, tpm)
	rec := &recordingTPM{next: tpm.rt.next}
	tpm.rt.next = rec
	digests := [][]byte{}
	for i := 0; i < 3; i++ {
		d := sha256.Sum256([]byte{byte(i)})
		digests = append(digests, d[:])
		if _, err := k.Sign(nil, d[:], crypto.SHA256); err != nil {
			t.Fatal(err)
		}
	}
	var starts, signs int
	for _, c := range rec.cmds {
		cc := tpm2.TPMCC(binary.BigEndian.Uint32(c[6:10]))
		switch cc {
		case tpm2.TPMCCStartAuthSession:
			starts++
			if tpmKey := binary.BigEndian.Uint32(c[10:14]); tpmKey != DefaultSRKHandle {
				t.Errorf("StartAuthSession tpmKey = 0x%x, want the SRK 0x%x (salted)", tpmKey, DefaultSRKHandle)
			}
		case tpm2.TPMCCSign:
			signs++
			if binary.BigEndian.Uint32(c[10:14]) != DefaultKeyHandle {
				t.Errorf("Sign key handle 0x%x", binary.BigEndian.Uint32(c[10:14]))
			}
			// handle (4), authorization size (4), then TPMS_AUTH_COMMAND: session handle (4),
			// nonce (2+16), attributes (1).
			sessAttrs := c[14+4+4+2+16]
			if sessAttrs&0x20 == 0 || sessAttrs&0x01 == 0 {
				t.Errorf("Sign session attributes 0x%02x: want continueSession|decrypt (0x21)", sessAttrs)
			}
		}
		for _, d := range digests {
			if bytes.Contains(c, d) {
				t.Fatalf("digest %x sent in clear in command 0x%x", d, cc)
			}
		}
	}
	if starts != 1 || signs != 3 {
		t.Fatalf("%d StartAuthSession and %d Sign commands, want 1 and 3 (one reused session)", starts, signs)
	}
}
