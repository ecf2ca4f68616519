#!/usr/bin/env bash
# Create .venv from the repo's own requirement files; a no-op (about a second) when already current.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt requirements-nodeps.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import torch, kblampp" 2>/dev/null; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch==2.13.0 first and alone: a CPU wheel of exactly that version is on the machine's disk.
.venv/bin/pip install --disable-pip-version-check -q "$(grep -E '^torch==' requirements.txt)"
.venv/bin/pip install --disable-pip-version-check -q -r requirements.txt
.venv/bin/pip install --disable-pip-version-check -q --no-deps -r requirements-nodeps.txt
.venv/bin/pip install --disable-pip-version-check -q --no-deps -e . >/dev/null
echo "$want" > "$stamp"
echo "setup: .venv ready"
