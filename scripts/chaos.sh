#!/usr/bin/env bash
# Runs the reliability suite (chaos/, build tag "chaos") and prints one
# markdown table: | scenario | offered | delivered | lost | duplicates | recovery_s |
# CHAOS_SHORT=1 runs the short version of every scenario (CI, a few minutes);
# the long one takes about 10-25 minutes. Needs root (network namespaces,
# nftables, tmpfs) and the packages from scripts/ci-deps.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
if [ "$(id -u)" -ne 0 ]; then
	echo "chaos: run as root (network namespaces, nftables, tmpfs mounts)" >&2
	exit 1
fi
table=$(mktemp)
trap 'rm -f "$table"' EXIT
timeout=40m
[ -n "${CHAOS_SHORT:-}" ] && timeout=10m
log=${CHAOS_LOG:-$(mktemp -t tpmagent-chaos.XXXXXX.log)}
echo "chaos: CHAOS_SHORT=${CHAOS_SHORT:-} go test -tags chaos ./chaos/ (log: $log)" >&2
set +e
CHAOS_TABLE=$table $GO test -tags chaos -count=1 -v -timeout "$timeout" ./chaos/ >"$log" 2>&1
rc=$?
set -e
grep -E '^(=== RUN|--- (PASS|FAIL)|    [a-z_]+_test\.go:[0-9]+:)' "$log" | grep -v '^=== RUN' >&2 || true
if [ -s "$table" ]; then
	echo
	cat "$table"
fi
if [ $rc -ne 0 ]; then
	echo "chaos: FAILED (exit $rc); full log: $log" >&2
	tail -n 40 "$log" >&2
fi
exit $rc
