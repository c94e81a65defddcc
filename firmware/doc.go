// Package firmware implements signed firmware updates for tpmagent devices, as specified in
// docs/FIRMWARE.md.
//
// Release side: GenerateReleaseKey, WriteKeyFiles, BuildManifest and Sign produce a detached
// signature envelope over the manifest bytes. Device side: ParseAndVerify checks the envelope
// against a TrustStore before anything is downloaded; an Updater then checks hardware
// compatibility and the anti-rollback Counter, downloads the image resumably from a Source (HTTPS
// Range requests or MQTT chunks through a ChunkTransport), verifies size and SHA-256, installs it
// through an Installer (FileSlots or CommandInstaller), runs the restart hook, and on the next
// start runs the health check and commits (advancing the counter) or rolls back.
//
// The package knows nothing about TPMs or MQTT clients: the caller supplies a Counter (a TPM NV
// counter), a ChunkTransport or MQTTChunkClient publish function (paho), a *tls.Config (the TPM
// mTLS identity), a Reporter and a restart hook.
package firmware
