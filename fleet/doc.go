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
// ($fleet/certificates/<id>/request → …/response), and Enrol/PrepareRenewal drive it from the device
// side through a CertRequester. RenewAt says when a certificate should be renewed.
//
// Enrolment flows (all make the same checks; only the transport of the messages differs):
//
//   - offline: the device writes a bundle (`tpmagent key attest -o bundle.json`), the CA
//     verifies it and writes a challenge plus a pending record (`fleet ca challenge`), the
//     device answers (`key attest --challenge`), the CA checks the answer against the pending
//     record, deletes it (a challenge is good once) and issues (`fleet ca issue`);
//   - lab: `fleet ca sign` drives both sides in one process when the TPM is reachable from
//     the CA (swtpm at provisioning time; scripts/provision-fleet.sh uses it);
//   - online: Service on $fleet/certificates/<id>/request answers a Message{type: attest}
//     with a challenge and a Message{type: activate} with the certificate (or type error
//     with the Refusal reason). The device needs an identity the broker accepts: its current
//     certificate (renewal) or a bootstrap certificate; the broker's ACL gives each device
//     only its own request/response topics and the CA service (user fleet-ca) all of them.
//
// Renewal (PrepareRenewal): a new key at enrol.renew_handle goes through the online flow;
// the caller proves the new pair with a handshake, switches, then evicts the old key
// (tpmkeys.TPM.EvictKey). A failure evicts the new key and leaves the current identity as
// it was.
package fleet
