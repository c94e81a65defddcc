#!/usr/bin/env bash
# provision-fleet.sh: enrol an emulated fleet of swtpm-backed devices (or sign bundles
# collected from real devices) with TPM attestation.
#
#   provision-fleet.sh --count N --out DIR [--ca-dir DIR] [--broker URL] [--prefix dev-]
#                      [--jobs J] [--validity DURATION] [--tpmagent BIN]
#   provision-fleet.sh --csr-dir DIR --out DIR --manufacturer-ca FILE [...]
#
# Emulated fleet, per device <id> (dev-0001 … dev-NNNN):
#   1. DIR/devices/<id>/tpm: swtpm state made by `swtpm_setup --tpm2 --create-ek-cert`; its
#      EK certificate is signed by this fleet's own swtpm-localca ("the manufacturer", state in
#      DIR/manufacturer, so runs never share /var/lib/swtpm-localca);
#   2. swtpm is started on a free loopback port pair for the duration of the enrolment;
#   3. `tpmagent key create` (SRK + device key in the TPM);
#   4. `tpmagent fleet ca sign`: attestation bundle (EK cert, AK, TPM2_Certify, CSR; kept as
#      bundle.json), verification against the manufacturer CA, credential activation with the
#      same TPM, issuance by the fleet CA -> device.pem;
#   5. agent.yaml for the device; swtpm is stopped again.
# Then DIR/inventory.csv (id,serial,fingerprint,not_after,state_dir) and DIR/mosquitto.acl
# (each device may use only devices/<id>/# and its own $fleet topics; user fleet-ca serves
# $fleet/certificates/+/request) are rewritten from all enrolled devices.
#
# Layout: DIR/ca/{ca.pem,ca.key (0600),broker.pem,broker.key,fleet-ca.pem,fleet-ca.key},
# DIR/manufacturer/ca/{swtpm-localca-rootca-cert.pem,issuercert.pem}, DIR/devices/<id>/
# {agent.yaml,device.pem,bundle.json,tpm/}, DIR/inventory.csv, DIR/mosquitto.acl.
#
# Running a device later: swtpm has no fixed port. agent.yaml holds the port used at
# provisioning time; whoever starts the device starts swtpm from its state directory on
# ports of its choice and overrides the setting, e.g.
#   swtpm socket --tpm2 --server type=tcp,port=P,bindaddr=127.0.0.1 \
#     --ctrl type=tcp,port=$((P+1)),bindaddr=127.0.0.1 --tpmstate dir=DIR/devices/<id>/tpm \
#     --flags not-need-init,startup-clear &
#   TPMAGENT_TPM_DEVICE=swtpm://127.0.0.1:P tpmagent run --config DIR/devices/<id>/agent.yaml
# (the environment wins over the file). The fleet test does exactly that.
#
# Re-running is idempotent: a device whose device.pem exists and is still valid is skipped;
# the CA and the manufacturer are reused. Every swtpm this script starts is stopped on exit.
#
# --csr-dir DIR: real devices. Each device leaves <id>.bundle.json there (`tpmagent key
# attest -o`). A first run writes <id>.challenge.json (+ .pending, the CA's record); after the
# device answered it (`tpmagent key attest --challenge <id>.challenge.json -o
# <id>.response.json`) a second run issues DIR/devices/<id>/device.pem.
set -euo pipefail

count=0 out="" ca_dir="" broker="mqtts://127.0.0.1:8883" csr_dir="" prefix="dev-" jobs=4
validity="8760h" tpmagent="${TPMAGENT:-}" manufacturer_ca=()

usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
	case "$1" in
	--count) count=${2:?}; shift 2 ;;
	--out) out=${2:?}; shift 2 ;;
	--ca-dir) ca_dir=${2:?}; shift 2 ;;
	--broker) broker=${2:?}; shift 2 ;;
	--csr-dir) csr_dir=${2:?}; shift 2 ;;
	--prefix) prefix=${2:?}; shift 2 ;;
	--jobs) jobs=${2:?}; shift 2 ;;
	--validity) validity=${2:?}; shift 2 ;;
	--tpmagent) tpmagent=${2:?}; shift 2 ;;
	--manufacturer-ca) manufacturer_ca+=("${2:?}"); shift 2 ;;
	-h|--help) usage ;;
	*) echo "provision-fleet: unknown argument $1" >&2; usage ;;
	esac
done
[ -n "$out" ] || { echo "provision-fleet: --out DIR is required" >&2; usage; }
if [ -z "$csr_dir" ] && ! [ "$count" -ge 1 ] 2>/dev/null; then
	echo "provision-fleet: --count N (N >= 1) or --csr-dir DIR is required" >&2; usage
fi
for tool in openssl; do command -v $tool >/dev/null || { echo "provision-fleet: $tool not found" >&2; exit 1; }; done
if [ -z "$csr_dir" ]; then
	for tool in swtpm swtpm_setup swtpm_localca; do
		command -v $tool >/dev/null || { echo "provision-fleet: $tool not found: apt-get install swtpm swtpm-tools" >&2; exit 1; }
	done
fi

mkdir -p "$out/devices"
out=$(cd "$out" && pwd)
ca_dir=${ca_dir:-$out/ca}
mkdir -p "$ca_dir"
ca_dir=$(cd "$ca_dir" && pwd)

# The tpmagent binary: --tpmagent, $TPMAGENT, or built from this checkout.
if [ -z "$tpmagent" ]; then
	root=$(cd "$(dirname "$0")/.." && pwd)
	tpmagent="$out/.bin/tpmagent"
	mkdir -p "$out/.bin"
	(cd "$root" && CGO_ENABLED=0 go build -o "$tpmagent" ./cmd/tpmagent)
fi

"$tpmagent" fleet ca init --dir "$ca_dir" --cn "tpmagent fleet CA" >/dev/null
ca_args=(--ca-cert "$ca_dir/ca.pem" --ca-key "$ca_dir/ca.key" --validity "$validity")

# ---- the manufacturer: a swtpm-localca of this fleet ----
mfr="$out/manufacturer"
setup_manufacturer() {
	mkdir -p "$mfr/ca"
	cat >"$mfr/swtpm-localca.conf" <<-EOF
		statedir = $mfr/ca
		signingkey = $mfr/ca/signkey.pem
		issuercert = $mfr/ca/issuercert.pem
		certserial = $mfr/ca/certserial
	EOF
	printf -- '--platform-manufacturer tpmagent-lab\n--platform-version 2.1\n--platform-model swtpm\n' >"$mfr/swtpm-localca.options"
	cat >"$mfr/swtpm_setup.conf" <<-EOF
		create_certs_tool = $(command -v swtpm_localca)
		create_certs_tool_config = $mfr/swtpm-localca.conf
		create_certs_tool_options = $mfr/swtpm-localca.options
		active_pcr_banks = sha256
	EOF
}

