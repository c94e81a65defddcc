package tpmkeys

import (
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// Errors returned (wrapped, with the handle and what to do) by CreateKey, LoadKey and OpenKey.
var (
	// ErrKeyNotFound: nothing is stored at the persistent handle.
	ErrKeyNotFound = errors.New("no key at handle")
	// ErrNotSigningKey: the object at the handle lacks the sign attribute.
	ErrNotSigningKey = errors.New("not a signing key")
	// ErrRestrictedKey: the key is a restricted signing key (it only signs TPM-made data such as
	// quotes, not arbitrary digests).
	ErrRestrictedKey = errors.New("restricted signing key")
	// ErrPolicyOnlyKey: the key lacks userWithAuth, so it needs a policy session this package
	// does not build.
	ErrPolicyOnlyKey = errors.New("key requires policy authorization")
	// ErrUnsupportedKeyType: the key (or KeySpec.Type) is neither ECC P-256 nor RSA-2048.
	ErrUnsupportedKeyType = errors.New("unsupported key type")
	// ErrKeyTypeMismatch: the key at the handle is of another supported type than requested.
	ErrKeyTypeMismatch = errors.New("key type differs from the configured type")
	// ErrBadHandle: the handle is not a persistent handle (0x81000000–0x81FFFFFF).
	ErrBadHandle = errors.New("not a persistent handle")
)

// KeySpec names a device key: where it lives and what it is. Zero fields take the defaults
// (DefaultKeyHandle, DefaultSRKHandle, KeyTypeECCP256).
type KeySpec struct {
	Handle    uint32
	SRKHandle uint32
	Type      string // KeyTypeECCP256 or KeyTypeRSA2048
}

func (s KeySpec) withDefaults() (KeySpec, error) {
	if s.Handle == 0 {
		s.Handle = DefaultKeyHandle
	}
	if s.SRKHandle == 0 {
		s.SRKHandle = DefaultSRKHandle
	}
	if s.Type == "" {
		s.Type = KeyTypeECCP256
	}
	if err := checkPersistent(s.Handle); err != nil {
		return s, err
	}
	if err := checkPersistent(s.SRKHandle); err != nil {
		return s, err
	}
	if s.Handle == s.SRKHandle {
		return s, fmt.Errorf("tpmkeys: key handle and SRK handle are both 0x%x: choose different handles", s.Handle)
	}
	if _, err := DeviceKeyTemplate(s.Type); err != nil {
		return s, fmt.Errorf("tpmkeys: key type: %w", err)
	}
	return s, nil
}

func checkPersistent(h uint32) error {
	if h>>24 != 0x81 {
		return fmt.Errorf("tpmkeys: handle 0x%x: %w: use one in 0x81000000–0x81FFFFFF", h, ErrBadHandle)
	}
	return nil
}

// CreateResult reports what CreateKey did.
type CreateResult struct {
	Handle    uint32
	SRKHandle uint32
	Type      string
	// Created is false when a usable key of the requested type already was at Handle and was
	// kept (CreateKey is idempotent).
	Created bool
	// Replaced is true when force evicted an existing object at Handle first.
	Replaced bool
	// SRKCreated is true when the SRK was absent and has been created.
	SRKCreated bool
}

// EnsureSRK makes sure the storage root key exists at the persistent handle: it creates the
// TCG reference ECC P-256 SRK there (TPM2_CreatePrimary in the owner hierarchy, then
// TPM2_EvictControl) only when the handle is empty. An object there that is not a
// restricted decryption (storage) key is an error. created reports whether it was created.
// The owner hierarchy's authorization must be empty.
func (t *TPM) EnsureSRK(ctx context.Context, handle uint32) (created bool, err error) {
	if err := checkPersistent(handle); err != nil {
		return false, err
	}
	err = t.do(ctx, func(tp transport.TPM) error {
		_, _, created, err = ensureSRK(tp, tpm2.TPMHandle(handle))
		return err
	})
	return created, err
}

func ensureSRK(tp transport.TPM, h tpm2.TPMHandle) (pub tpm2.TPMTPublic, name tpm2.TPM2BName, created bool, err error) {
	rp, err := tpm2.ReadPublic{ObjectHandle: h}.Execute(tp)
	if err == nil {
		p, err := rp.OutPublic.Contents()
		if err != nil {
			return pub, name, false, fmt.Errorf("tpmkeys: SRK 0x%x: parse public area: %w", uint32(h), err)
		}
		a := p.ObjectAttributes
		if !a.Restricted || !a.Decrypt || a.SignEncrypt || (p.Type != tpm2.TPMAlgECC && p.Type != tpm2.TPMAlgRSA) {
			typ, _ := keyTypeOf(p)
			return pub, name, false, fmt.Errorf("tpmkeys: SRK handle 0x%x holds an object of type %s with attributes %s, "+
				"not a storage key (restricted|decrypt): set tpm.srk_handle to a free handle or remove it "+
				"(tpm2_evictcontrol -C o -c 0x%x)", uint32(h), typ, strings.Join(attributeNames(a), "|"), uint32(h))
		}
		return *p, rp.Name, false, nil
	}
	if !errors.Is(err, tpm2.TPMRCHandle) {
		return pub, name, false, fmt.Errorf("tpmkeys: read SRK 0x%x: %w", uint32(h), err)
	}
	cp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.TPMRHOwner,
		InPublic:      tpm2.New2B(SRKTemplate()),
	}.Execute(tp)
	if err != nil {
		return pub, name, false, fmt.Errorf("tpmkeys: create SRK (owner hierarchy; its auth must be empty): %w", err)
	}
	defer flush(tp, cp.ObjectHandle)
	if _, err := (tpm2.EvictControl{
		Auth:             tpm2.TPMRHOwner,
		ObjectHandle:     tpm2.NamedHandle{Handle: cp.ObjectHandle, Name: cp.Name},
		PersistentHandle: h,
	}).Execute(tp); err != nil {
		return pub, name, false, fmt.Errorf("tpmkeys: persist SRK at 0x%x: %w", uint32(h), err)
	}
	p, err := cp.OutPublic.Contents()
	if err != nil {
		return pub, name, false, fmt.Errorf("tpmkeys: SRK 0x%x: parse public area: %w", uint32(h), err)
	}
	return *p, cp.Name, true, nil
}

