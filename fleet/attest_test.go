package fleet

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/tpmagent/tpmagent/tpmkeys"
)

// TestAttestValidTPM: a genuine swtpm with an EK certificate from the trusted manufacturer
// gets a certificate for its TPM-resident key, and nothing transient is left in the TPM.
func TestAttestValidTPM(t *testing.T) {
	ctx := ctxT(t)
	m := newManufacturer(t)
	d := newDevice(t, m, "dev-valid")
	svc, _ := newService(t, m)

	certPEM, cert, err := Enrol(ctx, d.attester(), LocalRequester{Service: svc})
	if err != nil {
		t.Fatalf("Enrol: %v", err)
	}
	if cert.Subject.CommonName != "dev-valid" {
		t.Errorf("CN = %q", cert.Subject.CommonName)
	}
	if !samePublic(cert.PublicKey, d.key.Public()) {
		t.Error("certificate is not for the TPM key")
	}
	if len(cert.ExtKeyUsage) != 1 || cert.ExtKeyUsage[0] != x509.ExtKeyUsageClientAuth {
		t.Errorf("EKU = %v, want clientAuth", cert.ExtKeyUsage)
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: poolOf(svc.CA.Signer.Certificate()),
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("issued certificate does not verify against the fleet CA: %v", err)
	}
	if !strings.Contains(string(certPEM), "BEGIN CERTIFICATE") {
		t.Error("no PEM")
	}
	// A second attestation of the same TPM yields the same AK (derived, not stored).
	b1, err := d.tpm.Attest(ctx, d.key, d.id, nil)
	if err != nil {
		t.Fatal(err)
	}
	b2, err := d.tpm.Attest(ctx, d.key, d.id, nil)
	if err != nil {
		t.Fatal(err)
	}
	if string(b1.AKPublic) != string(b2.AKPublic) {
		t.Error("AK differs between attestations")
	}
	raw := d.rawTPM(t)
	if l := leftovers(t, raw); len(l) != 0 {
		t.Errorf("transient objects or sessions left in the TPM: %x", l)
	}
}

func poolOf(c *x509.Certificate) *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(c)
	return p
}

func softCSR(t *testing.T, cn string) []byte {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: cn}}, k)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// TestAttestRefusals: each forged bundle is refused with its reason.
func TestAttestRefusals(t *testing.T) {
	ctx := ctxT(t)
	m := newManufacturer(t)
	d := newDevice(t, m, "dev-a")
	svc, _ := newService(t, m)
	good, err := d.tpm.Attest(ctx, d.key, d.id, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Verify(good, svc.Manufacturers); err != nil {
		t.Fatalf("good bundle refused: %v", err)
	}

	other := newManufacturer(t)
	untrusted := newDevice(t, other, "dev-a")
	foreign, err := untrusted.tpm.Attest(ctx, untrusted.key, "dev-a", nil)
	if err != nil {
		t.Fatal(err)
	}

	cases := []struct {
		name   string
		mutate func(b *tpmkeys.AttestationBundle) *tpmkeys.AttestationBundle
		reason string
		detail string
	}{
		{"software key, no certification", func(b *tpmkeys.AttestationBundle) *tpmkeys.AttestationBundle {
			b.CSR = softCSR(t, "dev-a")
			b.CertifyInfo, b.CertifySignature = nil, nil
			return b
		}, ReasonNotCertified, "not shown to live in a TPM"},
		{"CSR for another key", func(b *tpmkeys.AttestationBundle) *tpmkeys.AttestationBundle {
			b.CSR = softCSR(t, "dev-a")
			return b
		}, ReasonCSRMismatch, "is not the TPM-certified key"},
		{"EK certificate from an untrusted manufacturer", func(*tpmkeys.AttestationBundle) *tpmkeys.AttestationBundle {
			return foreign
		}, ReasonEKUntrusted, "does not chain to a trusted manufacturer CA"},
		{"EK certificate of another TPM", func(b *tpmkeys.AttestationBundle) *tpmkeys.AttestationBundle {
			b.EKPublic = foreign.EKPublic
			return b
		}, ReasonEKMismatch, "not the key of the EK certificate"},
		{"certify signature tampered", func(b *tpmkeys.AttestationBundle) *tpmkeys.AttestationBundle {
			b.CertifyInfo = append([]byte(nil), b.CertifyInfo...)
			b.CertifyInfo[len(b.CertifyInfo)-1] ^= 1
			return b
		}, ReasonNotCertified, "not signed by the attestation key"},
		{"AK of another TPM", func(b *tpmkeys.AttestationBundle) *tpmkeys.AttestationBundle {
			b.AKPublic = foreign.AKPublic
			return b
		}, ReasonNotCertified, "not signed by the attestation key"},
		{"CN is not the device id", func(b *tpmkeys.AttestationBundle) *tpmkeys.AttestationBundle {
			b.DeviceID = "dev-b"
			return b
		}, ReasonBadCSR, "is not the device id"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := *good
			_, err := Verify(c.mutate(&b), svc.Manufacturers)
			if err == nil {
				t.Fatal("accepted")
			}
			if ReasonOf(err) != c.reason || !strings.Contains(err.Error(), c.detail) {
				t.Fatalf("error = %v (reason %q), want reason %q with %q", err, ReasonOf(err), c.reason, c.detail)
			}
			t.Logf("refused: %v", err)
		})
	}
}

