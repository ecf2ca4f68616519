"""Check a 5-tuple or QA JSONL file (or, once registered, a built store): every problem as
`PATH:LINE: FIELD: reason`, exit 1 if any, else a one-line summary and exit 0.

    python offline/sanity_check_5tuple.py data/5tuple/synth_world.jsonl
    python offline/sanity_check_5tuple.py data/qa/synth_world_dev.jsonl --kind qa --facts data/5tuple/synth_world.jsonl
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kblampp.sanity import main  # noqa: E402

if __name__ == "__main__":
    from kblampp.cli import run_main
    raise SystemExit(run_main(main))
