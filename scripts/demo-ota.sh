#!/usr/bin/env bash
# make demo-ota: tpmagent updates itself over the air, on one machine.
#   swtpm (device key + anti-rollback NV counter) -> TLS mosquitto
#   (require_certificate) -> tpmagent 1.0.0 running from slot a, started by a
#   launcher that runs the active slot's binary and restarts it in a loop (what
#   systemd's Restart=on-failure does on a device) ->
#   release 2.0.0 (a newer build of tpmagent itself): keygen, sign, publish;
#   the agent verifies, downloads over MQTT chunks, installs into slot b, exits
#   for a restart, comes back as 2.0.0, passes its health check, commits, and
#   the TPM counter advances ->
#   release 3.0.0, a build made to fail its health check (linked with
#   -X .../agent/daemon.healthFault=...): installed into slot a, started,
#   health check fails, rolled back to slot b (2.0.0), reported.
# Prints every status message the device publishes. Stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
GO=${GO:-go}
D=${DEMO_DIR:-$ROOT/.demo/ota}
DEVICE=demo-device
HW=demo-board

need=(swtpm mosquitto openssl)
missing=()
for c in "${need[@]}"; do command -v "$c" >/dev/null || missing+=("$c"); done
if [ ${#missing[@]} -gt 0 ]; then
	if [ "$(id -u)" -eq 0 ]; then
		bash scripts/ci-deps.sh
	else
		echo "demo-ota: missing ${missing[*]}; install with:" >&2
		echo "  sudo apt-get install -y swtpm swtpm-tools tpm2-tools mosquitto mosquitto-clients openssl" >&2
		exit 1
	fi
fi

pids=()
cleanup() {
	[ -n "${LAUNCHER:-}" ] && kill -TERM "$LAUNCHER" 2>/dev/null && wait "$LAUNCHER" 2>/dev/null
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

rm -rf "$D"
mkdir -p "$D/tpm" "$D/pki" "$D/spool" "$D/slots" "$D/releases"
chmod 700 "$D"

step "three builds of tpmagent: 1.0.0 (installed), 2.0.0 (good release), 3.0.0 (fails its health check)"
build() { # version out [extra -X]
	CGO_ENABLED=0 "$GO" build -trimpath -ldflags "-s -w -X main.version=$1 -X main.commit=demo ${3:-}" -o "$2" ./cmd/tpmagent
	"$2" version
}
build 1.0.0 "$D/releases/tpmagent-1.0.0"
build 2.0.0 "$D/releases/tpmagent-2.0.0"
build 3.0.0 "$D/releases/tpmagent-3.0.0" \
	"-X 'github.com/tpmagent/tpmagent/agent/daemon.healthFault=demo: release 3.0.0 was built broken on purpose'"
cp "$D/releases/tpmagent-1.0.0" "$D/slots/slot-a"
TOOL=$D/releases/tpmagent-1.0.0 # release-side commands

step "swtpm, lab PKI, TLS mosquitto; device key and CSR made inside the TPM"
start_swtpm "$D/tpm" "$D/swtpm.log"
TPM_PORT=$SWTPM_PORT
BROKER_PORT=$(free_port)
cat >"$D/agent.yaml" <<YAML
device_id: $DEVICE
state_dir: $D/state
tpm: { device: "swtpm://127.0.0.1:$TPM_PORT" }
broker:
  urls: [mqtts://127.0.0.1:$BROKER_PORT]
  ca_file: $D/pki/ca.pem
  cert_file: $D/pki/device.pem
  backoff_base: 200ms
  backoff_max: 2s
telemetry: { socket: $D/telemetry.sock }
spool: { dir: $D/spool }
status: { socket: $D/status.sock }
firmware:
  enabled: true
  trust: [$D/release.key.pub]
  hardware: $HW
  installer: file
  slots: { a: $D/slots/slot-a, b: $D/slots/slot-b }
  health_timeout: 15s
YAML
cat >"$D/publisher.yaml" <<YAML
broker:
  urls: [mqtts://127.0.0.1:$BROKER_PORT]
  ca_file: $D/pki/ca.pem
  cert_file: $D/pki/release-backend.pem
  key_file: $D/pki/release-backend.key
firmware: { trust: [$D/release.key.pub] }
log: { level: error }
YAML
"$TOOL" --config "$D/agent.yaml" key create >/dev/null
"$TOOL" --config "$D/agent.yaml" key csr --cn "$DEVICE" -o "$D/pki/device.csr"
bash scripts/lab-pki.sh init "$D/pki" >/dev/null
bash scripts/lab-pki.sh sign "$D/pki" "$D/pki/device.csr" "$D/pki/device.pem"
bash scripts/lab-pki.sh client "$D/pki" release-backend
start_mosquitto "$D" "$BROKER_PORT" "$D/pki/ca.pem" "$D/pki/server.pem" "$D/pki/server.key"
echo "swtpm://127.0.0.1:$TPM_PORT, mqtts://127.0.0.1:$BROKER_PORT"

# The launcher: what a device's init does. active-slot.sh execs the binary of the
# active slot (slots.json, written atomically by the agent); supervise.sh runs it
# again whenever it exits non-zero, like systemd's Restart=on-failure.
cat >"$D/active-slot.sh" <<'SH'
#!/usr/bin/env bash
# exec the active slot's binary (slots.json: {"active":"a"|"b",...}; none yet: a)
dir=$(dirname "$0")/slots
active=a
[ -f "$dir/slots.json" ] && active=$(sed -n 's/.*"active":"\([ab]\)".*/\1/p' "$dir/slots.json")
exec "$dir/slot-$active" "$@"
SH
cat >"$D/supervise.sh" <<'SH'
#!/usr/bin/env bash
# restart the active slot while it exits non-zero (Restart=on-failure); stop on TERM
D=$(dirname "$0")
stop=0
trap 'stop=1; [ -n "${child:-}" ] && kill -TERM "$child" 2>/dev/null' TERM INT
while [ $stop -eq 0 ]; do
	active=a
	[ -f "$D/slots/slots.json" ] && active=$(sed -n 's/.*"active":"\([ab]\)".*/\1/p' "$D/slots/slots.json")
	echo "launcher: starting slot $active: $("$D/slots/slot-$active" version)"
	"$D/active-slot.sh" run --config "$D/agent.yaml" >>"$D/agent.log" 2>&1 &
	child=$!
	wait "$child"; code=$?
	# wait returns early (>128) when TERM arrives: collect the real status
	if [ $stop -eq 1 ]; then wait "$child"; code=$?; fi
	echo "launcher: slot $active exited with code $code"
	[ $code -eq 0 ] && break
	[ $stop -eq 1 ] && break
	sleep 0.5
done
SH
chmod +x "$D/active-slot.sh" "$D/supervise.sh"

step "release signing key; its public half is the device's firmware.trust"
"$TOOL" firmware keygen -o "$D/release.key"

step "the device runs tpmagent 1.0.0 from slot a (launcher in a restart loop)"
"$D/supervise.sh" > >(tee "$D/launcher.log") &
LAUNCHER=$!
for _ in $(seq 1 100); do [ -S "$D/telemetry.sock" ] && break; sleep 0.1; done

step "sign tpmagent 2.0.0 (security_version 2)"
"$TOOL" firmware sign --key "$D/release.key" --image "$D/releases/tpmagent-2.0.0" --version 2.0.0 --security-version 2 \
	--hardware "$HW" --chunk-size 262144 -o "$D/releases/2.0.0.json"

step "publish 2.0.0 and serve it over MQTT; the device's status messages:"
"$TOOL" --config "$D/publisher.yaml" firmware publish --manifest "$D/releases/2.0.0.json" --image "$D/releases/tpmagent-2.0.0" \
	--device "$DEVICE" --until committed,rolled_back,rejected,failed --serve-for 120s
sleep 0.3

step "release 3.0.0 (security_version 3), built to fail its health check"
"$TOOL" firmware sign --key "$D/release.key" --image "$D/releases/tpmagent-3.0.0" --version 3.0.0 --security-version 3 \
	--hardware "$HW" --chunk-size 262144 -o "$D/releases/3.0.0.json"
"$TOOL" --config "$D/publisher.yaml" firmware publish --manifest "$D/releases/3.0.0.json" --image "$D/releases/tpmagent-3.0.0" \
	--device "$DEVICE" --until committed,rolled_back,rejected,failed --serve-for 120s

# Let the launcher start the previous slot again (its 4th start) before stopping.
for _ in $(seq 1 100); do [ "$(grep -c 'launcher: starting' "$D/launcher.log")" -ge 4 ] && break; sleep 0.1; done
sleep 1

step "stop the agent; the device's firmware state and the TPM anti-rollback counter"
kill -TERM "$LAUNCHER" 2>/dev/null || true
wait "$LAUNCHER" 2>/dev/null || true
LAUNCHER=
"$TOOL" --config "$D/agent.yaml" firmware status --counter
echo
echo "running slot: $("$D/active-slot.sh" version)"
echo "demo-ota: done; files under $D (agent.log, mosquitto.log, slots/, state/)"
