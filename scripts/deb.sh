#!/usr/bin/env bash
# Debian packages of tpmagent, built with nfpm (pinned, run with `go install
# pkg@version`, so the main module's go.mod does not grow).
#
#   scripts/deb.sh [build]  dist/tpmagent_<version>_<arch>.deb for $ARCHES
#                           (default: amd64 arm64 armhf); CGO_ENABLED=0 binaries
#                           as `make cross` builds them; man pages and
#                           completions from `tpmagent gen-docs`.
#   scripts/deb.sh check    checks the packages in dist/: dpkg-deb -c lists
#                           binary, unit, config, snippets, docs; the config is
#                           a conffile; the binary is for the package's
#                           architecture and runs (arm under qemu-user); then
#                           dpkg -i of the amd64 package, `tpmagent version`,
#                           the user and directories, dpkg -r, dpkg -P; and a
#                           second install where systemd-sysusers/tmpfiles are
#                           absent (a container). Leaves the machine as it was.
# Environment: VERSION, COMMIT (as the Makefile), ARCHES, GO.
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
NFPM_MODULE=github.com/goreleaser/nfpm/v2/cmd/nfpm
NFPM_VERSION=v2.45.2
VERSION=${VERSION:-$(git describe --tags --always --dirty 2>/dev/null || echo dev)}
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo none)}
ARCHES=${ARCHES:-amd64 arm64 armhf}

# deb_version turns `git describe` output into a Debian version: v1.2.3 ->
# 1.2.3, v1.2.3-4-gabc -> 1.2.3+4+gabc, abc1234-dirty -> 0.0.0+gitabc1234+dirty.
deb_version() {
	local v=${1#v}
	v=${v//-/+}
	v=${v//[^A-Za-z0-9.+~]/.}
	if [[ $v =~ ^[0-9]+\.[0-9] ]]; then
		echo "$v"
	else
		echo "0.0.0+git$v"
	fi
}
DEB_VERSION=$(deb_version "$VERSION")

# goenv prints the GOARCH/GOARM for a Debian architecture.
goenv() {
	case $1 in
	amd64) echo "GOARCH=amd64" ;;
	arm64) echo "GOARCH=arm64" ;;
	armhf) echo "GOARCH=arm GOARM=7" ;;
	*) echo "deb: unknown architecture $1 (amd64, arm64, armhf)" >&2; return 1 ;;
	esac
}

