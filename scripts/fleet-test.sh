#!/usr/bin/env bash
# make fleet-test N=100: provision N emulated devices (scripts/provision-fleet.sh),
# start N agents each with its own swtpm, all publishing QoS1 to one TLS mosquitto
# (require_certificate, per-device ACL) at once; a subscriber counts every reading.
# Prints time, total, readings/s and per-agent RSS. Exit 1 if a reading is lost.
#
#   N=100 READINGS=1000 bash scripts/fleet-test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
N=${N:-100}
READINGS=${READINGS:-1000}
BIN=$ROOT/bin/tpmagent
[ -x "$BIN" ] || make -s build
D=$(mktemp -d /tmp/tpmagent-fleet.XXXXXX)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	[ "${KEEP:-0}" = 1 ] || rm -rf "$D"
}
trap cleanup EXIT INT TERM
# shellcheck source=scripts/lib.sh
. scripts/lib.sh


BROKER_PORT=$(free_port)
t0=$(date +%s.%N)
echo "fleet-test: provisioning $N devices"
bash scripts/provision-fleet.sh --count "$N" --out "$D/fleet" --broker "mqtts://127.0.0.1:$BROKER_PORT" --tpmagent "$BIN" >"$D/provision.log" 2>&1 ||
	{ tail -20 "$D/provision.log"; exit 1; }
t1=$(date +%s.%N)
F=$D/fleet
go build -o "$D/benchtool" ./internal/cmd/benchtool
bash scripts/lab-pki.sh client "$F/ca" fleet-sub
cp "$F/mosquitto.acl" "$D/mosquitto.acl"
printf '\nuser fleet-sub\ntopic read devices/#\n' >>"$D/mosquitto.acl"
start_mosquitto "$D" "$BROKER_PORT" "$F/ca/ca.pem" "$F/ca/broker.pem" "$F/ca/broker.key" "acl_file $D/mosquitto.acl"

TOTAL=$((N * READINGS))
"$D/benchtool" count-sub -url "mqtts://127.0.0.1:$BROKER_PORT" -ca "$F/ca/ca.pem" -cert "$F/ca/fleet-sub.pem" -key "$F/ca/fleet-sub.key" \
	-id fleet-sub -topic 'devices/+/telemetry' -qos 1 -readings "$TOTAL" -idle 30s -ready "$D/sub.ready" >"$D/sub.json" &
SUBPID=$!
for _ in $(seq 1 100); do [ -f "$D/sub.ready" ] && break; sleep 0.05; done

echo "fleet-test: starting $N swtpm + $N agents"
agents=()
for dir in "$F"/devices/*/; do
	id=$(basename "$dir")
	start_swtpm "$dir/tpm" "$dir/swtpm-run.log" || { echo "fleet-test: swtpm for $id did not start"; exit 1; }
	p=$SWTPM_PORT
	TPMAGENT_TPM_DEVICE=swtpm://127.0.0.1:$p TPMAGENT_LOG_LEVEL=warn TPMAGENT_TELEMETRY_SYSTEM_INTERVAL=0s "$BIN" run --config "$dir/agent.yaml" >"$dir/agent.log" 2>&1 &
	pids+=($!)
	agents+=("$id:$!")
done
for dir in "$F"/devices/*/; do
	for _ in $(seq 1 1200); do [ -S "$dir/state/telemetry.sock" ] && break; sleep 0.05; done
	[ -S "$dir/state/telemetry.sock" ] || { echo "fleet-test: $(basename "$dir") did not start:"; tail -5 "$dir/agent.log"; exit 1; }
done

echo "fleet-test: each agent gets $READINGS readings at once (QoS1)"
awk -v n="$READINGS" 'BEGIN { for (i = 0; i < n; i++) printf "{\"name\":\"fleet\",\"value\":%d}\n", i }' >"$D/readings.jsonl"
t2=$(date +%s.%N)
senders=()
for dir in "$F"/devices/*/; do
	"$BIN" --config "$dir/agent.yaml" send <"$D/readings.jsonl" >"$dir/send.out" 2>&1 &
	senders+=($!)
done
fail=0
for s in "${senders[@]}"; do wait "$s" || fail=1; done
wait "$SUBPID" || true
t3=$(date +%s.%N)
[ $fail = 0 ] || echo "fleet-test: some send failed (see send.out)"

rss=()
for a in "${agents[@]}"; do
	pid=${a#*:}
	r=$(awk '/VmHWM/ {print $2}' /proc/$pid/status 2>/dev/null || echo 0)
	rss+=("${r:-0}")
done
got=$(sed -n 's/.*"readings":\([0-9]*\).*/\1/p' "$D/sub.json")
calc() { awk "BEGIN { print $* }"; }
tot_rss=0; max_rss=0
for r in "${rss[@]}"; do tot_rss=$((tot_rss + r)); [ "$r" -gt "$max_rss" ] && max_rss=$r; done
echo
echo "| devices | readings offered | delivered | lost | provision s | publish s | readings/s | agent peak RSS avg KiB | max KiB | total MiB |"
echo "|---|---|---|---|---|---|---|---|---|---|"
printf '| %d | %d | %d | %d | %.1f | %.1f | %.0f | %d | %d | %.0f |\n' "$N" "$TOTAL" "${got:-0}" $((TOTAL - ${got:-0})) \
	"$(calc "$t1 - $t0")" "$(calc "$t3 - $t2")" "$(calc "${got:-0} / ($t3 - $t2)")" $((tot_rss / N)) "$max_rss" "$(calc "$tot_rss / 1024")"
[ "${got:-0}" -ge "$TOTAL" ] || { echo "fleet-test: LOST $((TOTAL - ${got:-0})) readings"; exit 1; }