# ---- swtpm processes: every one we start is recorded and stopped on exit ----
pids_dir="$out/.pids"
mkdir -p "$pids_dir"
cleanup() {
	local f
	for f in "$pids_dir"/*.pid; do
		[ -e "$f" ] || continue
		kill "$(cat "$f")" 2>/dev/null || true
		rm -f "$f"
	done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# start_swtpm ID STATEDIR: starts swtpm, prints its command port.
start_swtpm() {
	local id=$1 state=$2 attempt port pid
	for attempt in 1 2 3 4 5 6 7 8 9 10; do
		port=$((20000 + (RANDOM * 2 + RANDOM % 2) % 40000))
		port_free "$port" && port_free $((port + 1)) || continue
		swtpm socket --tpm2 --server "type=tcp,port=$port,bindaddr=127.0.0.1" \
			--ctrl "type=tcp,port=$((port + 1)),bindaddr=127.0.0.1" --tpmstate "dir=$state" \
			--flags not-need-init,startup-clear --log "file=$state/../swtpm.log,level=0" </dev/null >/dev/null 2>&1 &
		pid=$!
		echo "$pid" >"$pids_dir/$id.pid"
		for _ in $(seq 1 100); do
			if ! kill -0 "$pid" 2>/dev/null; then break; fi
			if ! port_free "$port"; then echo "$port"; return 0; fi
			sleep 0.02
		done
		kill "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
		rm -f "$pids_dir/$id.pid"
	done
	echo "provision-fleet: $id: swtpm did not start (see $state/../swtpm.log)" >&2
	return 1
}

stop_swtpm() {
	local id=$1 f="$pids_dir/$1.pid"
	[ -e "$f" ] || return 0
	local pid
	pid=$(cat "$f")
	kill "$pid" 2>/dev/null || true
	for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.02; done
	rm -f "$f"
}

write_agent_yaml() {
	local id=$1 dir=$2 port=$3
	cat >"$dir/agent.yaml" <<-EOF
		# written by scripts/provision-fleet.sh; tpm.device holds the port used at provisioning:
		# start swtpm from $dir/tpm and set TPMAGENT_TPM_DEVICE=swtpm://127.0.0.1:PORT.
		device_id: $id
		state_dir: $dir/state
		tpm:
		  device: swtpm://127.0.0.1:$port
		  srk_handle: "0x81000002"
		  key_handle: "0x81000100"
		  key_type: ecc-p256
		broker:
		  urls: [$broker]
		  ca_file: $ca_dir/ca.pem
		  cert_file: $dir/device.pem
		telemetry:
		  topic: "devices/{device_id}/telemetry"
		  socket: $dir/state/telemetry.sock
		spool:
		  dir: $dir/state/spool
		status:
		  socket: $dir/state/status.sock
		enrol:
		  renew_handle: "0x81000101"
	EOF
}

enrolled() { [ -s "$1/device.pem" ] && openssl x509 -in "$1/device.pem" -noout -checkend 0 >/dev/null 2>&1; }

# enrol_device ID: the whole per-device flow; its log is DIR/devices/ID/provision.log.
enrol_device() {
	local id=$1 dir="$out/devices/$1" port
	mkdir -p "$dir/tpm" "$dir/state"
	exec >"$dir/provision.log" 2>&1
	if [ ! -e "$dir/tpm/tpm2-00.permall" ] || [ ! -e "$dir/tpm/.manufactured" ]; then
		swtpm_setup --tpm2 --create-ek-cert --overwrite --tpmstate "$dir/tpm" --config "$mfr/swtpm_setup.conf" \
			--logfile "$dir/swtpm_setup.log"
		touch "$dir/tpm/.manufactured"
	fi
	port=$(start_swtpm "$id" "$dir/tpm")
	write_agent_yaml "$id" "$dir" "$port"
	"$tpmagent" key create --config "$dir/agent.yaml"
	"$tpmagent" fleet ca sign --config "$dir/agent.yaml" "${ca_args[@]}" \
		--manufacturer-ca "$mfr/ca/swtpm-localca-rootca-cert.pem" --manufacturer-ca "$mfr/ca/issuercert.pem" \
		--bundle-out "$dir/bundle.json" -o "$dir/device.pem"
	stop_swtpm "$id"
}

failed=0
if [ -z "$csr_dir" ]; then
	setup_manufacturer
	# The first device creates the manufacturer's root CA; run it alone.
	todo=()
	for i in $(seq 1 "$count"); do
		id=$(printf '%s%04d' "$prefix" "$i")
		if enrolled "$out/devices/$id"; then continue; fi
		todo+=("$id")
	done
	echo "provision-fleet: $((count - ${#todo[@]})) of $count devices already enrolled, enrolling ${#todo[@]}" >&2
	running=0
	first=1
	for id in "${todo[@]}"; do
		if [ $first = 1 ] && [ ! -e "$mfr/ca/issuercert.pem" ]; then
			(enrol_device "$id") || { echo "provision-fleet: $id failed: see $out/devices/$id/provision.log" >&2; failed=$((failed + 1)); }
			first=0
			continue
		fi
		first=0
		( enrol_device "$id" ) || { echo "provision-fleet: $id failed: see $out/devices/$id/provision.log" >&2; exit 1; } &
		running=$((running + 1))
		if [ "$running" -ge "$jobs" ]; then
			wait -n || failed=$((failed + 1))
			running=$((running - 1))
		fi
	done
	while [ "$running" -gt 0 ]; do
		wait -n || failed=$((failed + 1))
		running=$((running - 1))
	done
else
	[ ${#manufacturer_ca[@]} -gt 0 ] || { echo "provision-fleet: --csr-dir needs --manufacturer-ca FILE (the EK CAs)" >&2; exit 2; }
	mca=()
	for f in "${manufacturer_ca[@]}"; do mca+=(--manufacturer-ca "$f"); done
	shopt -s nullglob
	for b in "$csr_dir"/*.bundle.json; do
		id=$(basename "$b" .bundle.json)
		dir="$out/devices/$id"
		if enrolled "$dir"; then continue; fi
		ch="$csr_dir/$id.challenge.json" resp="$csr_dir/$id.response.json"
		if [ -e "$resp" ] && [ -e "$ch.pending" ]; then
			mkdir -p "$dir"
			cp "$b" "$dir/bundle.json"
			"$tpmagent" fleet ca issue "${ca_args[@]}" "${mca[@]}" --bundle "$b" --pending "$ch.pending" \
				--response "$resp" -o "$dir/device.pem" || { failed=$((failed + 1)); continue; }
		else
			"$tpmagent" fleet ca challenge "${mca[@]}" --bundle "$b" -o "$ch" || { failed=$((failed + 1)); continue; }
			echo "provision-fleet: $id: challenge written to $ch; have the device answer it into $resp and run again" >&2
		fi
	done
fi

# ---- inventory and ACL, rebuilt from every enrolled device ----
inv="$out/inventory.csv.tmp" acl="$out/mosquitto.acl.tmp"
echo "id,serial,fingerprint,not_after,state_dir" >"$inv"
{
	echo "# written by scripts/provision-fleet.sh: each device may use only devices/<id>/# and its \$fleet topics"
	echo "user fleet-ca"
	echo "topic read \$fleet/certificates/+/request"
	echo "topic write \$fleet/certificates/+/response"
} >"$acl"
n=0
for dir in "$out"/devices/*/; do
	dir=${dir%/}
	id=$(basename "$dir")
	enrolled "$dir" || continue
	serial=$(openssl x509 -in "$dir/device.pem" -noout -serial | cut -d= -f2 | tr 'A-F' 'a-f')
	fp=$(openssl x509 -in "$dir/device.pem" -noout -pubkey | openssl pkey -pubin -outform DER | sha256sum | cut -d' ' -f1)
	na=$(date -u -d "$(openssl x509 -in "$dir/device.pem" -noout -enddate | cut -d= -f2)" +%Y-%m-%dT%H:%M:%SZ)
	state=""
	[ -d "$dir/tpm" ] && state="$dir/tpm"
	echo "$id,$serial,$fp,$na,$state" >>"$inv"
	{
		echo ""
		echo "user $id"
		echo "topic readwrite devices/$id/#"
		echo "topic write \$fleet/certificates/$id/request"
		echo "topic read \$fleet/certificates/$id/response"
	} >>"$acl"
	n=$((n + 1))
done
mv "$inv" "$out/inventory.csv"
mv "$acl" "$out/mosquitto.acl"
echo "provision-fleet: $n devices enrolled in $out (inventory.csv, mosquitto.acl); $failed failed" >&2
[ "$failed" -eq 0 ]
