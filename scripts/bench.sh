#!/usr/bin/env bash
# make bench: Go benchmarks, then whole-process runs against one TLS mosquitto
# (max_queued_messages 0) in one invocation: references and tpmagent bench
# with the same count and payload size, a counting subscriber for each.
# Prints a markdown table with the ratios (docs/BENCHMARKS.md has results).
#
#   BENCH_COUNT=200000 BENCH_SIZE=64 bash scripts/bench.sh
#   BENCH_GO=0 skips the Go benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
N=${BENCH_COUNT:-200000}
SIZE=${BENCH_SIZE:-64}
BIN=$ROOT/bin/tpmagent
[ -x "$BIN" ] || make -s build
D=$(mktemp -d /tmp/tpmagent-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; [ "${BENCH_KEEP:-0}" = 1 ] || rm -rf "$D"; }
trap cleanup EXIT INT TERM
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

if [ "${BENCH_GO:-1}" = 1 ]; then
	echo "## Go benchmarks"
	go test -run '^$' -bench 'Sign' -benchtime 200x ./tpmkeys | grep -E '^(Benchmark|ok)'
	go test -run '^$' -bench 'Handshake' -benchtime 200x ./transport | grep -E '^(Benchmark|ok)'
	go test -run '^$' -bench 'Append' -benchtime 20000x ./agent/spool | grep -E '^(Benchmark|ok)'
	go test -run '^$' -bench 'Encode' ./agent/batch | grep -E '^(Benchmark|ok)'
	go test -run '^$' -bench 'Seal|Open' ./transport/seal | grep -E '^(Benchmark|ok)'
	echo
fi

go build -o "$D/benchtool" ./internal/cmd/benchtool


