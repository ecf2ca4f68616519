"""Error analysis of the abstention decision: what the model's own signals look like per question family.

    python eval/abstention_signals.py --config configs/embedded_default.yaml --checkpoint runs/main_abstain \
        --qa data/qa/synth_world_test.jsonl

For every family: the median of a few decision features (`ABSTAIN_FEATURES`, first inject layer, the
question times generation uses) and the share the trained decision abstains on; then, for each
unanswerable family, how well each KB feature alone separates it from the answerable questions the
model answers right and from the `initials` family (ROC AUC, 0.5 = no signal, folded so >= 0.5).
Writes <run folder>/abstention_signals_<qa name>.md (and prints it).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from kblampp.config import add_config_args, config_from_args

SHOWN = ("max_alpha", "sem_gap", "top_phi", "top_g_time", "top_time_ok", "best_sem_group_time_ok", "head_mass",
         "n_heads", "n_relations", "beta", "copy_gate")


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC of pos above neg (Mann-Whitney, ties count half), folded to >= 0.5."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = np.argsort(np.argsort(np.concatenate([pos, neg]), kind="stable"), kind="stable").astype(float)
    both = np.concatenate([pos, neg])
    for v in np.unique(both):  # average ranks over ties
        tie = both == v
        ranks[tie] = ranks[tie].mean()
    a = (ranks[:len(pos)].sum() - len(pos) * (len(pos) - 1) / 2) / (len(pos) * len(neg))
    return float(max(a, 1.0 - a))


def signal_tables(features: np.ndarray, families: list[str], unanswerable: np.ndarray, answer_ok: np.ndarray,
                  abstained: np.ndarray, names: tuple[str, ...]) -> str:
    """The two markdown tables (medians per family; single-feature AUCs per unanswerable family)."""
    col = {n: i for i, n in enumerate(names)}
    fams = np.asarray(families)
    lines = ["| family | n | abstained | " + " | ".join(SHOWN) + " |", "|---|---:|---:|" + "---:|" * len(SHOWN)]
    for fam in sorted(set(families)):
        m = fams == fam
        med = [f"{np.median(features[m, col[n]]):.2f}" for n in SHOWN]
        lines.append(f"| {fam} | {int(m.sum())} | {abstained[m].mean():.2f} | " + " | ".join(med) + " |")
    right = ~unanswerable & answer_ok
    lines += ["", "| unanswerable family | against | best single features (AUC) |", "|---|---|---|"]
    for fam in sorted(set(fams[unanswerable].tolist())):
        for label, neg in (("answerable, top-alpha right", right), ("initials", fams == "initials")):
            if not neg.any():
                continue
            scores = sorted(((auc(features[fams == fam, i], features[neg, i]), n) for n, i in col.items()
                             if features[:, i].std() > 0), reverse=True)[:4]
            lines.append(f"| {fam} | {label} | " + ", ".join(f"{n} {a:.2f}" for a, n in scores) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--checkpoint", required=True, help="run folder (kb_final.safetensors with kb_abstain)")
    parser.add_argument("--qa", help="QA JSONL (default: the config's test_dataset)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    qa = args.qa or cfg.test_dataset
    if not qa:
        parser.error("no --qa and no test_dataset in the config")

    import torch

    from kblampp.abstention import ABSTAIN_FEATURES
    from kblampp.inference.loading import resolve_checkpoint
    from kblampp.schema import load_facts, load_qa
    from kblampp.training.abstention_phase import _load_run, collect, head_probability, question_hidden

    run = Path(args.checkpoint) if Path(args.checkpoint).is_dir() else Path(args.checkpoint).parent
    embedder, store, model, tokenizer, source = _load_run(cfg, resolve_checkpoint(args.checkpoint))
    if getattr(model, "kb_abstain", None) is None:
        raise SystemExit(f"{args.checkpoint}: no kb_abstain (train it with train/train_abstention.py)")
    records = load_qa(qa, num_facts=store.n)
    embed = (lambda texts: embedder.encode(texts, progress=not args.no_progress))
    with torch.no_grad():
        h, e = question_hidden(model, tokenizer, cfg, records, embed, run / "cache", not args.no_progress)
        data = collect(model, source, records, h, e, embed, load_facts(store.root / "facts.jsonl"), cfg.reference_date)
        p = head_probability(model.kb_abstain, data)
    t = float(model.kb_abstain.threshold) if cfg.abstention.threshold is None else float(cfg.abstention.threshold)
    text = signal_tables(data.features.numpy(), data.families, data.labels.numpy() > 0, data.answer_ok.numpy(),
                         p >= t, ABSTAIN_FEATURES)
    out = run / f"abstention_signals_{Path(qa).stem}.md"
    out.write_text(f"Decision threshold {t:.4f}; {qa}\n\n" + text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    from kblampp.cli import run_main
    raise SystemExit(run_main(main))
