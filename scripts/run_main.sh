#!/usr/bin/env bash
# The main job on the embedded default: set up .venv if needed, then run the whole pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/main_job.py "$@"
