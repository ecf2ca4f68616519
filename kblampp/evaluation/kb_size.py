"""Answer quality against KB size (issue 16): the real questions' retrieval queries, the ANN index's
recall of exact search on them, and the size table (markdown + JSON) and plot.

Why the queries are computed apart from generation: at the first inject layer the query of the last
prompt token, Q = kb_linear_q(h) + kb_query_ctx(e_q), depends on the prompt only (the layers below
never see the KB), so one pass gives the exact queries every KB size and every index answers.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from kblampp.knowledge_index import exact_scores, recall_against, recall_of
from kblampp.progress import progress_bar

TABLE_VERSION = 1
METRICS = ("em", "em_ci_low", "em_ci_high", "recall@1", "recall@K", "recall@K_single-hop",
           "em_single-hop", "em_temporal", "em_multi-hop", "em_unanswerable")


@torch.no_grad()
def last_token_queries(model: Any, tokenizer: Any, prompts: Sequence[str], e_q: torch.Tensor, source: Any,
                       batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """(n, d_k) float32: the first inject layer's query at each prompt's last token.

    Positions are counted from each row's first real token, as generate() does for left padding. The
    query reads the layer's input, which no KB term has touched yet, so only the last token retrieves
    (`retrieval_positions` "last_prompt": the other positions would search for nothing)."""
    from kblampp.inference.generate import tokenize_left
    from kblampp.kb_context import KBContext

    if len(prompts) != e_q.shape[0]:
        raise ValueError(f"last_token_queries: {len(prompts)} prompts but {e_q.shape[0]} question embeddings")
    layer = int(model.inject_layers[0])
    device = next(model.parameters()).device
    out = []
    for start in progress_bar(range(0, len(prompts), batch_size), desc="queries", unit="batch",
                              disable=not progress):
        batch = tokenize_left(tokenizer, prompts[start:start + batch_size], device)
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
        ctx = KBContext(source=source, e_q=e_q[start:start + batch_size].to(device), capture_query=True,
                        retrieval_positions="last_prompt")
        with model.kb_request(ctx):
            model(**batch, position_ids=positions, use_cache=False)
        out.append(ctx.queries[layer][0][:, -1].float().cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def exact_top(keys: np.ndarray, queries: np.ndarray, k: int, similarity: str = "ip", chunk: int = 128) -> np.ndarray:
    """(Q, k) ids of the exact top-k, best first, computed in query chunks (no (Q, N) matrix kept)."""
    out = []
    for s in range(0, len(queries), chunk):
        sc = exact_scores(keys, queries[s:s + chunk], similarity)
        top = np.argpartition(-sc, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sc, top, 1), axis=1, kind="stable")
        out.append(np.take_along_axis(top, order, 1))
    return np.concatenate(out)


def index_recall(index: Any, keys: np.ndarray, queries: np.ndarray, ks: Sequence[int],
                 similarity: str = "ip", chunk: int = 128, found: np.ndarray | None = None) -> dict[str, float]:
    """`recall_of` for `index.search` on `queries` (or its ids `found`), exact = `similarity` over
    `keys` (row i = fact i): the reference is the model's own exact search, whatever metric the index
    uses inside."""
    queries = np.asarray(queries, np.float32)
    if found is None:
        _, found = index.search(queries, max(ks))
    return recall_of(found, keys, queries, ks, similarity, chunk)


def gold_recall(found: np.ndarray, supports: Sequence[Sequence[int]], answer_facts: Sequence[int | None],
                k: int) -> dict[str, float]:
    """Search-only retrieval of the gold facts from `found` (Q, >= k) ids, best first: "recall@K" = share
    of each question's supporting facts in its top k (the metric of `retrieval_metrics`, which the
    model's candidates at the last prompt token give); "top1" = the best hit is the answer fact.
    Questions without supporting facts (unanswerable) are left out."""
    keep = [i for i, s in enumerate(supports) if s]
    if not keep:
        return {"recall@K": float("nan"), "top1": float("nan"), "n": 0}
    rk = [len(set(supports[i]) & set(found[i, :k].tolist())) / len(set(supports[i])) for i in keep]
    top1 = [float(found[i, 0] == answer_facts[i]) for i in keep]
    return {"recall@K": float(np.mean(rk)), "top1": float(np.mean(top1)), "n": len(keep)}


def row_metrics(summary: dict[str, Any]) -> dict[str, float | None]:
    """The size table's columns from a `summarize_row` dict (missing ones are None)."""
    return {m: (None if summary.get(m) is None else float(summary[m])) for m in METRICS} | {"n": summary.get("n")}