// TestAttestSoftwareKeyLoadedIntoTPM: a key generated in software and loaded into the TPM
// (TPM2_LoadExternal) can be certified by the real AK, but the certification shows it lacks
// fixedTPM|fixedParent|sensitiveDataOrigin: refused.
func TestAttestSoftwareKeyLoadedIntoTPM(t *testing.T) {
	ctx := ctxT(t)
	m := newManufacturer(t)
	d := newDevice(t, m, "dev-soft")
	svc, _ := newService(t, m)
	good, err := d.tpm.Attest(ctx, d.key, d.id, nil)
	if err != nil {
		t.Fatal(err)
	}
	raw := d.rawTPM(t)

	soft, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	pubArea := tpm2.TPMTPublic{
		Type: tpm2.TPMAlgECC, NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{UserWithAuth: true, SignEncrypt: true},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme:    tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
			CurveID:   tpm2.TPMECCNistP256,
			KDF:       tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
			X: tpm2.TPM2BECCParameter{Buffer: soft.X.FillBytes(make([]byte, 32))},
			Y: tpm2.TPM2BECCParameter{Buffer: soft.Y.FillBytes(make([]byte, 32))},
		}),
	}
	sens := tpm2.TPMTSensitive{
		SensitiveType: tpm2.TPMAlgECC,
		Sensitive: tpm2.NewTPMUSensitiveComposite(tpm2.TPMAlgECC,
			&tpm2.TPM2BECCParameter{Buffer: mustBytes(t, soft)}),
	}
	le, err := tpm2.LoadExternal{InPrivate: tpm2.New2B(sens), InPublic: tpm2.New2B(pubArea), Hierarchy: tpm2.TPMRHNull}.Execute(raw)
	if err != nil {
		t.Fatalf("LoadExternal: %v", err)
	}
	defer tpm2.FlushContext{FlushHandle: le.ObjectHandle}.Execute(raw)
	ak, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(tpmkeys.AKTemplate())}.Execute(raw)
	if err != nil {
		t.Fatal(err)
	}
	defer tpm2.FlushContext{FlushHandle: ak.ObjectHandle}.Execute(raw)

	// A CSR signed by the software key, so the CSR's key is the certified one.
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "dev-soft"}}, soft)
	if err != nil {
		t.Fatal(err)
	}
	qual := sha256.Sum256(csr)
	cr, err := tpm2.Certify{
		ObjectHandle:   tpm2.AuthHandle{Handle: le.ObjectHandle, Name: le.Name, Auth: tpm2.PasswordAuth(nil)},
		SignHandle:     tpm2.AuthHandle{Handle: ak.ObjectHandle, Name: ak.Name, Auth: tpm2.PasswordAuth(nil)},
		QualifyingData: tpm2.TPM2BData{Buffer: qual[:]},
		InScheme:       tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
	}.Execute(raw)
	if err != nil {
		t.Fatalf("Certify: %v", err)
	}
	b := *good
	b.CSR = csr
	b.KeyPublic = tpm2.Marshal(pubArea)
	b.CertifyInfo = cr.CertifyInfo.Bytes()
	b.CertifySignature = tpm2.Marshal(cr.Signature)
	_, err = Verify(&b, svc.Manufacturers)
	if ReasonOf(err) != ReasonKeyNotFixed || !strings.Contains(err.Error(), "lacks fixedtpm|fixedparent|sensitivedataorigin") {
		t.Fatalf("error = %v, want %s", err, ReasonKeyNotFixed)
	}
	t.Logf("refused: %v", err)
}

