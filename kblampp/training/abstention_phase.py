"""Stage A, abstention phase: the `kb_abstain` decision trained on cached signals, calibrated on dev.

The backbone is frozen and the KB modules are trained by now, so each question's signals at the last
prompt token (alpha, the candidates' sem/phi/g_time and windows, the copy gate) come from one pass of
the first inject layer's own `select` over the cached state entering it: no LLM forward per step.
Unanswerable training questions are the positives. The threshold is then chosen on dev: the best
abstention F1 among thresholds that turn at most `max_answerable_loss` of the answerable dev
questions the model gets right (top-alpha = answer fact) into abstentions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kblampp.abstention import AbstainSignals, KBAbstainHead, abstention_features, calibrate_threshold, prf
from kblampp.config import KBConfig
from kblampp.kb_context import KBContext
from kblampp.schema import QARecord
from kblampp.progress import progress_bar


def answer_fact(rec: QARecord) -> int:
    """The answer fact of an answerable record (-1 when it has none)."""
    value = rec.raw.get("answer_fact")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return int(rec.supporting_facts[-1]) if rec.supporting_facts else -1


def record_taus(records: Sequence[QARecord]) -> torch.Tensor:
    """(n, 2) question windows in days parsed from the text (as every evaluation row and the server
    read them, never the record's gold time), NaN rows = no time."""
    from kblampp.evaluation.parsed_time import question_tau

    taus = [question_tau(r.question) for r in records]
    return torch.tensor([(math.nan, math.nan) if t is None else t for t in taus],
                        dtype=torch.float32).reshape(len(records), 2)


@dataclass
class AbstentionData:
    """Per question: features (n, F), label (n,) 1 = unanswerable, answer_ok (n,) the top-alpha
    candidate is the answer fact (answerable only), family names (for per-family recall)."""

    features: torch.Tensor
    labels: torch.Tensor
    answer_ok: torch.Tensor
    families: list[str]


@torch.no_grad()
def question_signals(model: Any, source: Any, hidden: torch.Tensor, e_q: torch.Tensor, tau: torch.Tensor,
                     chunk: int = 256) -> AbstainSignals:
    """The first inject layer's own selection at each cached state (n, d_model), as in generate()."""
    layer = int(model.inject_layers[0])
    kb = model.kb_layers[str(layer)]
    gate = getattr(model, "kb_copy_gate", None)
    device = kb.kb_linear_q.weight.device
    parts: list[AbstainSignals] = []
    for s in range(0, hidden.shape[0], chunk):
        h = hidden[s:s + chunk].to(device)
        ctx = KBContext(source=source, e_q=e_q[s:s + chunk].to(device), tau=tau[s:s + chunk].to(device),
                        record=True)  # record: the selection carries its score parts and windows
        sel, _ = kb.select(h.unsqueeze(1).to(kb.dtype), ctx)
        alpha = sel.alpha[:, 0]
        g = gate(h, alpha.max(-1).values) if gate is not None else torch.zeros(len(h), device=device)
        parts.append(AbstainSignals(alpha, sel.cand_ids[:, 0], sel.parts[:, 0], sel.windows[:, 0],
                                    tau[s:s + chunk].to(device), g))
    return AbstainSignals(*(torch.cat([p[i] for p in parts]) for i in range(len(AbstainSignals._fields))))


def collect(model: Any, source: Any, records: Sequence[QARecord], hidden: torch.Tensor, e_q: torch.Tensor
            ) -> AbstentionData:
    sig = question_signals(model, source, hidden, e_q, record_taus(records))
    sel = model.kb_layers[str(model.inject_layers[0])].kb_selector
    feats = abstention_features(sig, sel.gamma, sel.eta).cpu()
    top = sig.cand_ids.gather(1, sig.alpha.argmax(-1, keepdim=True)).squeeze(1).cpu()
    gold = torch.tensor([answer_fact(r) if r.answerable else -2 for r in records])
    labels = torch.tensor([0.0 if r.answerable else 1.0 for r in records])
    fams = [str(r.raw.get("family") or r.type) for r in records]
    return AbstentionData(feats, labels, top == gold, fams)


def fit_head(head: KBAbstainHead, data: AbstentionData, steps: int, lr: float, batch: int, seed: int = 0,
             progress: bool = True) -> dict[str, float]:
    """BCE with the classes weighted equally (unanswerable questions are ~10% of a split)."""
    if not bool((data.labels > 0).any()) or not bool((data.labels == 0).any()):
        raise ValueError("abstention training needs answerable and unanswerable training questions "
                         f"(got {int(data.labels.sum())} unanswerable of {len(data.labels)})")
    device = head.mean.device
    x, y = data.features.to(device), data.labels.to(device)
    head.fit_scaling(x)
    pos_weight = (y == 0).sum() / (y == 1).sum()
    opt = torch.optim.AdamW(head.net.parameters(), lr=lr, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(seed)
    loss = torch.tensor(0.0)
    bar = progress_bar(range(steps), desc="abstention", unit="step", disable=not progress)
    for _ in bar:
        rows = torch.randint(0, len(y), (min(batch, len(y)),), generator=gen).to(device)
        loss = F.binary_cross_entropy_with_logits(head.logits(x[rows]), y[rows], pos_weight=pos_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    with torch.no_grad():
        full = F.binary_cross_entropy_with_logits(head.logits(x), y, pos_weight=pos_weight)
    return {"train_loss": float(full), "train_n": len(y), "train_unanswerable": int(y.sum())}


def calibrate(p: np.ndarray, data: AbstentionData, max_answerable_loss: float) -> tuple[float, dict[str, float]]:
    """`calibrate_threshold` on a phase's data (answer_ok: the top-alpha candidate is the answer fact)."""
    return calibrate_threshold(p, data.labels.numpy() > 0, data.answer_ok.numpy(), max_answerable_loss)


def per_family_abstention(p: np.ndarray, data: AbstentionData, threshold: float) -> dict[str, float]:
    """Share of each family's questions abstained on (recall on unanswerable families)."""
    fams = np.array(data.families)
    return {f: float((p[fams == f] >= threshold).mean()) for f in sorted(set(data.families))}


def question_hidden(model: Any, tokenizer: Any, cfg: KBConfig, records: Sequence[QARecord],
                    embed: Callable[[list[str]], np.ndarray], cache_dir: Path, progress: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (n, d_model), e_q (n, d_ctx)) at the last prompt token, cached like Stage A's states."""
    from kblampp.backbone import build_prompt
    from kblampp.data import pad_id
    from kblampp.training.cache import cached_question_states

    prompts = [tokenizer.encode(build_prompt(tokenizer, r.question), add_special_tokens=False) for r in records]
    cached = cached_question_states(cache_dir, model.backbone, cfg.backbone, prompts, [r.question for r in records],
                                    int(model.inject_layers[0]), pad_id(tokenizer), embed, cfg.stage_a.cache_batch,
                                    progress)
    return cached["hidden"], cached["e_q"]


def train_abstention(model: Any, tokenizer: Any, cfg: KBConfig, source: Any, train: Sequence[QARecord],
                     dev: Sequence[QARecord], embed: Callable[[list[str]], np.ndarray], cache_dir: str | Path,
                     progress: bool = True) -> dict[str, Any]:
    """Register (or reuse) `model.kb_abstain`, train it on `train`, calibrate its threshold on `dev`.
    Returns the phase's report (dev precision/recall/F1, threshold, per-family abstention rates)."""
    from kblampp.training.stage_a import _subset  # Stage A's seeded subset (stage_a imports this module)

    ac = cfg.abstention
    head = getattr(model, "kb_abstain", None)
    if head is None:
        head = KBAbstainHead(hidden=ac.hidden)
        model.register_kb_module("kb_abstain", head)
    device = model.kb_layers[str(model.inject_layers[0])].kb_linear_q.weight.device
    head.to(device)
    train = _subset(train, ac.max_questions, cfg.seed)
    h, e = question_hidden(model, tokenizer, cfg, train, embed, Path(cache_dir), progress)
    tr = collect(model, source, train, h, e)
    report: dict[str, Any] = fit_head(head, tr, ac.steps, ac.lr, ac.batch, cfg.seed, progress)
    dev = _subset(dev, ac.dev_max_questions, cfg.seed + 1)
    if not dev:
        raise ValueError("abstention: the threshold is calibrated on dev, but there are no dev questions")
    h, e = question_hidden(model, tokenizer, cfg, dev, embed, Path(cache_dir), progress)
    dv = collect(model, source, dev, h, e)
    with torch.no_grad():
        p = head(dv.features.to(device)).cpu().numpy()
    threshold, metrics = calibrate(p, dv, ac.max_answerable_loss)
    with torch.no_grad():
        head.threshold.fill_(threshold)
    report.update({"threshold": threshold, "dev": metrics, "dev_n": len(dev), "dev_unanswerable": int(dv.labels.sum()),
                   "dev_abstain_rate_by_family": per_family_abstention(p, dv, threshold)})
    return report


def train_on_checkpoint(cfg: KBConfig, checkpoint: str | Path, output_dir: str | Path,
                        progress: bool = True) -> dict[str, Any]:
    """The phase on a finished run: load its model (the evaluation's loader) and the built store, train
    and calibrate `kb_abstain`, and write a run folder with kb_final.safetensors (the run's KB tensors
    plus the decision), config.resolved.yaml (abstention.threshold set) and abstention_summary.json."""
    import json
    import shutil

    from kblampp.config import save_resolved
    from kblampp.inference.loading import FINAL_CHECKPOINT, resolve_checkpoint
    from kblampp.kb_params import save_kb_checkpoint
    from kblampp.schema import load_qa

    ckpt = resolve_checkpoint(checkpoint)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    embedder, store, model, tokenizer, source = _load_run(cfg, ckpt)
    train = load_qa(cfg.train_dataset, num_facts=store.n)
    dev = load_qa(cfg.eval_dataset, num_facts=store.n) if cfg.eval_dataset else []
    with torch.enable_grad():
        report = train_abstention(model, tokenizer, cfg, source, train, dev,
                                  lambda texts: embedder.encode(texts, progress=progress), out / "cache", progress)
    cfg.abstention.threshold = report["threshold"]
    save_kb_checkpoint(model, cfg, out / FINAL_CHECKPOINT)
    for name in ("stage_b_adapter.json", "kv_encoder.safetensors"):  # a Stage B run keeps its adapters
        if (ckpt.parent / name).is_file():
            shutil.copy2(ckpt.parent / name, out / name)
    save_resolved(cfg, out)
    report["init_from"] = str(ckpt)
    (out / "abstention_summary.json").write_text(json.dumps(report, indent=1, default=float), encoding="utf-8")
    return report


def _load_run(cfg: KBConfig, checkpoint: Path) -> tuple[Any, Any, Any, Any, Any]:
    """(embedder, store, model, tokenizer, KB source) of a run, through the evaluation's loader."""
    from kblampp.embedding import load_embedder
    from kblampp.inference.loading import build_source, load_model
    from kblampp.kb_store import KBValueStore

    embedder = load_embedder(cfg.embedding_model, device=cfg.device)
    store = KBValueStore.load(cfg.store_dir, embedder=embedder)
    model, tokenizer = load_model(cfg, checkpoint, embedder.dim)
    source, _ = build_source(cfg, store)
    return embedder, store, model, tokenizer, source


@torch.no_grad()
def decision_report(cfg: KBConfig, checkpoint: str | Path, qa_path: str | Path, cache_dir: str | Path,
                    progress: bool = True) -> dict[str, Any]:
    """The trained decision on a whole QA file. It is taken at the last prompt token, before any answer
    token, so it needs no generation: abstention P/R/F1, abstention rate per family, and the share of
    answerable questions abstained on whose top-alpha candidate is the answer fact (an upper bound
    on the answers the decision takes away from the answer head, which copies that candidate)."""
    from kblampp.inference.loading import resolve_checkpoint
    from kblampp.schema import load_qa

    embedder, store, model, tokenizer, source = _load_run(cfg, resolve_checkpoint(checkpoint))
    head = getattr(model, "kb_abstain", None)
    if head is None:
        raise ValueError(f"{checkpoint}: the checkpoint has no kb_abstain (train it with train/train_abstention.py)")
    records = load_qa(qa_path, num_facts=store.n)
    h, e = question_hidden(model, tokenizer, cfg, records, lambda texts: embedder.encode(texts, progress=progress),
                           Path(cache_dir), progress)
    data = collect(model, source, records, h, e)
    p = head(data.features.to(head.mean.device)).cpu().numpy()
    t = float(head.threshold) if cfg.abstention.threshold is None else float(cfg.abstention.threshold)
    unans, abst = data.labels.numpy() > 0, p >= t
    ok = data.answer_ok.numpy() & ~unans
    n_ans = max(int((~unans).sum()), 1)
    return {"qa": str(qa_path), "threshold": t, "n": len(records), "n_unanswerable": int(unans.sum()),
            **prf(abst, unans), "abstained_answerable": float((abst & ~unans).sum() / n_ans),
            "abstained_answerable_top_alpha_right": float((abst & ok).sum() / n_ans),
            "answerable_top_alpha_right": float(ok.sum() / n_ans),
            "abstain_rate_by_family": per_family_abstention(p, data, t)}
