#!/usr/bin/env bash
# The test command of README and CI: vet, the Go test suite (real swtpm and
# mosquitto are started by the tests), cross builds run under qemu-user.
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
TEST_TIMEOUT=${TEST_TIMEOUT:-30m}

echo "== go vet"
$GO vet ./...

echo "== go test"
# -p 2: two packages at a time on the 2-core machines we run on.
$GO test -p 2 -count=1 -timeout "$TEST_TIMEOUT" ./...

echo "== cross builds under qemu-user"
make -s cross
qemu-aarch64-static bin/tpmagent-linux-arm64 version
qemu-arm-static bin/tpmagent-linux-armv7 version
