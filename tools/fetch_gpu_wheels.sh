#!/usr/bin/env bash
# Download the wheels of tools/gpu_wheels.txt for the GPU machine (CPython 3.12, x86-64 Linux)
# into .whl/ (ignored by .gitignore). Run here, where PyPI is reachable; then name `.whl` in the
# device call's `carry`. tools/gpu_check.sh installs them there with --no-index --target.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
mkdir -p .whl
list="$(mktemp)"; trap 'rm -f "$list"' EXIT
grep -v '^\s*#' tools/gpu_wheels.txt | sed 's/#.*//; s/\s//g' | grep -v '^$' > "$list"
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d .whl -r "$list"
echo "fetch_gpu_wheels: $(ls .whl/*.whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/"
