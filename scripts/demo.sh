#!/usr/bin/env bash
# make demo: the whole path on embedded defaults, on one machine.
#   lab PKI -> swtpm -> device key created inside the TPM -> CSR signed in the
#   TPM -> TLS mosquitto (require_certificate) on a free loopback port ->
#   `tpmagent handshake` step by step -> `tpmagent run` publishing with a live
#   rate line -> a mosquitto_sub receiving. Stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=${BIN:-$ROOT/bin/tpmagent}
D=${DEMO_DIR:-$ROOT/.demo}
RUN_SECONDS=${RUN_SECONDS:-8}

need=(swtpm tpm2_readpublic mosquitto mosquitto_sub openssl)
missing=()
for c in "${need[@]}"; do command -v "$c" >/dev/null || missing+=("$c"); done
if [ ${#missing[@]} -gt 0 ]; then
	if [ "$(id -u)" -eq 0 ]; then
		bash scripts/ci-deps.sh
	else
		echo "demo: missing ${missing[*]}; install with:" >&2
		echo "  sudo apt-get install -y swtpm swtpm-tools tpm2-tools mosquitto mosquitto-clients openssl" >&2
		exit 1
	fi
fi
[ -x "$BIN" ] || make -s build

pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

rm -rf "$D"
mkdir -p "$D/tpm" "$D/pki" "$D/spool"
chmod 700 "$D"

step "swtpm (TPM 2.0 emulator) on a free loopback port"
start_swtpm "$D/tpm" "$D/swtpm.log"
TPM_PORT=$SWTPM_PORT
echo "swtpm://127.0.0.1:$TPM_PORT"

BROKER_PORT=$(free_port)
cat >"$D/agent.yaml" <<YAML
device_id: demo-device
state_dir: $D/state
tpm: { device: "swtpm://127.0.0.1:$TPM_PORT" }
broker:
  urls: [mqtts://127.0.0.1:$BROKER_PORT]
  ca_file: $D/pki/ca.pem
  cert_file: $D/pki/device.pem
telemetry:
  socket: $D/telemetry.sock
  system_interval: 1s
spool: { dir: $D/spool }
status: { socket: $D/status.sock }
YAML
A=("$BIN" --config "$D/agent.yaml")

step "device key created inside the TPM (fixedTPM, fixedParent, sensitiveDataOrigin)"
"${A[@]}" key create
"${A[@]}" key show

step "CSR signed inside the TPM, verified by openssl, signed by the lab CA"
"${A[@]}" key csr --cn demo-device -o "$D/pki/device.csr"
openssl req -in "$D/pki/device.csr" -verify -noout
bash scripts/lab-pki.sh init "$D/pki" >/dev/null
bash scripts/lab-pki.sh sign "$D/pki" "$D/pki/device.csr" "$D/pki/device.pem"
bash scripts/lab-pki.sh client "$D/pki" demo-subscriber

step "TLS mosquitto (require_certificate true, use_identity_as_username true) on 127.0.0.1:$BROKER_PORT"
start_mosquitto "$D" "$BROKER_PORT" "$D/pki/ca.pem" "$D/pki/server.pem" "$D/pki/server.key"

step "handshake, step by step (twice: the second resumes without a TPM signature)"
"${A[@]}" handshake --repeat 2

step "subscriber"
mosquitto_sub -h 127.0.0.1 -p "$BROKER_PORT" --cafile "$D/pki/ca.pem" --cert "$D/pki/demo-subscriber.pem" \
	--key "$D/pki/demo-subscriber.key" -t 'devices/#' -v -q 1 >"$D/received.txt" 2>&1 &
pids+=($!)
sleep 0.5

step "tpmagent run for ${RUN_SECONDS}s (system readings each second + 20,000 readings sent through the socket)"
"${A[@]}" run >"$D/agent.log" 2>&1 &
AGENT=$!
pids+=($AGENT)
for _ in $(seq 1 50); do [ -S "$D/telemetry.sock" ] && break; sleep 0.1; done
( for i in $(seq 1 20000); do echo "{\"name\":\"demo.counter\",\"value\":$i}"; done | "${A[@]}" send >/dev/null ) &
end=$((SECONDS + RUN_SECONDS))
prev=0
while [ $SECONDS -lt $end ]; do
	sleep 1
	js=$("${A[@]}" status --json 2>/dev/null | tr -d ' \n' || true)
	num() { sed -n "s/.*\"$1\":\([0-9]*\).*/\1/p" <<<"$js"; }
	in=$(num readings_in); acked=$(num messages_acked); spooled=$(num records); sigs=$(num tpm_signatures)
	if [ -n "$in" ]; then
		printf '\r\033[K%6d readings/s | readings %d | messages acked %d | spool %d records | TPM signatures %d' \
			$((in - prev)) "$in" "${acked:-0}" "${spooled:-0}" "${sigs:-0}"
		prev=$in
	else
		printf '\r\033[Kwaiting for the agent...'
	fi
done
echo
kill -TERM "$AGENT" 2>/dev/null || true
wait "$AGENT" 2>/dev/null || true

step "what the subscriber received"
echo "messages received: $(grep -c '^devices/' "$D/received.txt" || true)"
grep -m 3 '^devices/demo-device/' "$D/received.txt" | cut -c1-160 || true
echo
echo "broker log: the device's certificate CN is its MQTT username:"
grep -m 2 'demo-device' "$D/mosquitto.log" || true
echo
echo "demo: done; files under $D (agent.log, mosquitto.log, received.txt)"
