#!/usr/bin/env bash
# make vm-test: the amd64 Debian package under a real systemd (PID 1) with a
# real kernel TPM device (/dev/tpmrm0 from the kernel's tpm_tis driver and
# resource manager), in a qemu VM whose TPM is swtpm.
#
#   1. A Debian 12 root file system (debootstrap minbase + systemd, udev,
#      linux-image-amd64, tpm-udev), cached as a tarball under $VM_CACHE keyed
#      by the package list, so reruns skip debootstrap.
#   2. On the host: swtpm over TCP on a fresh state dir; `tpmagent key create`
#      and `tpmagent key csr` (the binary from the .deb) against swtpm://; the
#      lab CA signs the CSR; swtpm shut down; then swtpm again on the same
#      state as qemu's TPM (unixio control socket).
#   3. A TLS mosquitto (require_certificate) and a subscriber on the host; the
#      guest's only network is qemu user networking with restrict=on and one
#      guestfwd 10.0.2.100:8883 -> that broker.
#   4. In the guest, a oneshot unit (tpmagent-vm-test.service) installs the
#      .deb with dpkg -i, drops the config (tpm.device /dev/tpmrm0), the CA
#      and the device certificate, `systemctl enable --now tpmagent`, checks
#      Type=notify readiness, the user/groups/hardening, readings, reload,
#      the watchdog restart of a stopped agent, a clean stop, `systemd-analyze
#      security` and the journal format, prints PASS/FAIL lines on the second
#      serial port and powers off.
#   5. On the host: every PASS line, no FAIL, and the subscriber got every
#      reading sent in the guest and system readings from the agent.
#
# Uses KVM when /dev/kvm is usable, TCG otherwise (longer timeout). Needs
# root (debootstrap, chroot, loop-free mke2fs -d) and the packages from
# scripts/ci-deps.sh. Exit 0 only if every check passed.
#
# Environment: VM_CACHE (/var/cache/tpmagent-vm), VM_MIRROR
# (http://deb.debian.org/debian), VM_TPM (tpm-tis or tpm-crb), VM_READINGS
# (1000), VM_TIMEOUT (seconds; 300 with KVM, 1200 with TCG), VM_ACCEL (kvm or
# tcg to force one), KEEP=1 keeps the work directory.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VM_CACHE=${VM_CACHE:-/var/cache/tpmagent-vm}
VM_MIRROR=${VM_MIRROR:-http://deb.debian.org/debian}
VM_SUITE=bookworm
VM_TPM=${VM_TPM:-tpm-tis}
VM_READINGS=${VM_READINGS:-1000}
# Packages of the guest besides minbase. Changing the list (or the recipe
# version) changes the cache key.
VM_PACKAGES=systemd,systemd-sysv,udev,dbus,linux-image-amd64,initramfs-tools,kmod,procps,tpm-udev
VM_RECIPE=1

T0=$(date +%s.%N)
TP=$T0
phase() {
	local now
	now=$(date +%s.%N)
	awk -v a="$T0" -v b="$TP" -v n="$now" -v m="$*" 'BEGIN { printf "\n== vm-test [%6.1fs, +%5.1fs] %s\n", n - a, n - b, m }'
	TP=$now
}
die() { echo "vm-test: FAIL: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot, dpkg in the guest root)"

phase "dependencies (scripts/ci-deps.sh)"
bash scripts/ci-deps.sh
for c in qemu-system-x86_64 debootstrap mke2fs swtpm swtpm_ioctl mosquitto mosquitto_sub openssl socat dpkg-deb flock; do
	command -v "$c" >/dev/null || die "$c missing after scripts/ci-deps.sh"
done

debs=(dist/tpmagent_*_amd64.deb)
[ -f "${debs[0]}" ] || die "no dist/tpmagent_*_amd64.deb: run make deb first (make vm-test does)"
[ ${#debs[@]} -eq 1 ] || die "more than one amd64 package in dist/: ${debs[*]}"
DEB=$ROOT/${debs[0]}
echo "package: $DEB"

pids=()
QEMU=
W=$(mktemp -d /var/tmp/tpmagent-vm.XXXXXX)
cleanup() {
	local rc=$?
	[ -n "$QEMU" ] && kill "$QEMU" 2>/dev/null
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	if [ "${KEEP:-0}" = 1 ]; then
		echo "vm-test: work directory kept: $W"
	else
		rm -rf "$W"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

ACCEL=${VM_ACCEL:-}
ACCEL_WHY="VM_ACCEL=$ACCEL"

phase "guest root file system ($VM_SUITE minbase + $VM_PACKAGES)"
KEY=$(printf '%s\n' "$VM_SUITE" "$VM_MIRROR" "$VM_PACKAGES" "$VM_RECIPE" | sha256sum | cut -c1-16)
TARBALL=$VM_CACHE/rootfs-$VM_SUITE-$KEY.tar
mkdir -p "$VM_CACHE"
(
	# One builder at a time per cache.
	flock 9
	if [ -f "$TARBALL" ]; then
		echo "cached: $TARBALL ($(du -h "$TARBALL" | cut -f1))"
		exit 0
	fi
	echo "not cached: debootstrap from $VM_MIRROR (a minute or two)"
	b=$W/debootstrap
	# Two tries: a mirror hiccup should not fail the suite; a second failure does.
	ok=0
	for try in 1 2; do
		rm -rf "$b"
		if debootstrap --variant=minbase --include="$VM_PACKAGES" "$VM_SUITE" "$b" "$VM_MIRROR" >"$W/debootstrap.log" 2>&1; then
			ok=1
			break
		fi
		echo "debootstrap try $try failed: $(tail -1 "$W/debootstrap.log")" >&2
		sleep 5
	done
	if [ "$ok" != 1 ]; then
		tail -20 "$W/debootstrap.log" >&2
		[ -f "$b/debootstrap/debootstrap.log" ] && tail -20 "$b/debootstrap/debootstrap.log" >&2
		echo "vm-test: FAIL: debootstrap (log above)" >&2
		exit 1
	fi
	chroot "$b" apt-get clean
	rm -rf "$b"/var/lib/apt/lists/* "$b"/boot/*.dpkg-bak "$b"/boot/*.new
	ls "$b"/boot/vmlinuz-* "$b"/boot/initrd.img-* >/dev/null || { echo "vm-test: FAIL: no kernel/initrd in the guest /boot" >&2; exit 1; }
	tar -C "$b" --numeric-owner --xattrs -cf "$TARBALL.tmp" .
	mv "$TARBALL.tmp" "$TARBALL"
	rm -rf "$b"
	echo "cached: $TARBALL ($(du -h "$TARBALL" | cut -f1))"
) 9>"$VM_CACHE/.lock"
R=$W/root
mkdir "$R"
tar -C "$R" --numeric-owner --xattrs -xf "$TARBALL"
KERNEL=$(printf '%s\n' "$R"/boot/vmlinuz-* | sort -V | tail -1)
INITRD=$(printf '%s\n' "$R"/boot/initrd.img-* | sort -V | tail -1)
echo "kernel: ${KERNEL##*/}; TPM drivers: $(grep -E '^CONFIG_TCG_(TIS|CRB)=' "$R"/boot/config-* | cut -d_ -f3 | tr '\n' ' ')"
cp "$KERNEL" "$W/vmlinuz"
cp "$INITRD" "$W/initrd.img"

phase "accelerator"
# Accelerator: KVM when /dev/kvm opens and really runs this kernel (a probe
# boot without a root file system must reach its panic and exit); TCG
# otherwise. Some hosts have a /dev/kvm that cannot run a stock kernel
# (e.g. -cpu host rejected under nested virtualisation, or kvm_pvm, which
# needs a PVM guest kernel): the probe catches both.
if [ -z "$ACCEL" ]; then
	if [ ! -c /dev/kvm ] || ! (exec 3<>/dev/kvm) 2>/dev/null; then
		ACCEL=tcg ACCEL_WHY="/dev/kvm missing or not usable"
	elif timeout 20 qemu-system-x86_64 -nodefaults -machine q35,accel=kvm -cpu host -m 256 -display none -no-reboot \
		-kernel "$W/vmlinuz" -append "console=ttyS0 panic=-1" -serial file:"$W/kvm-probe.log" >"$W/kvm-probe.out" 2>&1 &&
		grep -q 'Linux version' "$W/kvm-probe.log"; then
		ACCEL=kvm ACCEL_WHY="/dev/kvm usable (probe boot ok)"
	else
		ACCEL=tcg ACCEL_WHY="/dev/kvm present but a probe boot failed ($(grep -m1 -i 'error' "$W/kvm-probe.out" || echo "no kernel output in 20 s"))"
	fi
fi
case $ACCEL in
kvm) CPU=host; VM_TIMEOUT=${VM_TIMEOUT:-300} ;;
tcg) CPU=max; VM_TIMEOUT=${VM_TIMEOUT:-1200} ;;
*) die "VM_ACCEL=$ACCEL: kvm or tcg" ;;
esac
echo "accelerator: $ACCEL: $ACCEL_WHY; guest timeout ${VM_TIMEOUT}s"

phase "TPM provisioning on the host: swtpm over TCP, key create, CSR, lab CA"
mkdir -p "$W/tpm" "$W/pki" "$W/host"
dpkg-deb --fsys-tarfile "$DEB" | tar -xO ./usr/bin/tpmagent >"$W/tpmagent"
chmod +x "$W/tpmagent"
"$W/tpmagent" version
start_swtpm "$W/tpm" "$W/swtpm-provision.log"
PROV_SWTPM=${pids[-1]}
cat >"$W/host/agent.yaml" <<YAML
device_id: vm-device
state_dir: $W/host/state
tpm: { device: "swtpm://127.0.0.1:$SWTPM_PORT" }
broker: { urls: [mqtts://127.0.0.1:1] }
YAML
"$W/tpmagent" --config "$W/host/agent.yaml" key create
"$W/tpmagent" --config "$W/host/agent.yaml" key csr --cn vm-device -o "$W/pki/device.csr"
bash scripts/lab-pki.sh init "$W/pki" >/dev/null
bash scripts/lab-pki.sh sign "$W/pki" "$W/pki/device.csr" "$W/pki/device.pem"
bash scripts/lab-pki.sh client "$W/pki" vm-subscriber
# TPM2_Shutdown and stop: the state directory now holds the persistent keys.
swtpm_ioctl --tcp 127.0.0.1:$((SWTPM_PORT + 1)) -s >/dev/null
for _ in $(seq 1 100); do kill -0 "$PROV_SWTPM" 2>/dev/null || break; sleep 0.05; done
kill -0 "$PROV_SWTPM" 2>/dev/null && die "provisioning swtpm did not stop"
wait "$PROV_SWTPM" 2>/dev/null || true
unset 'pids[-1]'

phase "broker and subscriber on the host"
BROKER_PORT=$(free_port)
start_mosquitto "$W" "$BROKER_PORT" "$W/pki/ca.pem" "$W/pki/server.pem" "$W/pki/server.key"
mosquitto_sub -h 127.0.0.1 -p "$BROKER_PORT" --cafile "$W/pki/ca.pem" --cert "$W/pki/vm-subscriber.pem" \
	--key "$W/pki/vm-subscriber.key" -i vm-subscriber -q 1 -t 'devices/#' -v >"$W/received.txt" 2>"$W/sub.err" &
pids+=($!)
for _ in $(seq 1 100); do grep -q "vm-subscriber" "$W/mosquitto.log" 2>/dev/null && break; sleep 0.05; done
grep -q "vm-subscriber" "$W/mosquitto.log" || die "subscriber did not connect: $(cat "$W/sub.err")"
echo "mosquitto on 127.0.0.1:$BROKER_PORT; the guest reaches it as 10.0.2.100:8883"

phase "firmware release on the host: keygen, sign, publish (served over MQTT)"
"$W/tpmagent" firmware keygen -o "$W/release.key" >/dev/null
head -c 300000 /dev/urandom >"$W/fw-2.0.0.img"
"$W/tpmagent" firmware sign --key "$W/release.key" --image "$W/fw-2.0.0.img" --version 2.0.0 --security-version 1 \
	--hardware vm-board --chunk-size 65536 -o "$W/fw-2.0.0.json" >/dev/null
bash scripts/lab-pki.sh client "$W/pki" release-backend
cat >"$W/host/publisher.yaml" <<YAML
broker:
  urls: [mqtts://127.0.0.1:$BROKER_PORT]
  ca_file: $W/pki/ca.pem
  cert_file: $W/pki/release-backend.pem
  key_file: $W/pki/release-backend.key
firmware: { trust: [$W/release.key.pub] }
log: { level: error }
YAML
# The job is retained; the guest's agent sees it once its firmware updater
# is enabled, at the end of the guest checks.
"$W/tpmagent" --config "$W/host/publisher.yaml" firmware publish --manifest "$W/fw-2.0.0.json" --image "$W/fw-2.0.0.img" \
	--device vm-device --until committed,rolled_back,rejected,failed >"$W/publish.log" 2>&1 &
pids+=($!)
echo "release 2.0.0 (security_version 1, hardware vm-board, $(stat -c %s "$W/fw-2.0.0.img") bytes) published for vm-device"

phase "guest setup: config, certificates, test unit, disk image"
echo "tpmagent-vm" >"$R/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 tpmagent-vm\n' >"$R/etc/hosts"
od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$R/etc/machine-id"
echo >>"$R/etc/machine-id"
echo "/dev/vda / ext4 rw,noatime 0 1" >"$R/etc/fstab"
mkdir -p "$R/etc/systemd/network"
cat >"$R/etc/systemd/network/10-vm.network" <<'EOF'
[Match]
Type=ether
[Network]
Address=10.0.2.15/24
LinkLocalAddressing=no
IPv6AcceptRA=no
EOF
chroot "$R" systemctl enable systemd-networkd.service >/dev/null 2>&1
chroot "$R" systemctl mask apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer fstrim.timer \
	getty@tty1.service serial-getty@ttyS0.service serial-getty@ttyS1.service >/dev/null 2>&1
mkdir -p "$R/root/vm"
cp "$DEB" "$R/root/vm/tpmagent.deb"
cp "$W/pki/ca.pem" "$W/pki/device.pem" "$W/release.key.pub" "$R/root/vm/"
cat >"$R/root/vm/firmware.yaml" <<YAML
firmware:
  enabled: true
  trust: [/etc/tpmagent/release.key.pub]
  hardware: vm-board
  installer: file
  health_timeout: 60s
YAML
cat >"$R/root/vm/agent.yaml" <<YAML
# tpmagent in the vm-test guest (scripts/vm-test.sh): the kernel's TPM
# resource manager; the broker through qemu's guestfwd.
device_id: vm-device
tpm: { device: /dev/tpmrm0 }
broker:
  urls: [mqtts://10.0.2.100:8883]
  ca_file: /etc/tpmagent/ca.pem
  cert_file: /var/lib/tpmagent/device.pem
  server_name: localhost
  backoff_max: 5s
telemetry:
  system_interval: 2s
YAML
cat >"$R/root/vm/env" <<EOF
READINGS=$VM_READINGS
HOST_BROKER_PORT=$BROKER_PORT
EOF
install -m 0755 /dev/stdin "$R/usr/local/sbin/tpmagent-vm-test" <<'GUEST'
#!/bin/bash
# Runs inside the vm-test guest as tpmagent-vm-test.service; prints PASS/FAIL
# lines on /dev/ttyS1 (the host's results file) and powers off.
set -u
. /root/vm/env
failures=0
completed=0
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
info() { echo "info: $*"; }
prop() { systemctl show -p "$1" --value tpmagent.service; }
status_num() { tpmagent status --json 2>/dev/null | tr -d ' \n' | sed -n "s/.*\"$1\":\([0-9]*\).*/\1/p"; }
status_field() { tpmagent status --json 2>/dev/null | tr -d ' \n' | sed -n "s/.*\"$1\":\([a-z]*\).*/\1/p"; }
connected() { [ "$(status_field connected)" = true ]; }
# wait_for SECONDS CMD...: polls CMD every 0.2 s.
wait_for() {
	local end=$((SECONDS + $1))
	shift
	while [ $SECONDS -lt $end ]; do "$@" && return 0; sleep 0.2; done
	"$@"
}
finish() {
	echo "--- journal of tpmagent.service (last 40 lines, -o short-monotonic)"
	journalctl -u tpmagent.service -o short-monotonic --no-pager | grep -vE '\.go:[0-9]|\(0x|goroutine [0-9]|\]: *$' | tail -40
	# completed=1 only when the script ran to its end: an early exit (a
	# check that cannot go on, a syntax error) is never a pass.
	echo "VMTEST DONE failures=$failures completed=$completed"
	sync
	systemctl poweroff --no-block
	exit 0
}
trap finish EXIT

info "kernel $(uname -r), $(systemctl --version | head -1), PID 1: $(cat /proc/1/comm)"

# The kernel TPM device.
if wait_for 30 test -c /dev/tpmrm0; then
	drv=$(basename "$(readlink -f /sys/class/tpm/tpm0/device/driver)")
	pass "kernel TPM: /dev/tpmrm0 $(stat -c '%A %U:%G' /dev/tpmrm0) (driver $drv, TPM 2.0: $(cat /sys/class/tpm/tpm0/tpm_version_major 2>/dev/null))"
else
	fail "no /dev/tpmrm0 after 30 s: $(ls /dev/tpm* 2>&1); $(dmesg | grep -i tpm | tail -3)"
	exit
fi

# The network: only the broker, through guestfwd.
if timeout 5 bash -c 'exec 3<>/dev/tcp/10.0.2.100/8883' 2>/dev/null; then
	pass "network: broker reachable at 10.0.2.100:8883 (qemu guestfwd)"
else
	fail "network: 10.0.2.100:8883 (guestfwd to the host broker) not reachable"
fi
if timeout 5 bash -c "exec 3<>/dev/tcp/10.0.2.2/$HOST_BROKER_PORT" 2>/dev/null; then
	fail "network: the host's 10.0.2.2:$HOST_BROKER_PORT answered; restrict=on should block it"
else
	pass "network: host address 10.0.2.2:$HOST_BROKER_PORT unreachable (restrict=on)"
fi

# The package.
if out=$(dpkg -i /root/vm/tpmagent.deb 2>&1); then
	pass "dpkg -i: $(dpkg-query -W -f='${Package} ${Version} ${Architecture}' tpmagent) installed under a running systemd"
else
	fail "dpkg -i: $out"
	exit
fi
if id -nG tpmagent | tr ' ' '\n' | grep -qx tss; then
	pass "postinst: user tpmagent in group tss; unit $(systemctl is-enabled tpmagent.service 2>&1) (not enabled by the package)"
else
	fail "postinst: user tpmagent missing or not in tss: $(id tpmagent 2>&1)"
fi
if [ "$(stat -c '%U:%G %a' /etc/tpmagent/agent.yaml)" = "root:tpmagent 640" ]; then
	pass "postinst: /etc/tpmagent/agent.yaml root:tpmagent 0640"
else
	fail "postinst: /etc/tpmagent/agent.yaml is $(stat -c '%U:%G %a' /etc/tpmagent/agent.yaml), want root:tpmagent 640"
fi
# The package's config file keeps its owner and mode; only the content changes.
cat /root/vm/agent.yaml >/etc/tpmagent/agent.yaml
install -m 0644 /root/vm/ca.pem /etc/tpmagent/ca.pem
install -m 0644 -o tpmagent -g tpmagent /root/vm/device.pem /var/lib/tpmagent/device.pem

# Start: Type=notify, so systemctl returns once READY=1 arrived.
t=$SECONDS
if out=$(timeout 90 systemctl enable --now tpmagent.service 2>&1); then
	st="$(prop ActiveState)/$(prop SubState)"
	if [ "$st" = active/running ]; then
		pass "systemctl enable --now: $st after READY=1 (Type=$(prop Type), NotifyAccess=$(prop NotifyAccess)) in $((SECONDS - t)) s"
	else
		fail "systemctl enable --now returned but the unit is $st"
	fi
else
	fail "systemctl enable --now tpmagent: $out; $(systemctl status tpmagent --no-pager 2>&1 | tail -15)"
	exit
fi
pid=$(prop MainPID)
user=$(ps -o user= -p "$pid")
groups=$(awk '/^Groups:/ {$1=""; print}' /proc/"$pid"/status)
tssgid=$(getent group tss | cut -d: -f3)
if [ "$user" = tpmagent ] && grep -qw "$tssgid" <<<"$groups"; then
	pass "hardening: main PID $pid runs as $user with supplementary group tss ($tssgid); NoNewPrivileges=$(prop NoNewPrivileges) ProtectSystem=$(prop ProtectSystem) PrivateUsers=$(prop PrivateUsers) DevicePolicy=$(prop DevicePolicy)"
else
	fail "hardening: main PID $pid runs as '$user' with groups '$groups' (want tpmagent, tss $tssgid)"
fi
caps=$(awk '/^CapEff:/ {print $2}' /proc/"$pid"/status)
[ "$caps" = 0000000000000000 ] && pass "hardening: no effective capabilities (CapEff=$caps)" || fail "hardening: CapEff=$caps"
if journalctl -u tpmagent.service -o cat --no-pager | grep -q 'device key loaded.*tpm=/dev/tpmrm0'; then
	pass "journal: $(journalctl -u tpmagent.service -o cat --no-pager | grep -m1 'device key loaded')"
else
	fail "journal: no 'device key loaded ... tpm=/dev/tpmrm0' line"
fi
warns=$(journalctl -u tpmagent.service -o cat --no-pager _COMM=tpmagent | grep -E 'level=(WARN|ERROR)')
if [ -z "$warns" ]; then
	pass "journal: the first start logged no warning or error"
else
	fail "journal: the first start logged: $warns"
fi
if wait_for 60 connected; then
	pass "status socket: connected to $(tpmagent status --json | tr -d ' \n' | sed -n 's/.*"broker":"\([^"]*\)".*/\1/p'), tpm_signatures=$(status_num tpm_signatures)"
else
	fail "status: not connected after 60 s: $(tpmagent status --json 2>&1 | tr -d '\n' | cut -c1-400)"
fi
sigs=$(status_num tpm_signatures)
[ "${sigs:-0}" -ge 1 ] && pass "TPM: $sigs signature(s) made with the device key through /dev/tpmrm0" || fail "TPM: tpm_signatures=${sigs:-none}"

# Readings through the socket, counted by the host's subscriber.
send_range() { # FROM TO
	local from=$1 to=$2 out
	out=$(seq "$from" "$to" | sed 's/.*/{"name":"vm.test","value":&}/' | tpmagent send 2>&1) &&
		pass "tpmagent send: readings $from..$to accepted ($(tail -1 <<<"$out"))" ||
		fail "tpmagent send $from..$to: $(tail -3 <<<"$out")"
}
acked_all() { [ "$(status_num records)" = 0 ] && [ "$(status_num readings_in)" -ge "$1" ]; }
half=$((READINGS / 2))
send_range 0 $((half - 1))
wait_for 60 acked_all "$half" && pass "spool drained after $(status_num readings_in) readings ($(status_num messages_acked) messages acked)" ||
	fail "spool not drained: $(tpmagent status --json 2>&1 | tr -d ' \n' | cut -c1-400)"

# Reload: SIGHUP, RELOADING=1 then READY=1; same process, still active.
if out=$(timeout 60 systemctl reload tpmagent.service 2>&1) && [ "$(prop ActiveState)" = active ] && [ "$(prop MainPID)" = "$pid" ]; then
	pass "systemctl reload: active, same main PID $pid$(journalctl -u tpmagent.service -o cat --no-pager | grep -m1 -o 'reload[^"]*' | sed 's/^/; journal: /' | cut -c1-100)"
else
	fail "systemctl reload: $out; $(prop ActiveState) PID $(prop MainPID) (was $pid)"
fi

# Watchdog: a stopped agent sends no WATCHDOG=1 and is restarted.
wd=$(prop WatchdogUSec)
nr=$(prop NRestarts)
kill -STOP "$pid"
t=$SECONDS
restarted() { local p; p=$(prop MainPID); [ "$p" != 0 ] && [ "$p" != "$pid" ] && [ "$(prop ActiveState)" = active ]; }
if wait_for 120 restarted; then
	nr2=$(prop NRestarts)
	if [ "$nr2" -gt "$nr" ] && journalctl -u tpmagent.service --no-pager | grep -q 'Watchdog timeout'; then
		pass "watchdog: PID $pid stopped (SIGSTOP), 'Watchdog timeout' after WatchdogSec=$wd, restarted as PID $(prop MainPID) and active again in $((SECONDS - t)) s; NRestarts $nr -> $nr2"
	else
		fail "watchdog: new PID but NRestarts $nr -> $nr2 or no 'Watchdog timeout' in the journal"
	fi
else
	fail "watchdog: not restarted within 120 s (WatchdogSec=$wd): $(prop ActiveState)/$(prop SubState) PID $(prop MainPID) NRestarts $(prop NRestarts)"
	kill -CONT "$pid" 2>/dev/null
fi
pid=$(prop MainPID)
wait_for 60 connected || fail "after the restart: not connected"
send_range "$half" $((READINGS - 1))
wait_for 60 acked_all $((READINGS - half)) && pass "after the restart: spool drained, $(status_num readings_in) readings in" ||
	fail "after the restart: spool not drained: $(tpmagent status --json 2>&1 | tr -d ' \n' | cut -c1-400)"

# Firmware through the unit: the updater enabled, the retained job seen,
# image downloaded over MQTT and installed into slot b (StateDirectory),
# exit 75, restarted by systemd (RestartForceExitStatus=75), health check,
# commit; the anti-rollback counter in TPM NV, read through /dev/tpmrm0
# while the agent runs.
fw_field() { tpmagent firmware status --json 2>/dev/null | tr -d ' \n' | sed -n "s/.*\"updater\":{[^}]*\"$1\":\"\([^\"]*\)\".*/\1/p"; }
fw_committed() { [ "$(fw_field state)" = committed ]; }
cat /root/vm/firmware.yaml >>/etc/tpmagent/agent.yaml
install -m 0644 /root/vm/release.key.pub /etc/tpmagent/release.key.pub
t=$SECONDS
# A manual restart sets NRestarts back to 0: the exit 75 makes it 1.
if ! timeout 90 systemctl restart tpmagent.service; then
	fail "firmware: restart with the updater enabled: $(systemctl status tpmagent --no-pager 2>&1 | tail -10)"
elif wait_for 240 fw_committed; then
	nr=$(prop NRestarts)
	if [ "$nr" -ge 1 ] && journalctl -u tpmagent.service --no-pager | grep -q 'status=75'; then
		pass "firmware: 2.0.0 downloaded, installed, exit 75, restarted by systemd (NRestarts $nr since the manual restart), health check passed, committed in $((SECONDS - t)) s"
	else
		fail "firmware: committed, but NRestarts $nr since the manual restart or no exit status 75 in the journal"
	fi
	if out=$(tpmagent firmware status --counter 2>&1) && grep -q 'anti-rollback counter.*: 1$' <<<"$out"; then
		pass "firmware: $(grep -E '^(slots|anti-rollback)' <<<"$out" | tr '\n' ';' | sed 's/;$//') (NV read through /dev/tpmrm0 while the agent runs)"
	else
		fail "firmware status --counter: $out"
	fi
else
	fail "firmware: not committed within 240 s: $(tpmagent firmware status 2>&1 | tr '\n' ' '); $(journalctl -u tpmagent.service -o cat --no-pager | grep -i firmware | tail -5 | tr '\n' ' ')"
fi
wait_for 60 connected || fail "after the update: not connected"

# Stop: SIGTERM, drain, exit 0.
t=$SECONDS
if timeout 60 systemctl stop tpmagent.service; then
	r="Result=$(prop Result) ExecMainStatus=$(prop ExecMainStatus) ActiveState=$(prop ActiveState)"
	if [ "$r" = "Result=success ExecMainStatus=0 ActiveState=inactive" ]; then
		pass "systemctl stop: $r in $((SECONDS - t)) s"
	else
		fail "systemctl stop: $r"
	fi
else
	fail "systemctl stop did not return in 60 s"
fi

# Exposure as systemd sees the loaded unit.
sec=$(systemd-analyze security --no-pager tpmagent.service 2>&1)
score=$(sed -n 's/.*Overall exposure level for tpmagent.service: \([0-9.]*\) \([A-Z]*\).*/\1 \2/p' <<<"$sec")
if [ -n "$score" ] && awk -v s="${score% *}" 'BEGIN{exit !(s <= 2.0)}'; then
	pass "systemd-analyze security tpmagent (live): $score"
else
	fail "systemd-analyze security: ${score:-no score}: $(grep -E '✗' <<<"$sec" | head -5)"
fi

# Journal: messages carry no timestamp of their own (journald adds one) and
# name their level once.
msgs=$(journalctl -u tpmagent.service -o cat --no-pager _COMM=tpmagent)
nmsgs=$(grep -c . <<<"$msgs")
dup=$(grep -cE '(^|\s)time=|^[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:|^[0-9]{4}/[0-9]{2}/[0-9]{2} ' <<<"$msgs")
if [ "$nmsgs" -gt 0 ] && [ "$dup" = 0 ]; then
	pass "journal: $nmsgs agent lines, none with a timestamp of its own (e.g. '$(grep -m1 'agent ready' <<<"$msgs" | cut -c1-100)')"
else
	fail "journal: $dup of $nmsgs lines carry their own timestamp: $(grep -m2 -E 'time=|^[0-9]{4}-' <<<"$msgs")"
fi
failed=$(systemctl list-units --failed --plain --no-legend | awk '{print $1}' | tr '\n' ' ')
info "failed units in the guest: ${failed:-none}"
completed=1
GUEST
bash -n "$R/usr/local/sbin/tpmagent-vm-test" || die "the guest test script has a syntax error"
cat >"$R/etc/systemd/system/tpmagent-vm-test.service" <<'EOF'
[Unit]
Description=tpmagent vm-test checks (scripts/vm-test.sh)
After=multi-user.target network-online.target
Wants=network-online.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/tpmagent-vm-test
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS1
TTYReset=no
TTYVHangup=no

[Install]
WantedBy=multi-user.target
EOF
chroot "$R" systemctl enable tpmagent-vm-test.service >/dev/null 2>&1
size=$(($(du -sm "$R" | cut -f1) + 768))
mke2fs -q -t ext4 -L tpmagent-vm -E root_owner=0:0 -d "$R" "$W/root.img" "${size}M"
rm -rf "$R"
echo "disk image: ${size} MiB ext4 (mke2fs -d, not mounted)"

phase "boot: qemu ($ACCEL) with swtpm as its $VM_TPM"
swtpm socket --tpm2 --tpmstate dir="$W/tpm" --ctrl type=unixio,path="$W/swtpm.sock" \
	--log file="$W/swtpm.log",level=1 >"$W/swtpm.out" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do [ -S "$W/swtpm.sock" ] && break; sleep 0.05; done
[ -S "$W/swtpm.sock" ] || die "swtpm for qemu did not start: $(cat "$W/swtpm.out")"
: >"$W/console.log"
: >"$W/results.log"
qemu-system-x86_64 -nodefaults -machine q35,accel="$ACCEL" -cpu "$CPU" -smp 2 -m 1024 \
	-display none -vga none -monitor none -no-reboot \
	-kernel "$W/vmlinuz" -initrd "$W/initrd.img" \
	-append "console=ttyS0 root=/dev/vda rw panic=-1 systemd.firstboot=off systemd.show_status=1 loglevel=4" \
	-drive file="$W/root.img",format=raw,if=virtio,cache=unsafe \
	-chardev socket,id=chrtpm,path="$W/swtpm.sock" -tpmdev emulator,id=tpm0,chardev=chrtpm -device "$VM_TPM",tpmdev=tpm0 \
	-netdev "user,id=n0,restrict=on,guestfwd=tcp:10.0.2.100:8883-cmd:socat - TCP:127.0.0.1:$BROKER_PORT" \
	-device virtio-net-pci,netdev=n0,romfile= \
	-serial file:"$W/console.log" -serial file:"$W/results.log" >"$W/qemu.out" 2>&1 &
QEMU=$!
deadline=$((SECONDS + VM_TIMEOUT))
shown=0
while kill -0 "$QEMU" 2>/dev/null && [ $SECONDS -lt $deadline ]; do
	n=$(wc -l <"$W/results.log")
	if [ "$n" -gt "$shown" ]; then
		sed -n "$((shown + 1)),${n}p" "$W/results.log" | tr -d '\r' | grep -E '^(PASS|FAIL|info)' || true
		shown=$n
	fi
	sleep 0.5
done
if kill -0 "$QEMU" 2>/dev/null; then
	kill "$QEMU"
	wait "$QEMU" 2>/dev/null || true
	QEMU=
	echo "--- serial console (last 40 lines)"
	tail -40 "$W/console.log"
	die "the guest did not power off within ${VM_TIMEOUT}s ($ACCEL)"
fi
qrc=0
wait "$QEMU" || qrc=$?
QEMU=
sed -n "$((shown + 1)),\$p" "$W/results.log" | tr -d '\r' | grep -E '^(PASS|FAIL|info)' || true
# The guest's tty writes CR LF.
tr -d '\r' <"$W/results.log" >"$W/results.txt"
[ "$qrc" = 0 ] || { tail -40 "$W/console.log"; cat "$W/qemu.out"; die "qemu exited with $qrc"; }

phase "host checks"
failures=0
hfail() { echo "FAIL: $*"; failures=$((failures + 1)); }
if ! grep -q '^VMTEST DONE failures=0 completed=1$' "$W/results.txt" || grep -q '^FAIL' "$W/results.txt"; then
	echo "--- guest results (last 60 lines)"
	tail -60 "$W/results.txt"
	echo "--- serial console (last 40 lines)"
	tail -40 "$W/console.log"
	hfail "guest checks: $(grep -c '^FAIL' "$W/results.txt") failed$(grep -q '^VMTEST DONE.*completed=1' "$W/results.txt" || echo ", and the guest test did not run to its end")"
fi
sleep 1
got=$({ grep -o '"name":"vm.test","value":[0-9]*' "$W/received.txt" || true; } | sort -u | wc -l)
if [ "$got" = "$VM_READINGS" ]; then
	echo "PASS: host subscriber: all $VM_READINGS readings sent in the guest arrived ($(grep -c '^devices/vm-device/telemetry ' "$W/received.txt") messages)"
else
	hfail "host subscriber: $got of $VM_READINGS distinct vm.test readings arrived"
fi
sys=$(grep -o '"name":"system\.[a-z0-9.]*"' "$W/received.txt" | sort -u | cut -d'"' -f4 | tr '\n' ' ' || true)
if grep -q system.uptime <<<"$sys" && grep -q system.mem.used <<<"$sys"; then
	echo "PASS: host subscriber: system readings from the agent under the unit's /proc restrictions: $sys"
else
	hfail "host subscriber: system readings missing under the unit (got: ${sys:-none}); ProcSubset=/ProtectProc= hide /proc files?"
fi
if grep -q 'as vm-device' "$W/mosquitto.log" || grep -q "u'vm-device'" "$W/mosquitto.log"; then
	echo "PASS: broker: vm-device connected with its TPM-backed certificate ($(grep -c "u'vm-device'" "$W/mosquitto.log") connections)"
else
	hfail "broker log has no connection from vm-device"
fi
if grep -q 'committed' "$W/publish.log"; then
	echo "PASS: release side: firmware publish saw vm-device report committed ($(grep -c . "$W/publish.log") status lines)"
else
	hfail "release side: no 'committed' from vm-device in firmware publish's output: $(tail -5 "$W/publish.log")"
fi
[ "$failures" = 0 ] || die "$failures check(s) failed (KEEP=1 keeps $W)"
phase "done: every check passed ($ACCEL)"
