# tpmagent — see README.md. Every target works on a fresh Debian 12 as root.
SHELL := /bin/bash
GO ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo none)
LDFLAGS := -s -w -X main.version=$(VERSION) -X main.commit=$(COMMIT)
PKG := ./cmd/tpmagent
# Device binaries leave out gen-docs (man pages are generated at packaging
# by a host build without the tag).
TAGS ?= nodocs
# Test timeout for the whole suite; CI has 90 minutes in all.
TEST_TIMEOUT ?= 30m

.PHONY: all build cross cross-small test test-unit lint bench demo deps fuzz clean

all: build

deps:
	bash scripts/ci-deps.sh

build:
	CGO_ENABLED=0 $(GO) build -tags "$(TAGS)" -trimpath -ldflags "$(LDFLAGS)" -o bin/tpmagent $(PKG)

cross:
	CGO_ENABLED=0 GOOS=linux GOARCH=arm64 $(GO) build -tags "$(TAGS)" -trimpath -ldflags "$(LDFLAGS)" -o bin/tpmagent-linux-arm64 $(PKG)
	CGO_ENABLED=0 GOOS=linux GOARCH=arm GOARM=7 $(GO) build -tags "$(TAGS)" -trimpath -ldflags "$(LDFLAGS)" -o bin/tpmagent-linux-armv7 $(PKG)
	CGO_ENABLED=0 GOOS=linux GOARCH=amd64 $(GO) build -tags "$(TAGS)" -trimpath -ldflags "$(LDFLAGS)" -o bin/tpmagent-linux-amd64 $(PKG)
	@ls -l bin/tpmagent-linux-*

# Smaller device binaries without the Prometheus endpoint (-tags nometrics:
# ≈ 2.9 MB less; the status socket keeps every counter).
cross-small:
	CGO_ENABLED=0 GOOS=linux GOARCH=arm64 $(GO) build -tags "nometrics $(TAGS)" -trimpath -ldflags "$(LDFLAGS)" -o bin/tpmagent-small-linux-arm64 $(PKG)
	CGO_ENABLED=0 GOOS=linux GOARCH=arm GOARM=7 $(GO) build -tags "nometrics $(TAGS)" -trimpath -ldflags "$(LDFLAGS)" -o bin/tpmagent-small-linux-armv7 $(PKG)
	@ls -l bin/tpmagent-small-linux-*

# The whole suite: unit tests (simulator, cgo) and integration tests against
# real swtpm and mosquitto started by the tests, CLI scripts, cross builds
# run under qemu. Needs the packages from scripts/ci-deps.sh.
test: deps
	bash scripts/test.sh

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) run honnef.co/go/tools/cmd/staticcheck@v0.8.2 ./...

bench: deps build
	bash scripts/bench.sh

fuzz:
	bash scripts/fuzz.sh $${FUZZTIME:-20s}

demo: build
	bash scripts/demo.sh

clean:
	rm -rf bin dist .demo

# Deployment (issue 8): Debian packages for amd64, arm64 and armhf in dist/
# (nfpm, pinned in scripts/deb.sh); deb-check lists and installs them (root);
# check-unit runs systemd-analyze verify/security on configs/tpmagent.service;
# test-arm runs the pure-Go packages' tests under qemu-user.
.PHONY: deb deb-check check-unit test-arm

deb:
	VERSION=$(VERSION) COMMIT=$(COMMIT) bash scripts/deb.sh build

deb-check:
	bash scripts/deb.sh check

check-unit:
	bash scripts/check-unit.sh

test-arm:
	bash scripts/test-arm.sh

# Reliability suite (issue 9): scenarios against real mosquitto and swtpm
# (broker/agent killed, netns loss/latency/link down, TPM gone, certificates,
# full spool, 10,000 reconnects); prints one markdown table. Root only.
# CHAOS_SHORT=1 make chaos runs the short version (CI).
.PHONY: chaos
chaos:
	bash scripts/chaos.sh

# Firmware updates (issue 6): tpmagent updates itself from a signed release
# over MQTT (A/B slots, a launcher loop standing in for systemd), commits after
# its health check and advances the TPM NV counter; then a release built to
# fail its health check is rolled back. Files under .demo/ota.
.PHONY: demo-ota
demo-ota:
	bash scripts/demo-ota.sh

# Fleet (issue 8): provision N emulated devices, start N agents each with its
# own swtpm, all publish QoS1 to one mosquitto; a subscriber counts.
.PHONY: fleet-test
N ?= 100
fleet-test: build
	N=$(N) bash scripts/fleet-test.sh

# The amd64 package under a real systemd (PID 1) with a kernel TPM device
# (/dev/tpmrm0, tpm_tis) backed by swtpm, in a qemu VM (KVM when it works,
# TCG otherwise): install, Type=notify start, hardening, readings to a host
# broker, reload, watchdog restart, stop. Root; caches the guest root file
# system under /var/cache/tpmagent-vm. docs/DEPLOYMENT.md.
.PHONY: vm-test
vm-test:
	VERSION=$(VERSION) COMMIT=$(COMMIT) ARCHES=amd64 bash scripts/deb.sh build
	bash scripts/vm-test.sh
