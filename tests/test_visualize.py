"""Alpha bar charts and training curves (PNG), and the visualize_alpha.py script."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kblampp.evaluation.plots import (curve_series, plot_evidence, plot_training_curves, read_metrics_jsonl,
                                      safe_name)

PNG = b"\x89PNG\r\n\x1a\n"


def _entry(qid: str, n: int = 3) -> dict:
    facts = [{"index": i, "head": f"H{i}", "relation": "r", "tail": f"T{i}", "context": "c",
              "time_window": ["2001", None] if i else [None, None], "alpha": 1.0 / (i + 2)} for i in range(n)]
    return {"qid": qid, "dataset": "toy", "question": "Who?", "answer": "T0", "pred_answer": "T1",
            "top_k_facts": facts, "supporting_facts": [0], "answer_fact": 0, "layer": 1, "beta": 0.5,
            "copy_gate": 0.8}


def test_safe_name():
    assert safe_name("world/3:q#1") == "world_3_q_1" and safe_name("///") == "question"


def test_plot_evidence_writes_one_png_per_entry(tmp_path):
    paths = plot_evidence([_entry("q/1"), _entry("q/1"), _entry("empty", 0)], tmp_path)
    assert [p.name for p in paths] == ["alpha_q_1.png", "alpha_q_1_2.png", "alpha_empty.png"]
    assert all(p.read_bytes()[:8] == PNG for p in paths)


ROWS = [
    {"phase": "retrieval", "step": 50, "loss": 2.0, "mean_loss": 2.5},
    {"phase": "retrieval", "step": 100, "loss": 1.0},
    {"phase": "retrieval", "step": 100, "eval": {"top1": 0.5, "top8": 0.9, "note": "x"}},
    {"phase": "copy_gate", "step": 10, "mean_loss": 0.3},
    {"phase": "empty", "step": 1, "eval": {"note": "text only"}},
]


def test_curve_series_and_plots(tmp_path):
    series = curve_series(ROWS)
    assert series == {"retrieval": {"loss": [(50, 2.5), (100, 1.0)], "eval/top1": [(100, 0.5)],
                                    "eval/top8": [(100, 0.9)]},
                      "copy_gate": {"loss": [(10, 0.3)]}}
    paths = plot_training_curves(ROWS, tmp_path)
    assert sorted(p.name for p in paths) == ["curves_copy_gate.png", "curves_retrieval.png"]
    assert all(p.read_bytes()[:8] == PNG for p in paths)


def test_read_metrics_jsonl_errors(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"phase": "a", "step": 1, "loss": 1}\n\n{"phase": "a"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"metrics.jsonl:3: step: missing or not a number"):
        read_metrics_jsonl(path)
    path.write_text('{"step": 1}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: <line>: invalid JSON"):
        read_metrics_jsonl(path)
    with pytest.raises(FileNotFoundError, match="metrics file not found"):
        read_metrics_jsonl(tmp_path / "missing.jsonl")


def test_visualize_alpha_script(tmp_path, repo_root):
    evidence = tmp_path / "evidence.json"
    evidence.write_text(json.dumps([_entry("q1"), _entry("q2")]), encoding="utf-8")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    out = tmp_path / "plots"
    proc = subprocess.run([sys.executable, str(repo_root / "eval/visualize_alpha.py"), "--evidence", str(evidence),
                           "--out_dir", str(out), "--metrics", str(metrics)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["alpha_q1.png", "alpha_q2.png", "curves_copy_gate.png",
                                                      "curves_retrieval.png"]
    bad = tmp_path / "bad.json"
    bad.write_text("{}", encoding="utf-8")
    proc = subprocess.run([sys.executable, str(repo_root / "eval/visualize_alpha.py"), "--evidence", str(bad),
                           "--out_dir", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2 and "bad.json: expected a JSON list" in proc.stderr


def test_alpha_bar_labels_show_the_tail_and_its_window_whole():
    from kblampp.evaluation.plots import _fact_label, fact_window_text

    fact = {"index": 7, "head": "Miller, Oconnell and Mitchell Holdings International Group of Companies",
            "relation": "chief executive officer", "tail": "Molly Rodriguez", "time_window": ["1979-07-10", "1983-08-16"]}
    label = _fact_label(fact, width=40)
    assert label.split("\n")[0] == "Molly Rodriguez [1979-07-10 – 1983-08-16]"
    assert label.split("\n")[1].startswith("#7 Miller") and len(label.split("\n")[1]) <= 40
    assert fact_window_text({"time_window": [None, "1995"]}) == "[… – 1995]"
    assert fact_window_text({"time_window": ["1990", None]}) == "[1990 – now]"
    assert fact_window_text({"time_window": [None, None]}) == "[no window]" == fact_window_text({})
