#!/usr/bin/env bash
# The test command of README and CI (`make test`): vet; the Go test suite
# (unit tests on the in-process simulator, integration tests against real
# swtpm, mosquitto, RabbitMQ, openssl, tpm2-tools and tshark started by the
# tests); cross builds run under qemu and the pure-Go tests under qemu-user;
# the systemd unit check; Debian packages built, inspected and installed;
# the amd64 package run by systemd in a qemu VM with a kernel TPM device;
# a 20-device fleet; the short reliability suite; every fuzz target for a
# while. Needs root and the packages from scripts/ci-deps.sh.
#
# TEST_QUICK=1 runs only vet and go test.
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
TEST_TIMEOUT=${TEST_TIMEOUT:-30m}
FUZZTIME=${FUZZTIME:-20s}
step() { printf '\n== %s\n' "$*"; }

step "lint: gofmt, go vet, staticcheck"
make -s lint
$GO vet -tags chaos ./chaos/

step "go test"
# -p 2: two packages at a time on the 2-core machines we run on.
$GO test -p 2 -count=1 -timeout "$TEST_TIMEOUT" ./...

[ "${TEST_QUICK:-0}" = 1 ] && exit 0

step "cross builds, run under qemu"
make -s cross cross-small
qemu-aarch64-static bin/tpmagent-linux-arm64 version
qemu-arm-static bin/tpmagent-linux-armv7 version
qemu-aarch64-static bin/tpmagent-small-linux-arm64 version
$GO test -count=1 -tags nometrics ./agent/status

step "pure-Go tests under qemu-user (arm64, armv7)"
bash scripts/test-arm.sh

step "systemd unit: verify and security exposure"
bash scripts/check-unit.sh

step "Debian packages: build, inspect, install"
make -s deb
bash scripts/deb.sh check

step "the amd64 package under a real systemd with /dev/tpmrm0 (qemu VM, swtpm as its TPM)"
bash scripts/vm-test.sh

step "fleet: 20 devices provisioned with attestation, 20 agents publishing QoS1"
make -s build
N=20 bash scripts/fleet-test.sh

step "reliability suite (short)"
CHAOS_SHORT=1 bash scripts/chaos.sh

step "fuzzing, $FUZZTIME per target"
bash scripts/fuzz.sh "$FUZZTIME"
