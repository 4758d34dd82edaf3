#!/usr/bin/env bash
# Create .venv/ at the repository root with vpblu and its test extras, able to
# import Debian's bcc (python3-bpfcc serves only /usr/bin/python3).
# The versions are requirements-dev.lock's (hash-checked; the image installs the
# same pins from requirements.lock): `make lock` regenerates both.
# Idempotent: reinstalls only when pyproject.toml or the lock changed since the last install.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${VPBLU_PYTHON:-}
if [ -z "$py" ]; then
  for c in python3.11 python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then py=$(command -v "$c"); break; fi
  done
fi
[ -n "$py" ] || { echo "need Python >= 3.11" >&2; exit 1; }
[ -x .venv/bin/python ] || "$py" -m venv .venv
stamp=.venv/.vpblu-installed
want=$(cat pyproject.toml requirements-dev.lock | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/pip install -q --disable-pip-version-check --require-hashes -r requirements-dev.lock
  # vpblu itself, editable, with the locked setuptools (no unpinned build environment).
  .venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
fi
# A folder holding only a `bcc` link, named by a .pth file: the venv sees
# Debian's bcc and nothing else from the system site-packages.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
sysbcc=$(/usr/bin/python3 -c 'import bcc, os; print(os.path.dirname(bcc.__file__))')
mkdir -p .venv/system-bcc
ln -sfn "$sysbcc" .venv/system-bcc/bcc
echo "$root/.venv/system-bcc" > "$site/vpblu-system-bcc.pth"
.venv/bin/python -c 'import bcc, trio, trio_asyncio, kubernetes_asyncio, grpclib, pyroute2' 
