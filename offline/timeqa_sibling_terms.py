"""Which selector term tells an answer's fact from its siblings on TimeQA's held-out pages.

Why: siblings (facts sharing a page and relation: one player's clubs, one office's holders) have
identical keys, so sem ties and s = sem + gamma*phi + eta*g_time picks among them by phi (the question
against the fact's evidence sentence) and g_time (the question's time against the fact's window). This
measures, for a trained TimeQA run, how often each choice picks the answer's fact on the training and
dev pages:

  time only         eta*g_time with the run's weights;
  time + phi        gamma*phi + eta*g_time with the run's weights (what the model does);
  refit time        g_time's rows refit on the training pages' TimeQA questions alone;
  refit time + phi  g_time's rows and phi's matrix refit there too, reported per epoch (dev = early stop).

Questions: TimeQA, answerable, a time constraint the parser finds, the answer's fact with at least one
sibling. No LLM forward is needed: sem is the same for every sibling.

    python offline/timeqa_sibling_terms.py --run runs/timeqa [--epochs 30]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kblampp.question_time import parse_time_constraint  # noqa: E402
from kblampp.schema import QARecord  # noqa: E402
from kblampp.scorers import ContextScorer, TimeScorer, kind_index  # noqa: E402
from kblampp.timewin import window_days  # noqa: E402


@dataclass
class SiblingQuestion:
    """One question the probe scores: its text (embedded as e_q, as the model embeds it) and what g_time reads."""

    question: str
    siblings: list[int]  # fact ids sharing the answer fact's (head, relation)
    target: int  # position of the answer fact in `siblings`
    tau: tuple[float, float]  # question window, days
    kind: int  # index into TIME_KINDS


def sibling_questions(records: Sequence[QARecord], sibling_index: torch.Tensor, reference_date: str | None = None
                      ) -> list[SiblingQuestion]:
    """The questions described in the module docstring, in file order. `sibling_index` (N, L): the
    facts sharing each fact's (head, relation), as the time phase groups them (`FactTable.sibling_index`)."""
    out = []
    for r in records:
        if r.dataset != "timeqa" or not r.answerable or not r.supporting_facts:
            continue
        answer = int(r.raw.get("answer_fact", r.supporting_facts[-1]))
        siblings = [int(i) for i in sibling_index[answer] if i >= 0]
        constraint = parse_time_constraint(r.question, reference_date)
        if len(siblings) < 2 or constraint is None or constraint.window() is None:
            continue
        out.append(SiblingQuestion(r.question, siblings, siblings.index(answer),
                                   window_days(*constraint.window()), kind_index(constraint.kind)))
    return out


def sibling_scores(rows: Sequence[SiblingQuestion], e_q: torch.Tensor, time: TimeScorer, context: ContextScorer,
                   tau_min: torch.Tensor, tau_max: torch.Tensor, ctx_vec: torch.Tensor, gamma: float, eta: float
                   ) -> list[torch.Tensor]:
    """gamma*phi + eta*g_time over each question's siblings (sem is the same for all of them)."""
    out = []
    for row, q in zip(rows, e_q):
        idx = torch.tensor(row.siblings)
        n = len(idx)
        g = time(torch.tensor([row.tau]), tau_min[idx][None, None], tau_max[idx][None, None],  # (1, 1, n)
                 time_kind=torch.tensor([row.kind]), same_group=torch.ones(1, 1, n, n, dtype=torch.bool))[0, 0]
        phi = context(q[None], ctx_vec[idx][None, None])[0, 0] if gamma else torch.zeros(n)  # (n,)
        out.append(gamma * phi + eta * g)
    return out


def accuracy(scores: Sequence[torch.Tensor], rows: Sequence[SiblingQuestion]) -> float:
    """Share of questions whose answer fact has the highest score among its siblings."""
    if not rows:
        raise ValueError("no sibling question to score (TimeQA, answerable, timed, answer with siblings)")
    return sum(int(s.argmax()) == r.target for s, r in zip(scores, rows)) / len(rows)


