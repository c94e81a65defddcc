#!/usr/bin/env bash
# Installs with apt-get what tpmagent's build and tests need, when missing.
# Run as root (CI does). Prints the apt-get line otherwise.
set -euo pipefail

pkgs=(swtpm swtpm-tools tpm2-tools mosquitto mosquitto-clients openssl libssl-dev gcc
      qemu-user-static iproute2 nftables tshark procps psmisc ca-certificates make systemd
      rabbitmq-server
      qemu-system-x86 debootstrap e2fsprogs socat util-linux
     )

missing=()
for p in "${pkgs[@]}"; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
		missing+=("$p")
	fi
done

if [ ${#missing[@]} -eq 0 ]; then
	echo "ci-deps: all packages present"
	exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
	echo "ci-deps: missing packages: ${missing[*]}" >&2
	echo "ci-deps: run as root: apt-get update && apt-get install -y ${missing[*]}" >&2
	exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# tshark asks whether non-root users may capture; answer no.
echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections || true
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
# Debian starts these as services where systemd runs; tests start their own.
for svc in mosquitto rabbitmq-server; do
	if command -v systemctl >/dev/null && systemctl is-active --quiet "$svc" 2>/dev/null; then
		systemctl stop "$svc" || true
		systemctl disable "$svc" >/dev/null 2>&1 || true
	fi
done
pkill -x mosquitto 2>/dev/null || true
echo "ci-deps: installed ${missing[*]}"
