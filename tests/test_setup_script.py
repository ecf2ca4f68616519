"""scripts/setup.sh: every pip call is quiet (-q) and drops only pip's repeated
"Location '...' is ignored" warning (scripts/pip_quiet.sh); real errors and the exit status stay."""
from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("WARNING: Location 'file:///opt/pypi-more/simple/torch/' is ignored: it is either a non-existing path "
         "or lacks a specific scheme.")
FAKE_PIP = f"""echo "installing $*"; for i in 1 2 3; do echo "{NOISE}" >&2; done
echo "ERROR: No matching distribution found for nothing==1" >&2; echo "WARNING: real warning" >&2; exit 7"""


def test_pip_quiet_drops_only_the_location_warning_and_keeps_the_status():
    proc = subprocess.run(["bash", str(ROOT / "scripts/pip_quiet.sh"), "bash", "-c", FAKE_PIP, "pip", "install", "x"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 7
    assert proc.stdout == "installing install x -q\n"  # -q appended to the pip command
    assert proc.stderr.splitlines() == ["ERROR: No matching distribution found for nothing==1", "WARNING: real warning"]
    ok = subprocess.run(["bash", str(ROOT / "scripts/pip_quiet.sh"), "true"], capture_output=True, text=True)
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "", "")


def test_setup_calls_pip_only_through_pip_quiet():
    lines = (ROOT / "scripts/setup.sh").read_text(encoding="utf-8").splitlines()
    pip_lines = [ln for ln in lines if "pip install" in ln and not ln.lstrip().startswith("#")]
    assert pip_lines == ['pip_install() { bash scripts/pip_quiet.sh .venv/bin/pip install --disable-pip-version-check "$@"; }']
    assert sum(ln.startswith("pip_install ") for ln in lines) == 4
