#!/usr/bin/env bash
# make test-arm: the pure-Go packages' tests, cross-compiled with
# CGO_ENABLED=0 for linux/arm64 and linux/arm (GOARM=7) and run under
# qemu-user (qemu-aarch64-static, qemu-arm-static from Debian's
# qemu-user-static). Prints one line per package and architecture and a
# closing "test-arm: N passed, N failed" line; exits non-zero on any failure.
#
# A package is listed here when its tests need neither cgo (the go-tpm-tools
# simulator) nor services the tests start (swtpm, mosquitto): the others
# (agent, cmd/tpmagent, internal/testenv, tpmkeys, transport) run natively
# in `make test`. Host tools the tests call (openssl, sh) run natively from
# the emulated process.
#
# Tests that re-execute their own binary (os.Args[0]) get a wrapper script as
# argv[0] (qemu's -0 flag) that starts the binary under qemu again: this
# machine has no binfmt_misc registration for foreign binaries.
#
# Environment: PACKAGES, ARCHES (arm64 armv7), TEST_ARM_TIMEOUT (per test
# binary, default 5m), TEST_ARM_LOGS (a directory to keep the -test.v logs
# in), GO.
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
PACKAGES=${PACKAGES:-"agent/batch agent/config agent/reading agent/sdnotify agent/spool agent/status transport/seal firmware"}
ARCHES=${ARCHES:-arm64 armv7}
TEST_ARM_TIMEOUT=${TEST_ARM_TIMEOUT:-5m}

work=$(mktemp -d /tmp/tpmagent-test-arm.XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$PWD
passed=0
failed=0
failures=()

for arch in $ARCHES; do
	case $arch in
	arm64) goenv=(GOARCH=arm64) qemu=qemu-aarch64-static ;;
	armv7) goenv=(GOARCH=arm GOARM=7) qemu=qemu-arm-static ;;
	*) echo "test-arm: unknown arch $arch (arm64, armv7)" >&2; exit 2 ;;
	esac
	command -v "$qemu" >/dev/null || { echo "test-arm: $qemu missing: apt-get install qemu-user-static" >&2; exit 1; }
	for pkg in $PACKAGES; do
		name=${pkg//\//_}.$arch
		bin=$work/$name.test
		log=$work/$name.log
		if ! env CGO_ENABLED=0 GOOS=linux "${goenv[@]}" $GO test -c -o "$bin" "./$pkg" >"$log" 2>&1; then
			printf 'test-arm: %-6s %-16s FAIL (build)\n' "$arch" "$pkg"
			sed 's/^/    /' "$log" | tail -20
			failed=$((failed + 1)); failures+=("$arch $pkg (build)")
			continue
		fi
		if [ ! -f "$bin" ]; then
			printf 'test-arm: %-6s %-16s FAIL (no test files)\n' "$arch" "$pkg"
			failed=$((failed + 1)); failures+=("$arch $pkg (no tests)")
			continue
		fi
		# argv[0] for self re-execution: this wrapper runs the binary under qemu.
		printf '#!/bin/sh\nexec %s %q "$@"\n' "$qemu" "$bin" >"$bin.sh"
		chmod +x "$bin.sh"
		start=$(date +%s.%N)
		rc=0
		(cd "$root/$pkg" && "$qemu" -0 "$bin.sh" "$bin" -test.v -test.count=1 -test.timeout="$TEST_ARM_TIMEOUT") >"$log" 2>&1 || rc=$?
		if [ -n "${TEST_ARM_LOGS:-}" ]; then mkdir -p "$TEST_ARM_LOGS" && cp "$log" "$TEST_ARM_LOGS/"; fi
		secs=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN{printf "%.1f", e-s}')
		npass=$(grep -c '^--- PASS' "$log" || true)
		nfail=$(grep -c '^--- FAIL' "$log" || true)
		nskip=$(grep -c '^--- SKIP' "$log" || true)
		if [ "$rc" -eq 0 ] && [ "$nfail" -eq 0 ]; then
			printf 'test-arm: %-6s %-16s ok    %6ss  %3d tests passed, %d skipped\n' "$arch" "$pkg" "$secs" "$npass" "$nskip"
			passed=$((passed + 1))
		else
			printf 'test-arm: %-6s %-16s FAIL  %6ss  %3d passed, %d failed (exit %d)\n' "$arch" "$pkg" "$secs" "$npass" "$nfail" "$rc"
			grep -E '^\s*--- FAIL|panic:|_test\.go:[0-9]+:|^FAIL|test timed out' "$log" | head -20 | sed 's/^/    /'
			failed=$((failed + 1)); failures+=("$arch $pkg")
		fi
	done
done

for f in "${failures[@]}"; do echo "test-arm: failed: $f"; done
echo "test-arm: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