// keyInfo is what ReadPublic tells about a persistent key.
type keyInfo struct {
	public tpm2.TPMTPublic
	name   tpm2.TPM2BName
	typ    string
}

// readKey reads the public area at h; ErrKeyNotFound when the handle is empty.
func readKey(tp transport.TPM, h tpm2.TPMHandle) (*keyInfo, error) {
	rp, err := tpm2.ReadPublic{ObjectHandle: h}.Execute(tp)
	if errors.Is(err, tpm2.TPMRCHandle) {
		return nil, fmt.Errorf("tpmkeys: %w 0x%x: run `tpmagent key create` to create the device key "+
			"(or set tpm.key_handle to the handle of an existing signing key)", ErrKeyNotFound, uint32(h))
	}
	if err != nil {
		return nil, fmt.Errorf("tpmkeys: read public area of 0x%x: %w", uint32(h), err)
	}
	p, err := rp.OutPublic.Contents()
	if err != nil {
		return nil, fmt.Errorf("tpmkeys: parse public area of 0x%x: %w", uint32(h), err)
	}
	// Check that the name the TPM reports matches the public area it returned.
	if n, err := tpm2.ObjectName(p); err != nil || string(n.Buffer) != string(rp.Name.Buffer) {
		return nil, fmt.Errorf("tpmkeys: key 0x%x: the TPM's name does not match its public area", uint32(h))
	}
	typ, _ := keyTypeOf(p)
	return &keyInfo{public: *p, name: rp.Name, typ: typ}, nil
}

// usable checks that the key can serve as the device key's signer.
func (ki *keyInfo) usable(h tpm2.TPMHandle) error {
	a := ki.public.ObjectAttributes
	attrs := strings.Join(attributeNames(a), "|")
	what := fmt.Sprintf("handle 0x%x holds an object of type %s with attributes %s", uint32(h), ki.typ, attrs)
	fix := fmt.Sprintf("set tpm.key_handle to a signing key, or replace it with `tpmagent key create --force` "+
		"(or evict it: tpm2_evictcontrol -C o -c 0x%x)", uint32(h))
	if !a.SignEncrypt {
		return fmt.Errorf("tpmkeys: %w: %s (no sign): %s", ErrNotSigningKey, what, fix)
	}
	if a.Restricted {
		return fmt.Errorf("tpmkeys: %w: %s (restricted keys sign only TPM-generated data, not a TLS "+
			"handshake or a CSR): %s", ErrRestrictedKey, what, fix)
	}
	if _, ok := keyTypeOf(&ki.public); !ok {
		return fmt.Errorf("tpmkeys: %w: %s (supported: %s, %s): %s", ErrUnsupportedKeyType, what,
			KeyTypeECCP256, KeyTypeRSA2048, fix)
	}
	if !a.UserWithAuth {
		return fmt.Errorf("tpmkeys: %w: %s (no userwithauth): %s", ErrPolicyOnlyKey, what, fix)
	}
	return nil
}

