"""Serving and evaluation answer through one model path (kblampp.inference); neither imports the other."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(package: str) -> dict[str, set[str]]:
    """Every module a package's files import (top level and inside functions), per file."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "kblampp" / package).glob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        found[path.name] = names
    return found


def test_serving_never_imports_evaluation():
    bad = {f: sorted(m for m in mods if m.startswith("kblampp.evaluation")) for f, mods in imported_modules("serving").items()}
    assert {f: m for f, m in bad.items() if m} == {}


def test_evaluation_never_imports_serving():
    bad = {f: sorted(m for m in mods if m.startswith("kblampp.serving")) for f, mods in imported_modules("evaluation").items()}
    assert {f: m for f, m in bad.items() if m} == {}


def test_both_load_and_generate_through_inference():
    serving, evaluation = imported_modules("serving"), imported_modules("evaluation")
    assert "kblampp.inference.loading" in serving["build.py"]
    assert "kblampp.inference.generate" in serving["model_answerer.py"]
    assert {"kblampp.inference.loading", "kblampp.inference.generate"} <= evaluation["runner.py"]


def test_progress_bars_go_through_kblampp_progress():
    """Off a terminal a raw tqdm bar writes a line per refresh (a log of 0% lines); progress_bar does not."""
    raw = {}
    for path in sorted((ROOT / "kblampp").rglob("*.py")):
        if path.name == "progress.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tqdm"):
                raw[str(path.relative_to(ROOT))] = node.module
            elif isinstance(node, ast.Import) and any(a.name.startswith("tqdm") for a in node.names):
                raw[str(path.relative_to(ROOT))] = "tqdm"
    assert raw == {}
