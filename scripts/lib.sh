# shellcheck shell=bash
# Shared by demo.sh, demo-ota.sh, bench.sh and fleet-test.sh: free loopback
# ports, swtpm and a lab TLS mosquitto. Source it after `set -euo pipefail`
# and `pids=()`; every process started here is appended to pids, so the
# caller's cleanup trap stops it.

# free_port prints a port p with p and p+1 free on 127.0.0.1, below the
# ephemeral range (ip_local_port_range starts at 32768) so that outgoing
# connections cannot take it between the pick and the bind.
free_port() {
	local p
	for _ in $(seq 1 200); do
		p=$((10000 + RANDOM % 22000))
		if ! (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && ! (exec 3<>/dev/tcp/127.0.0.1/$((p + 1))) 2>/dev/null; then
			echo "$p"
			return
		fi
	done
	echo "no free port pair on 127.0.0.1" >&2
	return 1
}

# wait_port PORT: waits up to 10 s until 127.0.0.1:PORT accepts connections.
wait_port() {
	for _ in $(seq 1 200); do
		(exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
		sleep 0.05
	done
	echo "nothing listens on 127.0.0.1:$1" >&2
	return 1
}

# start_swtpm STATEDIR LOG: starts swtpm on a free port pair (command port,
# control port +1) with its state in STATEDIR and sets SWTPM_PORT to the
# command port (call it directly, not in $(...), so that pids keeps it).
# A port taken between pick and bind is retried with another.
start_swtpm() {
	local dir=$1 log=$2 p sp
	for _ in 1 2 3 4 5; do
		p=$(free_port) || return 1
		swtpm socket --tpm2 --server type=tcp,port="$p",bindaddr=127.0.0.1 \
			--ctrl type=tcp,port=$((p + 1)),bindaddr=127.0.0.1 \
			--tpmstate dir="$dir" --flags not-need-init,startup-clear >"$log" 2>&1 &
		sp=$!
		if wait_port "$p" 2>/dev/null && kill -0 "$sp" 2>/dev/null; then
			pids+=("$sp")
			SWTPM_PORT=$p
			return 0
		fi
		kill "$sp" 2>/dev/null || true
	done
	echo "swtpm did not start (state $dir):" >&2
	tail -5 "$log" >&2
	return 1
}

# start_mosquitto DIR PORT CAFILE CERTFILE KEYFILE [EXTRA-LINE...]: writes
# DIR/mosquitto.conf for a TLS listener on 127.0.0.1:PORT that requires a
# client certificate and takes its CN as the username, starts mosquitto and
# waits for it. Logs go to DIR/mosquitto.log.
start_mosquitto() {
	local dir=$1 port=$2 ca=$3 cert=$4 key=$5
	shift 5
	{
		echo "user root"
		echo "per_listener_settings false"
		echo "allow_anonymous false"
		echo "persistence false"
		# a subscriber that counts every QoS1 message must not be cut off
		echo "max_queued_messages 0"
		echo "max_inflight_messages 0"
		# Nagle + delayed ACK otherwise add ~40 ms to every connection
		echo "set_tcp_nodelay true"
		echo "log_dest file $dir/mosquitto.log"
		echo "listener $port 127.0.0.1"
		echo "cafile $ca"
		echo "certfile $cert"
		echo "keyfile $key"
		echo "require_certificate true"
		echo "use_identity_as_username true"
		for line in "$@"; do echo "$line"; done
	} >"$dir/mosquitto.conf"
	mosquitto -c "$dir/mosquitto.conf" >"$dir/mosquitto.out" 2>&1 &
	pids+=($!)
	wait_port "$port" || { cat "$dir/mosquitto.out" >&2; return 1; }
}
