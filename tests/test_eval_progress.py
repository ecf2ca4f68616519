"""Evaluation off a terminal: each row prints one line with its time (also with --no_progress), and
the per-question bars become plain status lines (no carriage returns in a log)."""
from __future__ import annotations

import re

import pytest


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from eval_world import build_world

    tmp = tmp_path_factory.mktemp("evalworld_progress")
    return tmp, build_world(tmp)


ROW_LINE = r"row {}: 4 questions in \d+s \([\d.]+ (q/s|s/q)\)"


@pytest.mark.parametrize("progress", [False, True])
def test_one_line_per_row_with_its_time(built, capsys, monkeypatch, progress):
    from kblampp.evaluation.runner import evaluate

    monkeypatch.delenv("KBLAMPP_PROGRESS", raising=False)
    tmp, ec = built
    evaluate(ec, tmp / "test.jsonl", tmp / f"eval_{progress}", rows=["backbone", "rag", "kblampp"], batch_size=3,
             kb_edit_n=2, progress=progress)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [ln for ln in err.splitlines() if not ln.startswith(("WARNING", "row kblampp skipped"))]
    rows = [ln for ln in lines if ln.startswith("row ")]
    assert [ln.split(":")[0] for ln in rows] == ["row backbone", "row rag", "row kblampp"]
    for row, line in zip(("backbone", "rag", "kblampp"), rows):
        assert re.fullmatch(ROW_LINE.format(row), line), line
    assert re.fullmatch(r"kb_edit: 2 facts edited and asked again in \d+s", lines[-1])
    bars = [ln for ln in lines if not ln.startswith(("row ", "kb_edit:"))]
    if progress:  # each generate() call ends with its status line
        assert any(re.match(r"backbone: 4/4 q \(100%\), done in \d+s", ln) for ln in bars), bars
    else:
        assert bars == []