// TestActivationReplayFromAnotherTPM: an activation answer made by TPM B cannot complete
// TPM A's challenge; TPM B cannot answer A's challenge at all; a correct answer is good once.
func TestActivationReplayFromAnotherTPM(t *testing.T) {
	ctx := ctxT(t)
	m := newManufacturer(t)
	a := newDevice(t, m, "dev-a")
	b := newDevice(t, m, "dev-b")
	svc, _ := newService(t, m)

	bundleA, err := a.attester().Attest(ctx)
	if err != nil {
		t.Fatal(err)
	}
	chA, err := svc.Submit("dev-a", bundleA)
	if err != nil {
		t.Fatal(err)
	}
	bundleB, err := b.attester().Attest(ctx)
	if err != nil {
		t.Fatal(err)
	}
	chB, err := svc.Submit("dev-b", bundleB)
	if err != nil {
		t.Fatal(err)
	}

	// TPM B cannot unwrap A's credential.
	if _, err := b.tpm.ActivateCredential(ctx, chA); err == nil || !strings.Contains(err.Error(), "another TPM") {
		t.Fatalf("TPM B activated A's challenge: %v", err)
	}
	chNoName := *chA
	chNoName.AKName = nil
	if _, err := b.tpm.ActivateCredential(ctx, &chNoName); err == nil {
		t.Fatal("TPM B activated A's challenge without the AK name hint")
	} else {
		t.Logf("TPM B on A's challenge: %v", err)
	}

	// B's genuine answer to its own challenge, replayed as A's answer.
	respB, err := b.tpm.ActivateCredential(ctx, chB)
	if err != nil {
		t.Fatal(err)
	}
	replay := *respB
	replay.ID, replay.DeviceID = chA.ID, "dev-a"
	_, err = svc.Complete("dev-a", &replay)
	if ReasonOf(err) != ReasonActivation || !strings.Contains(err.Error(), "another TPM") {
		t.Fatalf("replayed answer: %v, want %s naming another TPM", err, ReasonActivation)
	}
	t.Logf("refused: %v", err)

	// With EK pinning, TPM B cannot ask for dev-a's identity even with a genuine bundle.
	pins := map[string]string{}
	svc.OnIssue = func(v *Verified, _ *x509.Certificate) { pins[v.DeviceID] = v.EKFingerprint }
	svc.PinnedEK = func(id string) (string, bool) { p, ok := pins[id]; return p, ok }
	vA, err := Verify(bundleA, svc.Manufacturers)
	if err != nil {
		t.Fatal(err)
	}
	pins["dev-a"] = vA.EKFingerprint
	bAsA, err := b.tpm.Attest(ctx, b.key, "dev-a", nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := svc.Submit("dev-a", bAsA); ReasonOf(err) != ReasonEKMismatch || !strings.Contains(err.Error(), "enrolled with the TPM") {
		t.Fatalf("TPM B asking for dev-a with pinning: %v", err)
	} else {
		t.Logf("refused: %v", err)
	}

	// A's challenge was consumed by the failed attempt; A attests again and succeeds once.
	chA2, err := svc.Submit("dev-a", bundleA)
	if err != nil {
		t.Fatal(err)
	}
	respA, err := a.tpm.ActivateCredential(ctx, chA2)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := svc.Complete("dev-a", respA); err != nil {
		t.Fatalf("genuine answer refused: %v", err)
	}
	if _, err := svc.Complete("dev-a", respA); ReasonOf(err) != ReasonActivation {
		t.Fatalf("second use of the same answer: %v, want %s", err, ReasonActivation)
	}
	// The pending record alone (offline flow) refuses expired and foreign answers.
	v, err := Verify(bundleA, svc.Manufacturers)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	ch3, p3, err := NewChallenge(v, time.Minute, now)
	if err != nil {
		t.Fatal(err)
	}
	resp3, err := a.tpm.ActivateCredential(ctx, ch3)
	if err != nil {
		t.Fatal(err)
	}
	if err := p3.Check(resp3, now); err != nil {
		t.Fatalf("offline check: %v", err)
	}
	if err := p3.Check(resp3, now.Add(2*time.Minute)); ReasonOf(err) != ReasonActivation || !strings.Contains(err.Error(), "expired") {
		t.Fatalf("expired: %v", err)
	}
	for _, dv := range []*device{a, b} {
		if l := leftovers(t, dv.rawTPM(t)); len(l) != 0 {
			t.Errorf("%s: transient objects or sessions left: %x", dv.id, l)
		}
	}
}

func TestRenewAt(t *testing.T) {
	nb := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	cert := &x509.Certificate{NotBefore: nb, NotAfter: nb.Add(90 * time.Second)}
	cases := []struct {
		jitter, u float64
		want      time.Duration
	}{
		{0, 0.9, 60 * time.Second},
		{0.2, 0.5, 60 * time.Second},
		{0.2, 0, 51 * time.Second},
		{0.2, 1, 69 * time.Second},
		{5, 1, 82500 * time.Millisecond}, // jitter clamped to 0.5
		{-1, 1, 60 * time.Second},
	}
	for _, c := range cases {
		if got := renewAt(cert, c.jitter, c.u).Sub(nb); got != c.want {
			t.Errorf("renewAt(jitter %v, u %v) = %v, want %v", c.jitter, c.u, got, c.want)
		}
	}
	for i := 0; i < 1000; i++ {
		at := RenewAt(cert, 0.1)
		if at.Before(nb.Add(55*time.Second)) || at.After(nb.Add(65*time.Second)) {
			t.Fatalf("RenewAt = %v", at.Sub(nb))
		}
	}
}

func mustBytes(t *testing.T, k *ecdsa.PrivateKey) []byte {
	t.Helper()
	b, err := k.Bytes()
	if err != nil {
		t.Fatal(err)
	}
	return b
}