// CreateKey creates the device key of spec.Type as a child of the SRK (creating the SRK
// first when absent) and persists it at spec.Handle. It is idempotent: when a usable key of
// the requested type already is at spec.Handle, it is kept and the result says Created=false.
// An object of another type or a non-signing object at the handle is an error unless force
// is set; force evicts whatever is at spec.Handle and creates a new key (the old private key
// is gone for good). The transient copy of the new key is flushed on every path.
func (t *TPM) CreateKey(ctx context.Context, spec KeySpec, force bool) (CreateResult, error) {
	spec, err := spec.withDefaults()
	if err != nil {
		return CreateResult{}, err
	}
	tmpl, _ := DeviceKeyTemplate(spec.Type)
	res := CreateResult{Handle: spec.Handle, SRKHandle: spec.SRKHandle, Type: spec.Type}
	kh := tpm2.TPMHandle(spec.Handle)
	err = t.do(ctx, func(tp transport.TPM) error {
		_, srkName, srkCreated, err := ensureSRK(tp, tpm2.TPMHandle(spec.SRKHandle))
		if err != nil {
			return err
		}
		res.SRKCreated = srkCreated

		ki, err := readKey(tp, kh)
		switch {
		case errors.Is(err, ErrKeyNotFound):
		case err != nil:
			return err
		case force:
			if _, err := (tpm2.EvictControl{
				Auth:             tpm2.TPMRHOwner,
				ObjectHandle:     tpm2.NamedHandle{Handle: kh, Name: ki.name},
				PersistentHandle: kh,
			}).Execute(tp); err != nil {
				return fmt.Errorf("tpmkeys: evict existing key 0x%x: %w", spec.Handle, err)
			}
			res.Replaced = true
		default:
			if err := ki.usable(kh); err != nil {
				return err
			}
			if ki.typ != spec.Type {
				return fmt.Errorf("tpmkeys: %w: handle 0x%x holds a key of type %s, configured tpm.key_type is %s: "+
					"set tpm.key_type: %s to use it, or replace it with `tpmagent key create --force`",
					ErrKeyTypeMismatch, spec.Handle, ki.typ, spec.Type, ki.typ)
			}
			return nil // kept
		}

		parent := tpm2.AuthHandle{Handle: tpm2.TPMHandle(spec.SRKHandle), Name: srkName, Auth: tpm2.PasswordAuth(nil)}
		cr, err := tpm2.Create{ParentHandle: parent, InPublic: tpm2.New2B(tmpl)}.Execute(tp)
		if err != nil {
			return fmt.Errorf("tpmkeys: create %s key under SRK 0x%x: %w", spec.Type, spec.SRKHandle, err)
		}
		lr, err := tpm2.Load{ParentHandle: parent, InPrivate: cr.OutPrivate, InPublic: cr.OutPublic}.Execute(tp)
		if err != nil {
			return fmt.Errorf("tpmkeys: load new %s key: %w", spec.Type, err)
		}
		defer flush(tp, lr.ObjectHandle)
		if _, err := (tpm2.EvictControl{
			Auth:             tpm2.TPMRHOwner,
			ObjectHandle:     tpm2.NamedHandle{Handle: lr.ObjectHandle, Name: lr.Name},
			PersistentHandle: kh,
		}).Execute(tp); err != nil {
			return fmt.Errorf("tpmkeys: persist key at 0x%x: %w", spec.Handle, err)
		}
		res.Created = true
		return nil
	})
	return res, err
}

// LoadKey opens the signing key persisted at handle, whether CreateKey or another tool
// (tpm2-tools) made it. The key must be an unrestricted ECC P-256 or RSA-2048 signing key
// with userWithAuth and an empty auth value; otherwise the error (ErrNotSigningKey,
// ErrRestrictedKey, ErrUnsupportedKeyType, ErrPolicyOnlyKey, ErrKeyNotFound) names the
// handle, the attributes found and what to do. srkHandle is the SRK used to salt the signing
// session; it is created (EnsureSRK) when absent. Close the key when done.
func (t *TPM) LoadKey(ctx context.Context, handle, srkHandle uint32) (*Key, error) {
	if err := checkPersistent(handle); err != nil {
		return nil, err
	}
	if err := checkPersistent(srkHandle); err != nil {
		return nil, err
	}
	k := &Key{tpm: t, handle: tpm2.TPMHandle(handle), srkHandle: tpm2.TPMHandle(srkHandle)}
	err := t.do(ctx, func(tp transport.TPM) error {
		ki, err := readKey(tp, k.handle)
		if err != nil {
			return err
		}
		if err := ki.usable(k.handle); err != nil {
			return err
		}
		srkPub, _, _, err := ensureSRK(tp, k.srkHandle)
		if err != nil {
			return err
		}
		k.srkPub = srkPub
		k.public, k.name, k.typ = ki.public, ki.name, ki.typ
		return nil
	})
	if err != nil {
		return nil, err
	}
	if err := k.initPublic(); err != nil {
		return nil, err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, ErrClosed
	}
	t.keys[k] = struct{}{}
	return k, nil
}

