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
# Every pip call goes through pip_quiet.sh: -q, and the machine's repeated "Location ... is ignored"
# warning dropped (other warnings and errors still show).
pip_install() { bash scripts/pip_quiet.sh .venv/bin/pip install --disable-pip-version-check "$@"; }
# torch==2.13.0 first and alone: a CPU wheel of exactly that version is on the machine's disk.
pip_install "$(grep -E '^torch==' requirements.txt)"
pip_install -r requirements.txt
pip_install --no-deps -r requirements-nodeps.txt
pip_install --no-deps -e . >/dev/null
echo "$want" > "$stamp"
echo "setup: .venv ready"