build() {
	local tools=$PWD/bin/tools work=dist/build
	mkdir -p "$tools" dist
	rm -rf "$work" && mkdir -p "$work"
	GOBIN=$tools $GO install "$NFPM_MODULE@$NFPM_VERSION"
	export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
	local ldflags="-s -w -X main.version=$VERSION -X main.commit=$COMMIT"

	# Man pages and completions do not depend on the architecture: one
	# host build generates them.
	# The host build keeps gen-docs (device builds use -tags nodocs).
	CGO_ENABLED=0 $GO build -trimpath -ldflags "$ldflags" -o "$work/tpmagent-host" ./cmd/tpmagent
	"$work/tpmagent-host" gen-docs --man "$work/docs/man" --completions "$work/docs/completions"
	gzip -9n "$work"/docs/man/*.1
	# check reads the version the packages were built with.
	echo "$VERSION" >"$work/version"

	local arch
	for arch in $ARCHES; do
		env CGO_ENABLED=0 GOOS=linux $(goenv "$arch") \
			$GO build -tags nodocs -trimpath -ldflags "$ldflags" -o "$work/tpmagent-$arch" ./cmd/tpmagent
		local out="dist/tpmagent_${DEB_VERSION}_${arch}.deb"
		rm -f dist/tpmagent_*_"$arch".deb
		mkdir -p "$work/stage"
		cp "$work/tpmagent-$arch" "$work/stage/tpmagent"
		DEB_ARCH=$arch DEB_VERSION=$DEB_VERSION \
			"$tools/nfpm" package --config packaging/nfpm.yaml --packager deb --target "$out" >/dev/null
		printf 'deb: %s (%s bytes; binary %s bytes)\n' "$out" "$(stat -c %s "$out")" "$(stat -c %s "$work/tpmagent-$arch")"
	done
}

fail() { echo "deb check: FAIL: $*" >&2; exit 1; }

# must_list checks that the package's file list has every path given.
must_list() {
	local deb=$1 list
	shift
	list=$(dpkg-deb -c "$deb" | awk '{print $NF}')
	local p
	for p in "$@"; do
		grep -qxF ".$p" <<<"$list" || fail "$deb does not contain $p"
	done
}

# elf_machine prints the ELF e_machine of a binary (62 x86-64, 183 AArch64, 40 ARM).
elf_machine() { od -An -j18 -N2 -tu2 "$1" | tr -d ' '; }

check_contents() {
	local arch deb
	for arch in $ARCHES; do
		deb="dist/tpmagent_${DEB_VERSION}_${arch}.deb"
		[ -f "$deb" ] || fail "$deb missing: run make deb (VERSION=$VERSION)"
		must_list "$deb" /usr/bin/tpmagent /lib/systemd/system/tpmagent.service /etc/tpmagent/agent.yaml \
			/usr/lib/sysusers.d/tpmagent.conf /usr/lib/tmpfiles.d/tpmagent.conf \
			/usr/share/man/man1/tpmagent.1.gz /usr/share/man/man1/tpmagent-run.1.gz \
			/usr/share/bash-completion/completions/tpmagent /usr/share/zsh/vendor-completions/_tpmagent \
			/usr/share/fish/vendor_completions.d/tpmagent.fish
		[ "$(dpkg-deb -f "$deb" Architecture)" = "$arch" ] || fail "$deb: Architecture is $(dpkg-deb -f "$deb" Architecture)"
		[ "$(dpkg-deb -f "$deb" Version)" = "$DEB_VERSION" ] || fail "$deb: Version is $(dpkg-deb -f "$deb" Version)"
		dpkg-deb -I "$deb" conffiles | grep -qxF /etc/tpmagent/agent.yaml || fail "$deb: agent.yaml is not a conffile"
		local want runner
		case $arch in
		amd64) want=62 runner= ;;
		arm64) want=183 runner=qemu-aarch64-static ;;
		armhf) want=40 runner=qemu-arm-static ;;
		esac
		local tmp
		tmp=$(mktemp)
		dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/bin/tpmagent >"$tmp"
		chmod +x "$tmp"
		[ "$(elf_machine "$tmp")" = "$want" ] || fail "$deb: binary ELF machine $(elf_machine "$tmp"), want $want"
		local out
		out=$($runner "$tmp" version) || fail "$deb: tpmagent version failed"
		rm -f "$tmp"
		grep -q "^tpmagent $VERSION " <<<"$out" || fail "$deb: version printed '$out', want $VERSION"
		echo "deb check: $deb: $(dpkg-deb -c "$deb" | wc -l) entries; binary, unit, conffile, snippets, man, completions; runs: $out"
	done
}

check_install() {
	local deb="dist/tpmagent_${DEB_VERSION}_amd64.deb"
	[ -f "$deb" ] || fail "$deb missing: run make deb"
	[ "$(id -u)" -eq 0 ] || fail "dpkg -i needs root"
	if dpkg-query -W -f='${Status}' tpmagent 2>/dev/null | grep -q 'ok installed'; then
		fail "tpmagent is already installed here; not touching it (dpkg -P tpmagent first)"
	fi
	local had_user=no had_tss=no had_state=no
	getent passwd tpmagent >/dev/null && had_user=yes
	getent group tss >/dev/null && had_tss=yes
	[ -e /var/lib/tpmagent ] && had_state=yes
	cleanup_install() {
		dpkg -P tpmagent >/dev/null 2>&1 || true
		if [ "$had_user" = no ] && getent passwd tpmagent >/dev/null; then userdel tpmagent; fi
		if [ "$had_user" = no ] && getent group tpmagent >/dev/null; then groupdel tpmagent; fi
		if [ "$had_tss" = no ] && getent group tss >/dev/null; then groupdel tss; fi
		if [ "$had_state" = no ]; then rm -rf /var/lib/tpmagent; fi
	}
	trap cleanup_install EXIT

	install_and_check() {
		dpkg -i "$deb" >/dev/null || fail "dpkg -i $deb"
		local out
		out=$(/usr/bin/tpmagent version) || fail "/usr/bin/tpmagent version failed after dpkg -i"
		grep -q "^tpmagent $VERSION " <<<"$out" || fail "installed tpmagent printed '$out'"
		id -nG tpmagent | tr ' ' '\n' | grep -qx tss || fail "user tpmagent missing or not in group tss after install ($1)"
		[ "$(stat -c '%a %U' /var/lib/tpmagent)" = "700 tpmagent" ] ||
			fail "/var/lib/tpmagent is $(stat -c '%a %U' /var/lib/tpmagent) after install ($1)"
		[ -f /lib/systemd/system/tpmagent.service ] && [ -f /etc/tpmagent/agent.yaml ] ||
			fail "unit or config not installed ($1)"
		man -w tpmagent >/dev/null 2>&1 || [ -f /usr/share/man/man1/tpmagent.1.gz ] || fail "man page not installed ($1)"
		echo "deb check: dpkg -i ($1): $out; user tpmagent in tss; /var/lib/tpmagent 0700"
	}

	install_and_check "systemd-sysusers"
	# A local change to the config survives an upgrade (config|noreplace).
	echo "# local change" >>/etc/tpmagent/agent.yaml
	dpkg -i --force-confold "$deb" >/dev/null || fail "reinstall $deb"
	grep -q '^# local change' /etc/tpmagent/agent.yaml || fail "reinstall replaced the modified /etc/tpmagent/agent.yaml"
	dpkg -r tpmagent >/dev/null || fail "dpkg -r tpmagent"
	[ ! -e /usr/bin/tpmagent ] || fail "dpkg -r left /usr/bin/tpmagent"
	[ -f /etc/tpmagent/agent.yaml ] || fail "dpkg -r removed the conffile (only purge should)"
	dpkg -P tpmagent >/dev/null || fail "dpkg -P tpmagent"
	[ ! -e /etc/tpmagent/agent.yaml ] || fail "dpkg -P left /etc/tpmagent/agent.yaml"
	[ ! -e /var/lib/tpmagent ] || fail "dpkg -P left /var/lib/tpmagent"
	echo "deb check: dpkg -r keeps the conffile; dpkg -P removes it and /var/lib/tpmagent"

	# A container without systemd's tools: PATH without systemd-*.
	if [ "$had_user" = no ]; then userdel tpmagent; groupdel tpmagent 2>/dev/null || true; fi
	local nosd
	nosd=$(mktemp -d)
	local d f
	for d in /usr/local/sbin /usr/local/bin /usr/sbin /usr/bin /sbin /bin; do
		for f in "$d"/*; do
			case ${f##*/} in systemd-* | systemctl) continue ;; esac
			[ -e "$nosd/${f##*/}" ] || ln -s "$f" "$nosd/${f##*/}"
		done
	done
	PATH=$nosd install_and_check "no systemd tools"
	rm -rf "$nosd"
	dpkg -P tpmagent >/dev/null || fail "dpkg -P tpmagent"
	cleanup_install
	trap - EXIT
	! dpkg-query -W -f='${Status}' tpmagent 2>/dev/null | grep -q 'ok installed' || fail "tpmagent still installed"
	echo "deb check: machine clean (package purged, user/groups/dirs created by the check removed)"
}

case ${1:-build} in
build) build ;;
check)
	command -v dpkg-deb >/dev/null || fail "dpkg-deb missing"
	[ -f dist/build/version ] || fail "dist/build/version missing: run make deb first"
	VERSION=$(cat dist/build/version)
	DEB_VERSION=$(deb_version "$VERSION")
	check_contents
	check_install
	;;
*) echo "usage: scripts/deb.sh [build|check]" >&2; exit 2 ;;
esac