# swtpm + device key + certificate
mkdir -p "$D/tpm" "$D/pki"
start_swtpm "$D/tpm" "$D/swtpm.log"
TPM_PORT=$SWTPM_PORT
BROKER_PORT=$(free_port)
cat >"$D/agent.yaml" <<YAML
device_id: bench-device
state_dir: $D/state
tpm: { device: "swtpm://127.0.0.1:$TPM_PORT" }
broker: { urls: [mqtts://127.0.0.1:$BROKER_PORT], ca_file: $D/pki/ca.pem, cert_file: $D/pki/device.pem }
telemetry: { socket: $D/telemetry.sock, inflight: 1024 }
status: { socket: $D/status.sock }
spool: { dir: $D/spool, fsync: batch }
seal: { collector_key: $D/collector.key.pub }
log: { level: ${BENCH_LOG_LEVEL:-warn} }
YAML
A=("$BIN" --config "$D/agent.yaml")
"${A[@]}" key create >/dev/null
"${A[@]}" key csr --cn bench-device -o "$D/pki/device.csr"
bash scripts/lab-pki.sh init "$D/pki" >/dev/null
bash scripts/lab-pki.sh sign "$D/pki" "$D/pki/device.csr" "$D/pki/device.pem" >/dev/null
bash scripts/lab-pki.sh client "$D/pki" bench-sub
bash scripts/lab-pki.sh client "$D/pki" bench-ref
"${A[@]}" collector keygen -o "$D/collector.key" >/dev/null 2>&1 || true

start_mosquitto "$D" "$BROKER_PORT" "$D/pki/ca.pem" "$D/pki/server.pem" "$D/pki/server.key"
URL=mqtts://127.0.0.1:$BROKER_PORT
SUB=("$D/benchtool" count-sub -url "$URL" -ca "$D/pki/ca.pem" -cert "$D/pki/bench-sub.pem" -key "$D/pki/bench-sub.key" -id bench-sub -idle 10s)

# payload lines for mosquitto_pub -l
head -c $((SIZE - 1)) /dev/zero | tr '\0' 'x' >"$D/line"
awk -v n="$N" 'NR==1{l=$0} END{for(i=0;i<n;i++) print l}' "$D/line" >"$D/lines"

now() { date +%s.%N; }
calc() { awk "BEGIN { print $* }"; }
declare -A SEC MSGS READS RSS ANON FILE
# run_case NAME TOPIC EXPECT_MSGS -- command...
run_case() {
	local name=$1 topic=$2 expect=$3
	shift 4
	rm -f "$D/ready"
	"${SUB[@]}" -topic "$topic" -qos 1 -n "$expect" -ready "$D/ready" >"$D/sub-$name.json" &
	local sp=$!
	for _ in $(seq 1 100); do [ -f "$D/ready" ] && break; sleep 0.05; done
	local t0 t1
	t0=$(now)
	if ! "$@" >"$D/out-$name.json" 2>"$D/err-$name.log"; then
		echo "bench: $name failed: $(tail -3 "$D/err-$name.log")" >&2
	fi
	t1=$(now)
	wait $sp || true
	# one line per trial: seconds delivered_msgs readings rss_peak rss_anon rss_file
	echo "$(calc "$t1 - $t0") $(sed -n 's/.*"messages":\([0-9]*\).*/\1/p' "$D/sub-$name.json") \
$(sed -n 's/.*"readings":\([0-9]*\).*/\1/p' "$D/sub-$name.json") \
$(sed -n 's/.*"rss_peak_kib":\([0-9]*\).*/\1/p' "$D/out-$name.json") \
$(sed -n 's/.*"rss_anon_kib":\([0-9]*\).*/\1/p' "$D/out-$name.json") \
$(sed -n 's/.*"rss_file_kib":\([0-9]*\).*/\1/p' "$D/out-$name.json")" >>"$D/trials-$name"
}

# median NAME: the trial with the median time of NAME -> SEC MSGS READS RSS
median() {
	local line
	line=$(sort -n "$D/trials-$1" | awk '{ l[NR] = $0 } END { print l[int((NR + 1) / 2)] }')
	read -r SEC[$1] MSGS[$1] READS[$1] RSS[$1] ANON[$1] FILE[$1] <<<"$line"
	if [ -n "${RSS[$1]}" ]; then
		RSS[$1]="${RSS[$1]} (${ANON[$1]:-?} + ${FILE[$1]:-?})"
	else
		RSS[$1]=-
	fi
}

T="devices/bench-device/telemetry/#"
# BENCH_PROFILE_DIR=DIR: CPU profiles of the tpmagent runs (go tool pprof bin/tpmagent DIR/NAME.prof)
prof() { [ -n "${BENCH_PROFILE_DIR:-}" ] && mkdir -p "$BENCH_PROFILE_DIR" && echo "--cpuprofile=$BENCH_PROFILE_DIR/$1.prof"; true; }
CASES=(mosquitto_pub_q0 paho_q1 agent_q0 agent_q1 agent_q1_b64 agent_q1_seal agent_q1_gogc30)
# BENCH_REPEAT rounds (default 3), every case once per round, so that drift
# in the machine's load hits references and agent alike; the table shows
# each case's median trial.
REPEAT=${BENCH_REPEAT:-3}
for round in $(seq 1 "$REPEAT"); do
	echo "bench: round $round of $REPEAT" >&2
	run_case mosquitto_pub_q0 bench/ref "$N" -- mosquitto_pub -h 127.0.0.1 -p "$BROKER_PORT" --cafile "$D/pki/ca.pem" \
		--cert "$D/pki/bench-ref.pem" --key "$D/pki/bench-ref.key" -q 0 -t bench/ref -l -i bench-ref <"$D/lines"
	run_case paho_q1 bench/ref "$N" -- "$D/benchtool" paho-pub -url "$URL" -ca "$D/pki/ca.pem" -cert "$D/pki/bench-ref.pem" \
		-key "$D/pki/bench-ref.key" -id bench-ref -qos 1 -n "$N" -size "$SIZE" -window 1000
	run_case agent_q0 "$T" "$N" -- "${A[@]}" bench --count "$N" --qos 0 --size "$SIZE" --batch 1 --json $(prof agent_q0)
	run_case agent_q1 "$T" "$N" -- "${A[@]}" bench --count "$N" --qos 1 --size "$SIZE" --batch 1 --json $(prof agent_q1)
	run_case agent_q1_b64 "$T" $(((N + 63) / 64)) -- "${A[@]}" bench --count "$N" --qos 1 --size "$SIZE" --batch 64 --json $(prof agent_q1_b64)
	run_case agent_q1_seal "$T" "$N" -- "${A[@]}" bench --count "$N" --qos 1 --size "$SIZE" --batch 1 --seal --json $(prof agent_q1_seal)
	# The memory/CPU trade: the same QoS 1 run with the Go collector at
	# GOGC=30 (the agent only; the references keep their defaults).
	run_case agent_q1_gogc30 "$T" "$N" -- env GOGC=30 "${A[@]}" bench --count "$N" --qos 1 --size "$SIZE" --batch 1 --json
done
for c in "${CASES[@]}"; do median "$c"; done

rate() { calc "${MSGS[$1]:-0} / ${SEC[$1]}"; }
rrate() { calc "${READS[$1]:-0} / ${SEC[$1]}"; }
ratio() { calc "$1 / $2"; }
f0() { printf '%.0f' "$1"; }
f2() { printf '%.2f' "$1"; }

q0ref=$(rate mosquitto_pub_q0)
q1ref=$(rate paho_q1)
echo "## Whole-process runs: $N messages of $SIZE bytes, one TLS mosquitto, counting subscriber (QoS1); median of $REPEAT rounds"
echo
echo "| run | delivered msgs | readings | seconds | msgs/s | readings/s | peak RSS KiB (private + binary at the end) | ratio | goal |"
echo "|---|---|---|---|---|---|---|---|---|"
row() { # name ratio goal
	printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$1" "${MSGS[$1]:-0}" "${READS[$1]:-0}" "$(f2 "${SEC[$1]}")" \
		"$(f0 "$(rate "$1")")" "$(f0 "$(rrate "$1")")" "${RSS[$1]:--}" "$2" "$3"
}
row mosquitto_pub_q0 "1.00 (QoS0 ref)" "-"
row paho_q1 "1.00 (QoS1 ref)" "-"
row agent_q0 "$(f2 "$(ratio "$(rate agent_q0)" "$q0ref")")× mosquitto_pub" "≥ 1.0"
row agent_q1 "$(f2 "$(ratio "$(rate agent_q1)" "$q1ref")")× paho" "≥ 1.5"
row agent_q1_b64 "$(f2 "$(ratio "$(rrate agent_q1_b64)" "$q0ref")")× mosquitto_pub (readings/s)" "≥ 10"
row agent_q1_seal "$(f2 "$(ratio "$(rate agent_q1_seal)" "$(rate agent_q1)")")× unsealed QoS1" "≥ 0.9"
row agent_q1_gogc30 "$(f2 "$(ratio "$(rate agent_q1_gogc30)" "$q1ref")")× paho (GOGC=30)" "RSS ≤ 20 MiB"
echo
for k in "${CASES[@]}"; do echo "trials $k (seconds delivered readings rss_peak anon file, KiB): $(tr '\n' ';' <"$D/trials-$k")"; done
