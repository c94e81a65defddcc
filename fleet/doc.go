// Package fleet is the fleet CA: it decides whether a device key lives in a genuine TPM and
// then issues the device's client certificate.
//
// A device sends a tpmkeys.AttestationBundle (EK certificate, attestation key, TPM2_Certify
// of the device key by the AK, CSR). Verify accepts it only when
//
//   - the EK certificate chains to a trusted manufacturer CA,
//   - the AK is a restricted, fixedTPM signing key and its signature over the TPM2_Certify
//     structure verifies,
//   - the certified object is the CSR's key (same public area name) and has
//     fixedTPM|fixedParent|sensitiveDataOrigin, and the certification covers this CSR,
//
// and refuses otherwise with a *Refusal naming the reason. NewChallenge then wraps a random
// secret to the EK, bound to the AK's name (MakeCredential); only the TPM holding both can
// recover it (tpmkeys.TPM.ActivateCredential). Pending.Check compares the answer, once. CA
// issues the certificate with a CASigner (a file key for the lab; an HSM/TPM-held key fits
// the interface).
//
// Service runs the same exchange over MQTT request/response topics
// ($fleet/certificates/<id>/request → …/response), and Enrol/Renew drive it from the device
// side through a CertRequester. RenewAt says when a certificate should be renewed.
package fleet