// OpenKey is LoadKey for a KeySpec (defaults applied) that also checks the key's type:
// ErrKeyTypeMismatch when the key at spec.Handle is not of spec.Type.
func (t *TPM) OpenKey(ctx context.Context, spec KeySpec) (*Key, error) {
	spec, err := spec.withDefaults()
	if err != nil {
		return nil, err
	}
	k, err := t.LoadKey(ctx, spec.Handle, spec.SRKHandle)
	if err != nil {
		return nil, err
	}
	if k.typ != spec.Type {
		k.Close()
		return nil, fmt.Errorf("tpmkeys: %w: handle 0x%x holds a key of type %s, configured tpm.key_type is %s: "+
			"set tpm.key_type: %s, or replace the key with `tpmagent key create --force`",
			ErrKeyTypeMismatch, spec.Handle, k.typ, spec.Type, k.typ)
	}
	return k, nil
}

// Key is a signing key persisted in the TPM. It implements crypto.Signer; it is safe for
// concurrent use (signatures are serialized by the TPM's lock). The private key never leaves
// the TPM.
type Key struct {
	tpm       *TPM
	handle    tpm2.TPMHandle
	srkHandle tpm2.TPMHandle
	srkPub    tpm2.TPMTPublic
	public    tpm2.TPMTPublic
	name      tpm2.TPM2BName
	typ       string
	pub       crypto.PublicKey
	spki      []byte

	// sess is the reusable salted, parameter-encrypting HMAC session; nil until first use
	// and after a failure. Guarded by tpm.lock.
	sess tpm2.Session

	sigs          atomic.Uint64
	sessionStarts atomic.Uint64
}

// SessionStarts returns how many signing sessions this key has started: 1 in steady state,
// one more after every TPM reset or failed command.
func (k *Key) SessionStarts() uint64 { return k.sessionStarts.Load() }

func (k *Key) initPublic() error {
	pub, err := tpm2.Pub(k.public)
	if err != nil {
		return fmt.Errorf("tpmkeys: key 0x%x: public key: %w", uint32(k.handle), err)
	}
	spki, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return fmt.Errorf("tpmkeys: key 0x%x: encode public key: %w", uint32(k.handle), err)
	}
	k.pub, k.spki = pub, spki
	return nil
}

// Public returns the public key: *ecdsa.PublicKey or *rsa.PublicKey.
func (k *Key) Public() crypto.PublicKey { return k.pub }

// Handle returns the persistent handle of the key.
func (k *Key) Handle() uint32 { return uint32(k.handle) }

// Type returns KeyTypeECCP256 or KeyTypeRSA2048.
func (k *Key) Type() string { return k.typ }

// Attributes returns the key's object attributes in tpm2-tools' spelling, e.g. [fixedtpm
// fixedparent sensitivedataorigin userwithauth sign].
func (k *Key) Attributes() []string { return attributeNames(k.public.ObjectAttributes) }

// PublicKeyDER returns the DER-encoded SubjectPublicKeyInfo.
func (k *Key) PublicKeyDER() []byte { return append([]byte(nil), k.spki...) }

// FingerprintSHA256 returns the lower-case hex SHA-256 of the DER SubjectPublicKeyInfo (the
// same as `openssl pkey -pubin -outform DER | sha256sum`).
func (k *Key) FingerprintSHA256() string {
	sum := sha256.Sum256(k.spki)
	return hex.EncodeToString(sum[:])
}

// Signatures returns how many signatures this key has produced.
func (k *Key) Signatures() uint64 { return k.sigs.Load() }

// Close flushes the key's signing session. The persistent key stays in the TPM. Close is
// idempotent; TPM.Close closes all keys.
func (k *Key) Close() error {
	t := k.tpm
	err := t.do(context.Background(), func(tp transport.TPM) error {
		t.mu.Lock()
		delete(t.keys, k)
		t.mu.Unlock()
		return k.dropSession(tp)
	})
	if errors.Is(err, ErrClosed) {
		return nil // TPM.Close flushed the session already
	}
	if err != nil {
		return fmt.Errorf("tpmkeys: close key 0x%x: %w", uint32(k.handle), err)
	}
	return nil
}
