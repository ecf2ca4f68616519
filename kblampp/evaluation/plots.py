"""PNG figures (matplotlib, Agg): per-question alpha bars from the evidence JSON, and training curves
from a run's metrics JSONL (`{phase, step, loss|mean_loss, ...}` rows and `{phase, step, eval: {...}}`).
"""
from __future__ import annotations

import json
import math
import re
import textwrap
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SUPPORT_COLOR, ANSWER_COLOR, OTHER_COLOR = "#4c9f70", "#1f6f43", "#9aa5b1"


def safe_name(text: str) -> str:
    """A file-name-safe version of a qid (letters, digits, '-', '_', '.')."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return cleaned or "question"


def fact_window_text(fact: dict[str, Any]) -> str:
    """The fact's time window as shown on a bar: "[1990 – 1995]", "[… – 1995]", "[1990 – now]", or
    "[no window]"."""
    start, end = (fact.get("time_window") or [None, None])[:2]
    return f"[{start or '…'} – {end or 'now'}]" if start or end else "[no window]"


def _fact_label(fact: dict[str, Any], width: int = 60) -> str:
    """Two lines: the tail and its window, always whole (what the answer head would copy and when it
    holds); then "#index head | relation", shortened to `width`."""
    source = textwrap.shorten(f"#{fact['index']} {fact['head']} | {fact['relation']}", width=width, placeholder="…")
    return f"{fact['tail']} {fact_window_text(fact)}\n{source}"


def _alpha_bars(ax: Any, facts: Sequence[dict[str, Any]], support: set, answer_fact: Any) -> None:
    """Horizontal alpha bars, highest on top; supporting facts green, the answer fact darker."""
    if facts:
        labels = [_fact_label(f) for f in facts][::-1]
        alphas = [float(f["alpha"]) for f in facts][::-1]
        colors = [ANSWER_COLOR if f["index"] == answer_fact else SUPPORT_COLOR if f["index"] in support
                  else OTHER_COLOR for f in facts][::-1]
        bars = ax.barh(range(len(facts)), alphas, color=colors)
        ax.set_yticks(range(len(facts)), labels, fontsize=7.5)
        for bar, a in zip(bars, alphas):
            ax.text(bar.get_width() + 0.01, bar.get_y() + bar.get_height() / 2, f"{a:.2f}", va="center", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no candidates", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(0, 1.1)


def plot_alpha(entry: dict[str, Any], path: str | Path) -> Path:
    """Alpha bars of one evidence entry (`_alpha_bars`); a multi-hop model's entry gets one panel per
    hop in order (its layer, beta, and which hop the answer was copied from). The title shows question,
    gold and predicted answer."""
    support = set(entry.get("supporting_facts") or [])
    answer_fact = entry.get("answer_fact")
    panels = [(h["facts"], f"hop {h['hop']}: alpha at layer {h['layer']}" + (
        f", beta {h['beta']:.2f}" if h.get("beta") is not None else "") + (
        "  <- answer copied from here" if entry.get("answer_hop") == h["hop"] else ""))
        for h in entry.get("hops") or []]
    if not panels:
        panels = [(entry["top_k_facts"], "alpha at the last prompt token" + (
            f" (layer {entry['layer']})" if "layer" in entry else ""))]
    heights = [1.0 + 0.62 * max(len(facts), 1) for facts, _ in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 0.6 + sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (facts, label) in zip(axes[:, 0], panels):
        _alpha_bars(ax, facts, support, answer_fact)
        ax.set_xlabel(label, fontsize=8.5)
    question = textwrap.shorten(str(entry["question"]), width=90, placeholder="…")
    extras = [f"gold: {entry['answer']}", f"pred: {entry['pred_answer']}"]
    if entry.get("beta") is not None:
        extras.append(f"beta {entry['beta']:.2f}")
    if entry.get("copy_gate") is not None:
        extras.append(f"copy gate {entry['copy_gate']:.2f}")
    axes[0, 0].set_title(f"{entry['qid']}: {question}\n" + "   ".join(extras), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_evidence(entries: Sequence[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """One `alpha_<qid>.png` per entry (qids made file-safe; repeats get a numeric suffix)."""
    out, used, paths = Path(out_dir), set(), []
    for entry in entries:
        name = safe_name(str(entry["qid"]))
        stem, k = name, 1
        while stem in used:
            k += 1
            stem = f"{name}_{k}"
        used.add(stem)
        paths.append(plot_alpha(entry, out / f"alpha_{stem}.png"))
    return paths


def read_metrics_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a training metrics JSONL; a bad line raises ValueError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: metrics file not found")
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{line_no}: <line>: invalid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{line_no}: <line>: expected a JSON object")
        if not isinstance(row.get("step"), (int, float)) or isinstance(row.get("step"), bool):
            raise ValueError(f"{path}:{line_no}: step: missing or not a number")
        rows.append(row)
    return rows


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def curve_series(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """{phase: {metric: [(step, value), ...]}}: training losses as `loss`, eval scalars as `eval/<k>`."""
    series: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for row in rows:
        phase = str(row.get("phase", "train"))
        target = series.setdefault(phase, {})
        if isinstance(row.get("eval"), dict):
            for key, value in row["eval"].items():
                if _num(value):
                    target.setdefault(f"eval/{key}", []).append((row["step"], float(value)))
            continue
        loss = row.get("mean_loss", row.get("loss"))
        if _num(loss):
            target.setdefault("loss", []).append((row["step"], float(loss)))
    return {phase: s for phase, s in series.items() if s}


def plot_training_curves(rows: Sequence[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """`curves_<phase>.png` per phase: the loss on the left, eval metrics (if any) on the right."""
    out, paths = Path(out_dir), []
    out.mkdir(parents=True, exist_ok=True)
    for phase, series in curve_series(rows).items():
        evals = {k: v for k, v in series.items() if k.startswith("eval/")}
        fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 4), squeeze=False)
        ax = axes[0][0]
        if "loss" in series:
            steps, values = zip(*series["loss"])
            ax.plot(steps, values, marker="." if len(steps) < 30 else None)
        ax.set_title(f"{phase}: training loss")
        ax.set_xlabel("step")
        if evals:
            ax2 = axes[0][1]
            for key, points in sorted(evals.items()):
                steps, values = zip(*points)
                ax2.plot(steps, values, marker="o", label=key[5:])
            ax2.set_title(f"{phase}: evaluation")
            ax2.set_xlabel("step")
            ax2.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"curves_{safe_name(phase)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
