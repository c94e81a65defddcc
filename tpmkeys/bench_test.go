package tpmkeys_test

import (
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"testing"

	"github.com/tpmagent/tpmagent/internal/testenv"
	"github.com/tpmagent/tpmagent/tpmkeys"
)

// BenchmarkSign measures one TPM signature through Key.Sign (reused salted session,
// parameter encryption, software verification of the result) on the in-process simulator and
// on swtpm over loopback TCP, for each key type and RSA padding.
//
//	go test -run xxx -bench Sign ./tpmkeys
func BenchmarkSign(b *testing.B) {
	d := sha256.Sum256([]byte("benchmark"))
	cases := []struct {
		name string
		typ  string
		opts crypto.SignerOpts
	}{
		{"ecc-p256", tpmkeys.KeyTypeECCP256, crypto.SHA256},
		{"rsa-2048-pkcs1", tpmkeys.KeyTypeRSA2048, crypto.SHA256},
		{"rsa-2048-pss", tpmkeys.KeyTypeRSA2048, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA256}},
	}
	backends := []struct {
		name string
		open func(b *testing.B) *tpmkeys.TPM
	}{
		{"simulator", func(b *testing.B) *tpmkeys.TPM { t, _ := tpmkeys.OpenSimForTest(b); return t }},
		{"swtpm", func(b *testing.B) *tpmkeys.TPM { return openSwtpm(b, testenv.StartSwtpm(b)) }},
	}
	for _, be := range backends {
		for _, c := range cases {
			b.Run(be.name+"/"+c.name, func(b *testing.B) {
				tpm := be.open(b)
				ctx := tpmkeys.TestCtxForTest(b)
				if _, err := tpm.CreateKey(ctx, tpmkeys.KeySpec{Type: c.typ}, false); err != nil {
					b.Fatal(err)
				}
				k, err := tpm.OpenKey(ctx, tpmkeys.KeySpec{Type: c.typ})
				if err != nil {
					b.Fatal(err)
				}
				if _, err := k.Sign(nil, d[:], c.opts); err != nil { // session start outside the loop
					b.Fatal(err)
				}
				for b.Loop() {
					if _, err := k.Sign(nil, d[:], c.opts); err != nil {
						b.Fatal(err)
					}
				}
				b.StopTimer()
				tpm.Close()
			})
		}
	}
}
