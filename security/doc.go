// Package security holds the agent's security checks as tests: a packet
// capture of a telemetry stream shows no plaintext (and decrypts with the
// session's key log, which proves the keys are per-session TLS secrets),
// a plaintext control run shows the sentinel (so the capture check would
// catch telemetry in clear), no file the agent writes holds private key
// material, and its directories and configuration have tight permissions.
package security