def refit(rows: Sequence[SiblingQuestion], e_q: torch.Tensor, time: TimeScorer, context: ContextScorer,
          tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor], gamma: float, eta: float, epochs: int,
          with_phi: bool, lr: float, on_epoch=None) -> None:
    """Full-batch Adam on the siblings' cross-entropy; `on_epoch(epoch)` after each epoch."""
    if not rows:
        raise ValueError("no training sibling question to refit on")
    params = [time.weight] + ([context.weight] if with_phi else [])
    opt = torch.optim.Adam(params, lr=lr)
    targets = torch.tensor([r.target for r in rows])
    for epoch in tqdm(range(1, epochs + 1), desc="refit " + ("time + phi" if with_phi else "time"), unit="epoch"):
        scores = sibling_scores(rows, e_q, time, context, *tables, gamma, eta)
        loss = torch.stack([F.cross_entropy(s[None], t[None]) for s, t in zip(scores, targets)]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if on_epoch is not None:
            on_epoch(epoch)


def main(argv: Sequence[str] | None = None) -> int:
    from safetensors.torch import load_file

    from kblampp.config import load_config
    from kblampp.embedding import load_embedder
    from kblampp.inference.loading import resolve_checkpoint
    from kblampp.kb_store import KBValueStore
    from kblampp.schema import load_facts, load_qa
    from kblampp.training.facts import FactTable

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/timeqa", help="a TimeQA run folder (config.resolved.yaml, kb_final)")
    ap.add_argument("--train", default=None, help="training QA (default: the run's train_dataset)")
    ap.add_argument("--dev", default="data/qa/timeqa_dev_answerable.jsonl")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--report_every", type=int, default=10)
    args = ap.parse_args(argv)

    run = Path(args.run)
    cfg = load_config(run / "config.resolved.yaml")
    facts = load_facts(cfg.tuples_path)
    table = FactTable.from_store(KBValueStore.load(cfg.store_dir, read_only=True), facts)
    tables = (table.tau_min.float(), table.tau_max.float(), table.ctx_vec)
    siblings = table.sibling_index()
    weights = load_file(str(resolve_checkpoint(run)))
    trained_time = next(v for k, v in weights.items() if k.endswith("kb_time_scorer.weight"))
    trained_phi = next(v for k, v in weights.items() if k.endswith("kb_context_scorer.weight"))
    time, context = TimeScorer(), ContextScorer(trained_phi.shape[0])

    def reset() -> None:
        time.weight.data, context.weight.data = trained_time.clone(), trained_phi.clone()

    embedder = load_embedder(cfg.embedding_model)
    splits = {}
    for name, path in (("train", args.train or cfg.train_dataset), ("dev", args.dev)):
        rows = sibling_questions(load_qa(path, len(facts)), siblings, cfg.reference_date)
        e_q = torch.from_numpy(embedder.encode([r.question for r in rows], progress=False)).float()
        splits[name] = (rows, e_q)
        print(f"{name}: {len(rows)} sibling questions ({path})")

    def line(label: str, gamma: float) -> None:
        with torch.no_grad():
            acc = {n: 100 * accuracy(sibling_scores(rows, e_q, time, context, *tables, gamma, cfg.eta), rows)
                   for n, (rows, e_q) in splits.items()}
        print(f"{label:28s} train {acc['train']:5.1f}   dev {acc['dev']:5.1f}")

    reset()
    line("time only (run's weights)", 0.0)
    line("time + phi (run's weights)", cfg.gamma)
    train_rows, train_q = splits["train"]
    for with_phi in (False, True):
        reset()
        label = "refit time + phi" if with_phi else "refit time"
        gamma = cfg.gamma
        refit(train_rows, train_q, time, context, tables, gamma, cfg.eta, args.epochs, with_phi,
              lr=0.01 if with_phi else 0.02,
              on_epoch=lambda e, lab=label, g=gamma: line(f"{lab}, epoch {e}", g) if e % args.report_every == 0 else None)
    return 0


if __name__ == "__main__":
    from kblampp.cli import run_main
    sys.exit(run_main(main))
