// Package tpmkeys keeps the device key inside a TPM 2.0 and exposes it as a crypto.Signer.
//
// A TPM is opened with Open ("/dev/tpmrm0", "/dev/tpm0" or "swtpm://HOST:PORT") or, in tests,
// with OpenTransport (e.g. go-tpm's in-process simulator). Every TPM command of one *TPM runs
// under that TPM's own lock, so a *TPM and the *Key values loaded from it are safe for
// concurrent use; two *TPM values never serialize each other. Commands the TPM answers with
// TPM_RC_RETRY, TPM_RC_YIELDED or TPM_RC_TESTING are re-sent with exponential backoff.
//
// Key custody:
//   - the storage root key (SRK) is the TCG reference ECC P-256 storage primary, persisted at
//     DefaultSRKHandle (0x81000002) and created only when absent (EnsureSRK);
//   - the device key is an ECC P-256 (default) or RSA-2048 child of the SRK with the attributes
//     fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|sign, persisted at
//     DefaultKeyHandle (0x81000100) with TPM2_EvictControl (CreateKey). It is never
//     duplicable: the private part never leaves the TPM;
//   - keys made by other tools (tpm2-tools) at a persistent handle are accepted by LoadKey
//     when they are unrestricted ECC P-256 or RSA-2048 signing keys with userWithAuth and an
//     empty authorization value.
//
// Signing runs through one reusable HMAC session per *Key, salted with the SRK and with AES-128
// CFB parameter encryption of the command's first parameter (the digest), so a probe on the
// SPI/I²C bus sees neither the session key nor the digest. The session is started on first use,
// flushed by Key.Close, TPM.Close and on any failed command, and re-established once (the TPM
// may have been reset) before an error is returned. Every transient object created by this
// package is flushed on every path; /dev/tpm0 and swtpm have no resource manager, so leaks
// would end in TPM_RC_OBJECT_MEMORY.
//
// NVCounter provides TPM NV monotonic counters (default index DefaultCounterIndex,
// 0x01500100) for firmware anti-rollback.
package tpmkeys
