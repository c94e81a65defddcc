#!/usr/bin/env bash
# Runs every fuzz target in the repository for DURATION each (default 20s):
#   go test -run '^$' -fuzz '^FuzzX$' -fuzztime DURATION ./pkg
# Targets are found by `func FuzzX(` in *_test.go files; seed corpora live in
# each package's testdata/fuzz/FuzzX/ (and in the f.Add calls). A crash
# leaves its input in testdata/fuzz/FuzzX/ and fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
duration=${1:-20s}

mapfile -t targets < <(git ls-files '*_test.go' | xargs grep -HoE '^func Fuzz[A-Za-z0-9_]+\(' |
	sed -E 's/^(.*)\/[^/]*:func (Fuzz[A-Za-z0-9_]+)\($/\1 \2/' | sort -u)
if [ ${#targets[@]} -eq 0 ]; then
	echo "fuzz: no fuzz targets found" >&2
	exit 1
fi
echo "fuzz: ${#targets[@]} targets, $duration each"
failed=()
for t in "${targets[@]}"; do
	dir=${t% *}
	name=${t#* }
	seeds=0
	[ -d "$dir/testdata/fuzz/$name" ] && seeds=$(find "$dir/testdata/fuzz/$name" -type f | wc -l)
	echo "== $name ./$dir ($seeds seed files in testdata/fuzz/$name)"
	if [ "$seeds" -eq 0 ]; then
		echo "fuzz: warning: $name has no seed corpus in $dir/testdata/fuzz/$name" >&2
	fi
	if ! $GO test -run '^$' -fuzz "^${name}\$" -fuzztime "$duration" "./$dir"; then
		failed+=("$name ./$dir")
	fi
done
if [ ${#failed[@]} -ne 0 ]; then
	echo "fuzz: FAILED: ${failed[*]}" >&2
	exit 1
fi
echo "fuzz: ${#targets[@]} passed, 0 failed"
