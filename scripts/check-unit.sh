#!/usr/bin/env bash
# Checks configs/tpmagent.service and its sysusers.d/tmpfiles.d snippets
# with this machine's systemd (Debian 12: systemd 252), without a running
# systemd and without touching the host:
#   1. systemd-analyze verify in a temporary root (--root=) that holds the
#      unit where the package puts it, the binary at /usr/bin/tpmagent, the
#      man pages its Documentation= names, /bin/kill, and a copy of the
#      host's units (sysinit.target, ...). verify exits 0 on warnings such as
#      an unknown key, so any output at all is a failure here.
#   2. systemd-sysusers and systemd-tmpfiles --create on the snippets in
#      that root: the user, the tss membership and the directories appear.
#   3. systemd-analyze security --offline=yes: the exposure score must be
#      at most MAX_EXPOSURE (default 2.0, systemd's "OK").
# Prints the score as "exposure: N.N". Needs: go, systemd (systemd-analyze).
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
MAX_EXPOSURE=${MAX_EXPOSURE:-2.0}
unit=configs/tpmagent.service

for tool in systemd-analyze systemd-sysusers systemd-tmpfiles; do
	command -v "$tool" >/dev/null || { echo "check-unit: $tool missing: apt-get install systemd" >&2; exit 1; }
done

root=$(mktemp -d /tmp/tpmagent-unit.XXXXXX)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/bin" "$root/bin" "$root/lib/systemd" "$root/usr/share/man/man1" \
	"$root/usr/lib/sysusers.d" "$root/usr/lib/tmpfiles.d" "$root/etc"
CGO_ENABLED=0 $GO build -trimpath -o "$root/usr/bin/tpmagent" ./cmd/tpmagent
"$root/usr/bin/tpmagent" gen-docs --man "$root/usr/share/man/man1"
cp -a /lib/systemd/system "$root/lib/systemd/"
cp /bin/kill "$root/bin/kill"  # ExecReload=; procps
cp configs/sysusers.d/tpmagent.conf "$root/usr/lib/sysusers.d/"
cp configs/tmpfiles.d/tpmagent.conf "$root/usr/lib/tmpfiles.d/"

# verify prints problems and may still exit 0: fail on any output.
verify() {
	local out rc=0
	out=$(MANPATH="$root/usr/share/man" systemd-analyze verify --root="$root" tpmagent.service 2>&1) || rc=$?
	if [ "$rc" -ne 0 ] || [ -n "$out" ]; then
		printf '%s\n' "$out"
		return 1
	fi
}

# The check must catch a bad unit, or it proves nothing.
sed 's/^WatchdogSec=.*/&\nWatchdgSec=30s/' "$unit" >"$root/lib/systemd/system/tpmagent.service"
if verify >/dev/null; then
	echo "check-unit: FAIL: verify did not report an unknown key; the check is broken" >&2
	exit 1
fi

cp "$unit" "$root/lib/systemd/system/tpmagent.service"
if ! verify; then
	echo "check-unit: FAIL: systemd-analyze verify $unit reported the problems above" >&2
	exit 1
fi
echo "check-unit: verify: clean ($(systemd-analyze --version | head -1))"

out=$(systemd-sysusers --root="$root" 2>&1) || { printf '%s\n' "$out" >&2; echo "check-unit: FAIL: systemd-sysusers" >&2; exit 1; }
out=$(systemd-tmpfiles --root="$root" --create 2>&1) || { printf '%s\n' "$out" >&2; echo "check-unit: FAIL: systemd-tmpfiles" >&2; exit 1; }
grep -q '^tpmagent:x:[0-9]*:[0-9]*:.*:/var/lib/tpmagent:' "$root/etc/passwd" ||
	{ echo "check-unit: FAIL: sysusers did not create user tpmagent" >&2; exit 1; }
grep -Eq '^tss:x:[0-9]+:(.*,)?tpmagent(,|$)' "$root/etc/group" ||
	{ echo "check-unit: FAIL: sysusers did not put tpmagent in group tss" >&2; exit 1; }
uid=$(awk -F: '$1=="tpmagent"{print $3}' "$root/etc/passwd")
for d in var/lib/tpmagent var/lib/tpmagent/spool; do
	[ "$(stat -c '%a %u' "$root/$d")" = "700 $uid" ] ||
		{ echo "check-unit: FAIL: tmpfiles: /$d is $(stat -c '%a %u' "$root/$d"), want 700 $uid" >&2; exit 1; }
done
echo "check-unit: sysusers.d, tmpfiles.d: user tpmagent (in tss), /var/lib/tpmagent 0700"

# --threshold is in tenths: 20 = 2.0.
threshold=$(awk -v m="$MAX_EXPOSURE" 'BEGIN{printf "%d", m*10+0.5}')
rc=0
out=$(systemd-analyze security --offline=yes --threshold="$threshold" --no-pager "$unit" 2>&1) || rc=$?
score=$(printf '%s\n' "$out" | sed -n 's/.*Overall exposure level for tpmagent.service: \([0-9.]*\) \([A-Z]*\).*/\1 \2/p')
if [ "$rc" -ne 0 ] || [ -z "$score" ]; then
	printf '%s\n' "$out" | grep -E '✗|Overall' >&2 || printf '%s\n' "$out" >&2
	echo "check-unit: FAIL: exposure ${score:-unknown} above $MAX_EXPOSURE (systemd-analyze security --offline=yes $unit)" >&2
	exit 1
fi
echo "exposure: $score (systemd-analyze security --offline=yes $unit; limit $MAX_EXPOSURE)"
