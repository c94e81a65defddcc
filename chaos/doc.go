// Package chaos is the reliability suite (`make chaos`): scenarios that
// break the agent's surroundings while it streams QoS 1 telemetry — the
// broker killed, the agent killed with SIGKILL, packet loss, latency and a
// cut link between network namespaces, the TPM gone, broker certificates
// rotated or untrusted, a full spool filesystem, thousands of reconnects —
// each against a real mosquitto and swtpm, and each reporting readings
// offered, delivered, lost, duplicated and the recovery time.
//
// The tests sit behind the build tag "chaos" (they need root for network
// namespaces, nftables and tmpfs mounts, and take minutes):
//
//	CHAOS_SHORT=1 go test -tags chaos -count=1 -v ./chaos/
//
// scripts/chaos.sh runs them and prints one markdown table; docs/RELIABILITY.md
// holds a run's figures.
package chaos
