"""Stage A, abstention phase: the `kb_abstain` decision trained on cached signals, calibrated on dev.

The backbone is frozen and the KB modules are trained by now, so each question's signals at the last
prompt token (alpha, the candidates' sem/phi/g_time, windows and fact fields, beta, the copy gate, the
state) come from one pass of the first inject layer's own `select` over the cached state entering it,
with the question times evaluation and the server use: no LLM forward per step. Unanswerable training
questions are the positives (with `abstention.dev_folds`, dev questions too, cross-fitted). The
threshold is then chosen on dev: the best
abstention F1 among thresholds that turn at most `max_answerable_loss` of the answerable dev
questions the model gets right (top-alpha = answer fact) into abstentions.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kblampp.abstention import (AbstainSignals, KBAbstainHead, abstention_features, calibrate_threshold, head_named,
                                prf, signals_from_record)
from kblampp.config import KBConfig, name_link_limit
from kblampp.kb_context import KBContext
from kblampp.name_link import NameIndex
from kblampp.schema import QARecord
from kblampp.progress import progress_bar


def answer_fact(rec: QARecord) -> int:
    """The answer fact of an answerable record (-1 when it has none)."""
    value = rec.raw.get("answer_fact")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return int(rec.supporting_facts[-1]) if rec.supporting_facts else -1


@dataclass
class AbstentionData:
    """Per question: features (n, F), label (n,) 1 = unanswerable, answer_ok (n,) the top-alpha
    candidate is the answer fact (answerable only), family names (for per-family recall), and the
    state the branch read (n, d_model; the head's optional state projection reads it)."""

    features: torch.Tensor
    labels: torch.Tensor
    answer_ok: torch.Tensor
    families: list[str]
    states: torch.Tensor | None = None
    questions: torch.Tensor | None = None  # (n,) which question each row is (one question, several KBs)

    def question_ids(self) -> torch.Tensor:
        return torch.arange(len(self.labels)) if self.questions is None else self.questions

    def subset(self, rows: Sequence[int]) -> "AbstentionData":
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        return AbstentionData(self.features[idx], self.labels[idx], self.answer_ok[idx],
                              [self.families[i] for i in idx.tolist()],
                              None if self.states is None else self.states[idx], self.question_ids()[idx])

    @staticmethod
    def join(parts: Sequence["AbstentionData"]) -> "AbstentionData":
        states = [p.states for p in parts]
        return AbstentionData(torch.cat([p.features for p in parts]), torch.cat([p.labels for p in parts]),
                              torch.cat([p.answer_ok for p in parts]), [f for p in parts for f in p.families],
                              None if any(x is None for x in states) else torch.cat(states),
                              torch.cat([p.question_ids() for p in parts]))


@torch.no_grad()
def question_signals(model: Any, source: Any, hidden: torch.Tensor, e_q: torch.Tensor, times: Any,
                     chunk: int = 256, linked: torch.Tensor | None = None) -> AbstainSignals:
    """The first inject layer's own selection at each cached state (n, d_model), as generate() makes
    it: the questions' typed constraints, anchors and forced successor candidates (`times`, a
    `QuestionTimes`), the facts each question names (`linked` (n, L), with `name_link`), read back
    through the LayerRecord the layer writes and `signals_from_record`."""
    from kblampp.kb_context import LayerRecord

    layer = int(model.inject_layers[0])
    kb = model.kb_layers[str(layer)]
    gate = getattr(model, "kb_copy_gate", None)
    device = kb.kb_linear_q.weight.device
    tau, kind = times.tensors()
    forced, excluded = times.forced(), times.excluded_ids()
    parts: list[AbstainSignals] = []
    for s in range(0, hidden.shape[0], chunk):
        rows = slice(s, s + chunk)
        h = hidden[rows].to(device).unsqueeze(1).to(kb.dtype)  # (b, 1, d_model)
        ctx = KBContext(source=source, e_q=e_q[rows].to(device), tau=tau[rows].to(device),
                        time_kind=kind[rows].to(device), forced_ids=None if forced is None else forced[rows].to(device),
                        forced_only=True, excluded_ids=None if excluded is None else excluded[rows].to(device),
                        linked_ids=None if linked is None else linked[rows].to(device),
                        record=True)  # record: the selection carries its score parts and windows
        sel, _ = kb.select(h, ctx)
        _, beta = kb.kb_fusion(h, sel.v_tilde)
        record = LayerRecord(alpha=sel.alpha, cand_ids=sel.cand_ids, beta=beta, hidden=h, parts=sel.parts,
                             windows=sel.windows)
        parts.append(signals_from_record(record, tau[rows], gate, source=source))
    cat = (lambda i: None if parts[0][i] is None else torch.cat([p[i] for p in parts]))
    return AbstainSignals(*(cat(i) for i in range(len(AbstainSignals._fields))))


def collect(model: Any, source: Any, records: Sequence[QARecord], hidden: torch.Tensor, e_q: torch.Tensor,
            embed: Callable[[list[str]], np.ndarray] | None = None, facts: Sequence[Any] | None = None,
            reference_date: str | None = None, name_check: bool = True,
            link_limit: int | None = None) -> AbstentionData:
    """Features and labels of `records`; the question times as evaluation and the server build them
    (`request_times`: parsed from the text, anchors dated by the first retrieval when `embed` is given);
    with `facts` and `name_check`, whether each candidate's head is named in the question; with `facts`
    and `link_limit` (`name_link_limit`), the facts each question names lead its candidates, as at run time."""
    from kblampp.evaluation.kbqa import request_times
    from kblampp.time_query import query_vectors

    times = request_times(model, source, records, embed, facts, reference_date)
    if embed is not None:  # a dated relative question queries without its clause, as at run time
        e_q = query_vectors(embed, [r.question for r in records], times, e_q.float())
    linked = None
    if facts is not None and link_limit is not None:
        names = NameIndex([f.head_name for f in facts])
        linked = torch.from_numpy(names.linked_ids([r.question for r in records], link_limit))
    sig = question_signals(model, source, hidden, e_q, times, linked=linked)
    if facts is not None and name_check:
        sig = sig._replace(head_named=head_named([r.question for r in records], sig.cand_ids,
                                                 lambda i: facts[i].head_name))
    sel = model.kb_layers[str(model.inject_layers[0])].kb_selector
    feats = abstention_features(sig, sel.gamma, sel.eta).cpu()
    top = sig.cand_ids.gather(1, sig.alpha.argmax(-1, keepdim=True)).squeeze(1).cpu()
    gold = torch.tensor([answer_fact(r) if r.answerable else -2 for r in records])
    labels = torch.tensor([0.0 if r.answerable else 1.0 for r in records])
    fams = [str(r.raw.get("family") or r.type) for r in records]
    return AbstentionData(feats, labels, top == gold, fams, sig.hidden.float().cpu())


def fit_head(head: KBAbstainHead, data: AbstentionData, steps: int, lr: float, batch: int, seed: int = 0,
             progress: bool = True) -> dict[str, float]:
    """BCE with the classes weighted equally (unanswerable questions are ~10% of a split)."""
    if not bool((data.labels > 0).any()) or not bool((data.labels == 0).any()):
        raise ValueError("abstention training needs answerable and unanswerable training questions "
                         f"(got {int(data.labels.sum())} unanswerable of {len(data.labels)})")
    device = head.mean.device
    x, y = data.features.to(device), data.labels.to(device)
    states = None if data.states is None else data.states.to(device)
    if head.state_dims > 0:
        if states is None:
            raise ValueError("kb_abstain reads the question state (state_dims > 0): the data has no states")
        head.fit_state(states)
    head.fit_scaling(head.inputs(x, states))
    pos_weight = (y == 0).sum() / (y == 1).sum()
    opt = torch.optim.AdamW(head.net.parameters(), lr=lr, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(seed)
    loss = torch.tensor(0.0)
    bar = progress_bar(range(steps), desc="abstention", unit="step", disable=not progress)
    for _ in bar:
        rows = torch.randint(0, len(y), (min(batch, len(y)),), generator=gen).to(device)
        loss = F.binary_cross_entropy_with_logits(head.logits(x[rows], None if states is None else states[rows]),
                                                  y[rows], pos_weight=pos_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    with torch.no_grad():
        full = F.binary_cross_entropy_with_logits(head.logits(x, states), y, pos_weight=pos_weight)
    return {"train_loss": float(full), "train_n": len(y), "train_unanswerable": int(y.sum())}


@torch.no_grad()
def head_probability(head: KBAbstainHead, data: AbstentionData) -> np.ndarray:
    """p(unanswerable) of every question of `data`."""
    return head(data.features.to(head.mean.device), data.states).cpu().numpy()


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


def new_head(model: Any, cfg: KBConfig, seed: int = 0) -> KBAbstainHead:
    """A fresh decision shaped by the config, its weights drawn from `seed`, registered as
    `model.kb_abstain` (replacing any old one)."""
    ac = cfg.abstention
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = KBAbstainHead(hidden=ac.hidden, state_dims=ac.state_dims, d_state=int(model.d_model))
    if hasattr(model, "kb_abstain"):
        model.kb_abstain = head  # a run's earlier decision (perhaps of an older feature set) is retrained
    else:
        model.register_kb_module("kb_abstain", head)
    return head.to(model.kb_layers[str(model.inject_layers[0])].kb_linear_q.weight.device)


def dev_folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    """k seeded, disjoint folds covering range(n)."""
    return [np.sort(f) for f in np.array_split(np.random.default_rng(seed).permutation(n), k)]


def question_folds(questions: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """`dev_folds` over the distinct questions, as row indices: a question's rows (one per KB) share a
    fold, so no head is calibrated on a question it was trained on."""
    ids = np.unique(questions)
    return [np.flatnonzero(np.isin(questions, ids[f])) for f in dev_folds(len(ids), k, seed)]


def fit_and_calibrate(model: Any, cfg: KBConfig, tr: AbstentionData, dv: AbstentionData, progress: bool = True
                      ) -> tuple[KBAbstainHead, np.ndarray, dict[str, Any]]:
    """The head and the dev probabilities its threshold is calibrated on. `abstention.dev_folds` = 0:
    trained on the training questions, dev only calibrates. k > 1: dev questions train too (they come
    from worlds the retrieval was not fitted on, like the test's); the calibration then reads out-of-fold
    probabilities (k heads, each trained without one dev fold) and the kept head sees all of dev."""
    ac = cfg.abstention
    if ac.dev_folds <= 1:
        head = new_head(model, cfg, cfg.seed)
        report = fit_head(head, tr, ac.steps, ac.lr, ac.batch, cfg.seed, progress)
        return head, head_probability(head, dv), report
    p = np.zeros(len(dv.labels), dtype=np.float32)
    for i, fold in enumerate(question_folds(dv.question_ids().numpy(), ac.dev_folds, cfg.seed + 2)):
        rest = np.setdiff1d(np.arange(len(dv.labels)), fold)
        head = new_head(model, cfg, cfg.seed + i)
        fit_head(head, AbstentionData.join([tr, dv.subset(rest)]), ac.steps, ac.lr, ac.batch, cfg.seed + i, False)
        p[fold] = head_probability(head, dv.subset(fold))
    head = new_head(model, cfg, cfg.seed)
    report = fit_head(head, AbstentionData.join([tr, dv]), ac.steps, ac.lr, ac.batch, cfg.seed, progress)
    return head, p, {**report, "train_n": len(tr.labels), "train_unanswerable": int(tr.labels.sum()),
                     "dev_folds": ac.dev_folds, "dev_in_training": True}
def train_abstention(model: Any, tokenizer: Any, cfg: KBConfig, source: Any, train: Sequence[QARecord],
                     dev: Sequence[QARecord], embed: Callable[[list[str]], np.ndarray], cache_dir: str | Path,
                     progress: bool = True, facts: Sequence[Any] | None = None,
                     grown: Sequence[tuple[Any, Sequence[Any]]] = ()) -> dict[str, Any]:
    """Register a fresh `model.kb_abstain`, train it (`fit_and_calibrate`), calibrate its threshold on
    `dev`. Returns the phase's report (dev precision/recall/F1, threshold, per-family abstention rates).

    `grown`: (source, facts) of KBs holding `source`'s facts first and many more after them: every
    question's signals are collected over each too, so the decision and its threshold also see the near
    neighbours a big KB puts among the candidates (calibrated on the small KB alone, it abstains on
    answerable questions there)."""
    from kblampp.training.stage_a import _subset  # Stage A's seeded subset (stage_a imports this module)

    ac = cfg.abstention
    if ac.name_check and facts is None:
        raise ValueError("abstention.name_check: the decision reads the candidates' head names, so training "
                         "needs the facts (or set abstention.name_check=false)")
    if cfg.name_link and facts is None:
        raise ValueError("name_link: the facts a question names lead its candidates, so training the decision "
                         "needs the facts (or set name_link=false)")
    train = _subset(train, ac.max_questions, cfg.seed)
    dev = _subset(dev, ac.dev_max_questions, cfg.seed + 1)
    if not dev:
        raise ValueError("abstention: the threshold is calibrated on dev, but there are no dev questions")
    data = []
    for records in (train, dev):
        h, e = question_hidden(model, tokenizer, cfg, records, embed, Path(cache_dir), progress)
        data.append(AbstentionData.join([collect(model, kb, records, h, e, embed, kb_facts, cfg.reference_date,
                                                 ac.name_check, name_link_limit(cfg))
                                         for kb, kb_facts in [(source, facts), *grown]]))
    head, p, report = fit_and_calibrate(model, cfg, data[0], data[1], progress)
    threshold, metrics = calibrate(p, data[1], ac.max_answerable_loss)
    with torch.no_grad():
        head.threshold.fill_(threshold)
    report.update({"threshold": threshold, "dev": metrics, "dev_n": len(dev), "kbs": 1 + len(grown),
                   "dev_unanswerable": int(data[1].labels.sum()),
                   "dev_abstain_rate_by_family": per_family_abstention(p, data[1], threshold)})
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
    from kblampp.schema import load_facts, load_qa

    ckpt = resolve_checkpoint(checkpoint)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    embedder, store, model, tokenizer, source = _load_run(cfg, ckpt)
    facts = load_facts(store.root / "facts.jsonl")
    train = load_qa(cfg.train_dataset, num_facts=store.n)
    dev = load_qa(cfg.eval_dataset, num_facts=store.n) if cfg.eval_dataset else []
    grown = [grown_kb(cfg, store, facts, path) for path in cfg.abstention.grown_stores]
    with torch.enable_grad():
        report = train_abstention(model, tokenizer, cfg, source, train, dev,
                                  lambda texts: embedder.encode(texts, progress=progress), out / "cache", progress,
                                  facts, grown)
    cfg.abstention.threshold = report["threshold"]
    save_kb_checkpoint(model, cfg, out / FINAL_CHECKPOINT)
    for name in ("stage_b_adapter.json", "kv_encoder.safetensors"):  # a Stage B run keeps its adapters
        if (ckpt.parent / name).is_file():
            shutil.copy2(ckpt.parent / name, out / name)
    save_resolved(cfg, out)
    report["init_from"] = str(ckpt)
    (out / "abstention_summary.json").write_text(json.dumps(report, indent=1, default=float), encoding="utf-8")
    return report


def grown_kb(cfg: KBConfig, store: Any, base: Sequence[Any], path: str | Path) -> tuple[Any, list[Any]]:
    """(exact source, facts) of a grown store: `store`'s facts first, unchanged, and its keys from the
    same K/V encoder (`bench/bench_kb_size.py --build_only` makes one); anything else is refused.
    `base`: the run's facts, as already loaded."""
    from kblampp.kb_store import KBValueStore
    from kblampp.retrieval import TensorKB
    from kblampp.schema import load_facts

    grown = KBValueStore.load(path)
    where = f"abstention.grown_stores: {path}"
    if grown.n <= store.n:
        raise ValueError(f"{where}: {grown.n} facts, not more than the run's store's {store.n}")
    if grown.manifest["kv_encoder"]["sha256"] != store.manifest["kv_encoder"]["sha256"]:
        raise ValueError(f"{where}: encoded by another K/V encoder than {store.root} (kv_encoder.sha256 differs)")
    facts = load_facts(grown.root / "facts.jsonl")
    first = next((i for i, (a, b) in enumerate(zip(base, facts)) if a.raw != b.raw), None)
    if first is not None:
        raise ValueError(f"{where}: facts.jsonl line {first + 1} differs from {store.root / 'facts.jsonl'}: "
                         "a grown store keeps the run's facts first and unchanged")
    return TensorKB.from_store(grown, device=cfg.device, similarity=cfg.index.similarity), facts


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
def decision_data(cfg: KBConfig, checkpoint: str | Path, qa_path: str | Path, cache_dir: str | Path,
                  progress: bool = True) -> tuple[AbstentionData, np.ndarray, float]:
    """(signals and labels of a whole QA file, p(unanswerable) per question, the threshold in force)."""
    from kblampp.inference.loading import resolve_checkpoint
    from kblampp.schema import load_facts, load_qa

    embedder, store, model, tokenizer, source = _load_run(cfg, resolve_checkpoint(checkpoint))
    head = getattr(model, "kb_abstain", None)
    if head is None:
        raise ValueError(f"{checkpoint}: the checkpoint has no kb_abstain (train it with train/train_abstention.py)")
    records = load_qa(qa_path, num_facts=store.n)
    embed = (lambda texts: embedder.encode(texts, progress=progress))
    h, e = question_hidden(model, tokenizer, cfg, records, embed, Path(cache_dir), progress)
    data = collect(model, source, records, h, e, embed, load_facts(store.root / "facts.jsonl"), cfg.reference_date,
                   cfg.abstention.name_check, name_link_limit(cfg))
    t = float(head.threshold) if cfg.abstention.threshold is None else float(cfg.abstention.threshold)
    return data, head_probability(head, data), t


def decision_report(data: AbstentionData, p: np.ndarray, t: float, qa_path: str | Path) -> dict[str, Any]:
    """The trained decision on a whole QA file. It is taken at the last prompt token, before any answer
    token, so it needs no generation: abstention P/R/F1 (overall and per unanswerable family), abstention
    rate per family, and the share of answerable questions abstained on whose top-alpha candidate is
    the answer fact (an upper bound on the answers the decision takes away from the answer head, which
    copies that candidate)."""
    unans, abst = data.labels.numpy() > 0, p >= t
    ok = data.answer_ok.numpy() & ~unans
    n_ans = max(int((~unans).sum()), 1)
    return {"qa": str(qa_path), "threshold": t, "n": len(data.labels), "n_unanswerable": int(unans.sum()),
            **prf(abst, unans), "abstained_answerable": float((abst & ~unans).sum() / n_ans),
            "abstained_answerable_top_alpha_right": float((abst & ok).sum() / n_ans),
            "answerable_top_alpha_right": float(ok.sum() / n_ans),
            "by_reason": per_reason(abst, unans, data.families),
            "abstain_rate_by_family": per_family_abstention(p, data, t)}


def per_reason(abstained: np.ndarray, unanswerable: np.ndarray, families: Sequence[str]) -> dict[str, dict]:
    """Each unanswerable family against all answerable questions: recall on the family, precision =
    its abstentions over its abstentions plus every abstention on an answerable question, F1."""
    fams = np.asarray(families)
    out = {}
    for fam in sorted(set(fams[unanswerable].tolist())):
        keep = (fams == fam) | ~unanswerable
        out[fam] = {"n": int((fams == fam).sum()), **prf(abstained[keep], unanswerable[keep])}
    return out