# ---- the table ------------------------------------------------------------------------------------

def _write_text_atomic(path: Path, text: str) -> None:
    from kblampp.store_io import write_bytes_atomic

    write_bytes_atomic(path, text.encode("utf-8"))


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _mb(x: float | None) -> str:
    return "–" if x is None else f"{x / 2 ** 20:,.0f} MB"


def _keys_only_lines(keys_only: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["| Facts | Search | Gold R@K (search top-K) | Answer fact first | Index recall@1 of exact | "
             "Index recall@K of exact | Index build |", "|---:|---|---:|---:|---:|---:|---:|"]
    for s in keys_only:
        for name, ret in s["retrieval"].items():
            rec = s.get("index_recall", {}).get(name, {})
            k = s.get("K_top", 8)
            build = "–" if rec.get("build_s") is None else f"{rec['build_s']:.0f} s"
            lines.append(f"| {s['n_facts']:,} | {ret.get('index', name)} | {_pct(ret.get('recall@K'))} | "
                         f"{_pct(ret.get('top1'))} | {_pct(rec.get('recall@1'))} | {_pct(rec.get(f'recall@{k}'))} | "
                         f"{build} |")
    return lines


def markdown_size_table(sizes: Sequence[dict[str, Any]], keys_only: Sequence[dict[str, Any]] = ()) -> str:
    """Quality per size and retrieval (EM with its 95% interval, recall, the index's recall of exact
    top-K on the real queries), cost per size (build, disk, peak RSS), and the search-only study."""
    lines: list[str] = []
    if sizes:
        lines += ["| Facts | Row | Retrieval | EM [95% CI] | R@1 | R@K | R@K single-hop | index recall@1 | "
                  "index recall@K |", "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
        for s in sizes:
            k = s.get("K_top", 8)
            for name, row in s["rows"].items():
                rec = s.get("index_recall", {}).get(row.get("index") or "", {})
                ci = f"{_pct(row['em'])} [{_pct(row['em_ci_low'])}, {_pct(row['em_ci_high'])}]"
                lines.append(f"| {s['n_facts']:,} | {row.get('label', name)} | {row.get('retrieval', '–')} | {ci} | "
                             f"{_pct(row.get('recall@1'))} | {_pct(row.get('recall@K'))} | "
                             f"{_pct(row.get('recall@K_single-hop'))} | {_pct(rec.get('recall@1'))} | "
                             f"{_pct(rec.get(f'recall@{k}'))} |")
        lines += ["", "| Facts | Distractors | Name/id collisions | Build s (generate + embed + K/V + HNSW) | "
                      "Store on disk (of it HNSW) | Peak RSS build / whole run |",
                  "|---:|---:|---:|---|---:|---:|"]
        for s in sizes:
            b = s["build"]
            steps = ("generate_s", "embed_s", "kv_write_s", "hnsw_build_s")
            parts = " + ".join(f"{b.get(k, 0.0):.0f}" for k in steps)
            col = s.get("collisions", {})
            lines.append(f"| {s['n_facts']:,} | {s['n_distractors']:,} | {col.get('names', 0)} / {col.get('ids', 0)} | "
                         f"{sum(b.get(k, 0.0) for k in steps):,.0f} ({parts}) | {_mb(s.get('store_bytes'))} "
                         f"({_mb(s.get('index_bytes'))}) | {_mb(s.get('peak_rss_build_bytes'))} / "
                         f"{_mb(s.get('peak_rss_bytes'))} |")
    if keys_only:
        lines += ([""] if lines else []) + _keys_only_lines(keys_only)
    return "\n".join(lines) + "\n"


def write_size_table(sizes: Sequence[dict[str, Any]], out_dir: str | Path, stem: str = "kb_size",
                     keys_only: Sequence[dict[str, Any]] = ()) -> dict[str, Path]:
    """`<stem>.json` (every number) and `<stem>.md` (the tables), sizes in ascending order, both atomic."""
    ordered = sorted(sizes, key=lambda s: s["n_facts"])
    searched = sorted(keys_only, key=lambda s: s["n_facts"])
    out = Path(out_dir)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md"}
    payload = {"version": TABLE_VERSION, "sizes": ordered, "keys_only": searched}
    _write_text_atomic(paths["json"], json.dumps(payload, indent=1) + "\n")
    _write_text_atomic(paths["md"], markdown_size_table(ordered, searched))
    return paths


def read_size_table(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """{"sizes": [...], "keys_only": [...]} of a `write_size_table` JSON; another shape is an error
    naming the field."""
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("version") != TABLE_VERSION:
        raise ValueError(f"{path}: version: expected {TABLE_VERSION} (a kb_size table), got "
                         f"{data.get('version') if isinstance(data, dict) else type(data).__name__}")
    for part, needed in (("sizes", ("n_facts", "rows", "build")), ("keys_only", ("n_facts", "retrieval"))):
        for i, s in enumerate(data.get(part, [])):
            for key in needed:
                if key not in s:
                    raise ValueError(f"{path}: {part}[{i}].{key}: missing")
    return {"sizes": list(data.get("sizes", [])), "keys_only": list(data.get("keys_only", []))}


def _series(ax: Any, points: Sequence[tuple[int, float | None]], **style: Any) -> None:
    pts = [(n, 100 * v) for n, v in points if v is not None]
    if pts:
        ax.plot([n for n, _ in pts], [v for _, v in pts], **style)


def _index_recall_points(sizes: Sequence[dict[str, Any]], name: str) -> list[tuple[int, float | None]]:
    """(facts, index `name`'s recall@K_top of exact search) for the sizes that measured it."""
    return [(s["n_facts"], s["index_recall"][name].get(f"recall@{s.get('K_top', 8)}"))
            for s in sizes if name in s.get("index_recall", {})]


def plot_size(sizes: Sequence[dict[str, Any]], path: str | Path, keys_only: Sequence[dict[str, Any]] = ()) -> Path:
    """EM (with its interval), gold recall@K and the index's recall of exact top-K against KB size (log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted(sizes, key=lambda s: s["n_facts"])
    searched = sorted(keys_only, key=lambda s: s["n_facts"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for name in dict.fromkeys(name for s in ordered for name in s["rows"]):
        pts = [(s["n_facts"], s["rows"][name]) for s in ordered if name in s["rows"]]
        label = f"{pts[0][1].get('label', name)} ({'exact' if name.endswith('_exact') else pts[0][1].get('index') or 'no search'})"
        err = [[100 * (r["em"] - r["em_ci_low"]) for _, r in pts], [100 * (r["em_ci_high"] - r["em"]) for _, r in pts]]
        axes[0].errorbar([n for n, _ in pts], [100 * r["em"] for _, r in pts], yerr=err, marker="o", capsize=3,
                         label=label)
        _series(axes[1], [(n, r.get("recall@K")) for n, r in pts], marker="o", label=f"{label}, generated")
    for name in dict.fromkeys(name for s in ordered for name in s.get("index_recall", {})):
        _series(axes[2], _index_recall_points(ordered, name), marker="o", label=name)
    for name in dict.fromkeys(name for s in searched for name in s["retrieval"]):
        pts = [(s["n_facts"], s["retrieval"][name]) for s in searched if name in s["retrieval"]]
        label = {"exact": "exact", "hnsw": "HNSW (config)", "hnsw_before": "HNSW (before)"}.get(name, name)
        _series(axes[1], [(n, r.get("recall@K")) for n, r in pts], linestyle="--", marker="x",
                label=f"{label}, search only")
        if name != "exact":
            _series(axes[2], _index_recall_points(searched, name), marker="x", linestyle="--",
                    label=f"{label}, search only")
    titles = ("EM (official, 95% CI)", "gold facts among the K_top candidates (R@K)",
              "index recall of exact top-K (real queries)")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log")
        ax.set_xlabel("facts in the KB")
        ax.set_ylabel("%")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def size_plan(base_n: int, sizes: Sequence[int]) -> list[int]:
    """The KB sizes to build, ascending and distinct: each must be at least the base KB's size
    (a size below it would drop facts the questions name)."""
    bad = [n for n in sizes if n < base_n]
    if bad:
        raise ValueError(f"sizes: {bad[0]:,} is below the base KB's {base_n:,} facts (the base KB is the "
                         f"smallest size; its facts are what the questions ask about)")
    return sorted(set(int(n) for n in sizes))


__all__ = ["last_token_queries", "gold_recall", "exact_scores", "exact_top", "recall_against", "index_recall", "row_metrics", "markdown_size_table", "write_size_table",
           "read_size_table", "plot_size", "size_plan"]
