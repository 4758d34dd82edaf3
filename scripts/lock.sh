#!/usr/bin/env bash
# Regenerate the lock files from pyproject.toml (`make lock`; UPGRADE=1 to move
# every pin to the newest allowed version, else the pins already there stay):
#   requirements.lock      the product's dependencies: the image installs exactly these
#   requirements-dev.lock  the same versions plus the test, bench and docs extras: .venv and CI
# Both hash-checked, for CPython 3.11 on x86_64 Linux (Debian bookworm's and the
# venv's Python). uv resolves; pip installs (no uv needed to install).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
UV_VERSION=0.13.9
tools=${VPBLU_CACHE:-$HOME/.cache/vpblu}/uv-$UV_VERSION
[ -x "$tools/bin/uv" ] || { python3 -m venv "$tools" && "$tools/bin/pip" install -q uv==$UV_VERSION; }
common=(--python-version 3.11 --python-platform x86_64-manylinux_2_36 --generate-hashes
        --custom-compile-command "make lock" --quiet)
[ "${UPGRADE:-0}" = 1 ] && common+=(--upgrade)
"$tools/bin/uv" pip compile pyproject.toml --extra test --extra bench --extra docs "${common[@]}" \
  -o requirements-dev.lock
"$tools/bin/uv" pip compile pyproject.toml -c requirements-dev.lock "${common[@]}" \
  -o requirements.lock
echo "requirements.lock: $(grep -c '^[a-z].*==' requirements.lock) packages;" \
     "requirements-dev.lock: $(grep -c '^[a-z].*==' requirements-dev.lock)"
