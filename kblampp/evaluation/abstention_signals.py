"""Error analysis of the abstention decision: what the model's own signals look like per question family
(`eval/eval_abstention.py --signals`).

For every family: the median of a few decision features (`ABSTAIN_FEATURES`, first inject layer, the
question times generation uses) and the share the trained decision abstains on; then, for each
unanswerable family, how well each KB feature alone separates it from the answerable questions the
model answers right and from the `initials` family (ROC AUC, 0.5 = no signal, folded so >= 0.5).
"""
from __future__ import annotations

import numpy as np

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
                  abstained: np.ndarray, names: tuple[str, ...], shown: tuple[str, ...] = SHOWN) -> str:
    """The two markdown tables (medians of `shown` per family; single-feature AUCs per unanswerable family)."""
    col = {n: i for i, n in enumerate(names)}
    fams = np.asarray(families)
    lines = ["| family | n | abstained | " + " | ".join(shown) + " |", "|---|---:|---:|" + "---:|" * len(shown)]
    for fam in sorted(set(families)):
        m = fams == fam
        med = [f"{np.median(features[m, col[n]]):.2f}" for n in shown]
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
