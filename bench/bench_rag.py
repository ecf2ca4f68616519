"""KBLaM++ against in-context RAG (SPEC section 9): per question, prompt tokens, latency and EM for RAG
with k = 1, 4, 8, 16 facts written into the prompt versus KBLaM++ (constant prompt, facts injected),
on the same held-out questions with the same backbone, prompt builder, token budget and extraction.

Rows run question-major (every row on question 1, then on question 2, ...) so machine load drifts
equally over all rows. Two latencies per question and row: `prefill` = one forward over the prompt
(isolates what prompt length costs) and `answer` = the whole greedy generate() (stops at the end of
turn, so it also depends on how long the answer is).

Without --checkpoint the KB modules are freshly initialised (plus an answer-head copy gate): the
latency and prompt columns are real, the KBLaM++ EM is that of an UNTRAINED model and is labelled so.
Without a store at cfg.store_dir one is encoded from --facts into ~/.cache/kblampp/bench/.

    python bench/bench_rag.py --config configs/embedded_default.yaml --max_questions 30
    python bench/bench_rag.py --config configs/embedded_default.yaml --checkpoint runs/<run> --ks 1 4 8 16
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from kblampp.progress import progress_bar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kblampp.config import KBConfig, add_config_args, config_from_args  # noqa: E402

CACHE = Path(os.environ.get("KBLAMPP_BENCH_CACHE", "~/.cache/kblampp/bench")).expanduser()


def ensure_store(cfg: KBConfig, facts_path: str) -> str:
    """cfg.store_dir if it holds a store, else a store encoded from `facts_path` in the bench cache."""
    if (Path(cfg.store_dir) / "manifest.json").is_file():
        return cfg.store_dir
    from kblampp.kb_store import encode_file
    from kblampp.store_io import sha256_file

    folder = CACHE / f"store_{Path(facts_path).stem}_{sha256_file(facts_path)[:12]}"
    if not (folder / "manifest.json").is_file():
        print(f"no store at {cfg.store_dir}: encoding {facts_path} into {folder}", flush=True)
        encode_file(facts_path, folder, cfg.embedding_model, cfg.d_k, cfg.d_v)
    return str(folder)


def untrained_checkpoint(cfg: KBConfig, d_ctx: int) -> Path:
    """A checkpoint of freshly initialised KB modules with a copy gate (seeded; cached)."""
    from kblampp import hf_arch
    from kblampp.answer_head import KBCopyGate
    from kblampp.backbone import load_backbone
    from kblampp.kb_params import save_kb_checkpoint
    from kblampp.model import KBLaMPP

    path = CACHE / f"untrained_{cfg.backbone.replace(':', '_').replace('/', '_')}_L{'-'.join(map(str, cfg.inject_layers))}" \
                   f"_k{cfg.d_k}_v{cfg.d_v}_c{d_ctx}.safetensors"
    if not path.is_file():
        torch.manual_seed(0)
        backbone, _ = load_backbone(cfg)
        model = KBLaMPP(backbone, cfg, d_ctx=d_ctx)
        model.register_kb_module("kb_copy_gate", KBCopyGate(hf_arch.hidden_size(backbone)))
        save_kb_checkpoint(model, cfg, path, extra={"note": "untrained (bench_rag.py)"})
    return path


def timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict:
    from kblampp.evaluation.baselines import FactRetriever, backbone_prompts, context_prompts, rag_fact_ids
    from kblampp.inference.generate import generate_rows, tokenize_left
    from kblampp.evaluation.kbqa import KB_VARIANTS, kb_request, question_taus
    from kblampp.evaluation.runner import load_eval_context, select_questions
    from kblampp.kb_context import KBContext
    from kblampp.metrics import score_answer
    from kblampp.schema import load_qa

    cfg = config_from_args(args)
    cfg.store_dir = ensure_store(cfg, args.facts)
    trained = bool(args.checkpoint)
    ckpt = args.checkpoint or untrained_checkpoint(cfg, d_ctx=384 if cfg.d_ctx is None else cfg.d_ctx)
    torch.manual_seed(0)
    ec = load_eval_context(cfg, ckpt, progress=False)
    torch.set_grad_enabled(False)
    records = select_questions(load_qa(args.qa, num_facts=len(ec.facts)), args.max_questions, seed=args.seed)
    q_vecs = np.asarray(ec.embed([r.question for r in records]), dtype=np.float32)
    e_q = torch.from_numpy(q_vecs)
    taus = question_taus(records)
    plain = backbone_prompts(ec.tokenizer, records)
    retriever = FactRetriever(np.asarray(ec.store.raw("e_c")), alive=np.asarray(ec.store.alive, dtype=bool))
    rag_ids = {k: rag_fact_ids(retriever, q_vecs, k) for k in args.ks}
    prompts = {"backbone": plain, **{f"rag_k{k}": context_prompts(ec.tokenizer, records, ec.facts, rag_ids[k])
                                     for k in args.ks}, "kblampp": plain}
    kb_row = "kblampp" if getattr(ec.model, "kb_copy_gate", None) is not None else "kblampp_injection"
    budget, device = cfg.max_new_tokens, cfg.device
    per_q: list[dict] = []
    for i in progress_bar(range(len(records)), desc="questions", unit="q"):
        rec = records[i]
        for row, row_prompts in prompts.items():
            prompt = row_prompts[i]
            batch = tokenize_left(ec.tokenizer, [prompt], device)
            is_kb = row == "kblampp"
            ctx = KBContext(source=ec.source, e_q=e_q[i:i + 1].to(device), tau=taus[i:i + 1].to(device))

            def prefill() -> Any:
                if is_kb:
                    with ec.model.kb_request(ctx):
                        return ec.model(**batch)
                return ec.model(**batch)

            prefill()  # warm (first-call allocations stay out of the numbers)
            _, prefill_s = timed(prefill)
            hook = kb_request(ec.model, ec.source, e_q[i:i + 1], [rec], KB_VARIANTS[kb_row], ec.tail_table) \
                if is_kb else None
            gens, answer_s = timed(lambda: generate_rows(ec.model, ec.tokenizer, [prompt], budget, batch_size=1,
                                                         request=hook, progress=False))
            s = score_answer(gens[0].output, rec.aliases)
            per_q.append({"qid": rec.qid, "type": rec.type, "row": row, "prompt_tokens": int(batch["input_ids"].shape[1]),
                          "prefill_s": prefill_s, "answer_s": answer_s, "em": float(s["em"]), "f1": float(s["f1"]),
                          "contained": float(s["contained"]), "output": gens[0].output, "answer": rec.answer})
    return {"rows": per_q, "meta": {
        "checkpoint": str(ckpt), "trained": trained, "kb_row": kb_row, "n_facts": len(ec.facts),
        "retrieval": cfg.retrieval, "K_top": cfg.K_top, "backbone": cfg.backbone, "qa": args.qa,
        "questions": len(records), "max_new_tokens": budget, "threads": torch.get_num_threads(),
        "load_avg": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}}


def summarise(result: dict) -> list[dict]:
    """One line per row: mean prompt tokens, median latencies, EM / F1 / contained."""
    out = []
    by_row: dict[str, list[dict]] = {}
    for r in result["rows"]:
        by_row.setdefault(r["row"], []).append(r)
    for row, rs in by_row.items():
        out.append({"row": row, "prompt_tokens": statistics.mean(r["prompt_tokens"] for r in rs),
                    "prefill_ms": 1e3 * statistics.median(r["prefill_s"] for r in rs),
                    "answer_ms": 1e3 * statistics.median(r["answer_s"] for r in rs),
                    "em": statistics.mean(r["em"] for r in rs), "f1": statistics.mean(r["f1"] for r in rs),
                    "contained": statistics.mean(r["contained"] for r in rs), "n": len(rs)})
    return out


def print_table(result: dict, summary: list[dict]) -> None:
    m = result["meta"]
    label = "" if m["trained"] else " (KBLaM++ UNTRAINED: fresh KB modules; its EM means nothing)"
    print(f"\n{m['questions']} questions of {m['qa']}, {m['backbone']}, N = {m['n_facts']:,} facts, "
          f"KBLaM++ retrieval {m['retrieval']} K_top {m['K_top']}, {m['max_new_tokens']} new tokens max, "
          f"{m['threads']} threads, load {m['load_avg'][0]:.2f}, {m['date']}{label}")
    print("\n| row | prompt tokens (mean) | prefill ms (median) | answer ms (median) | EM | F1 | contained |")
    print("|---|---|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['row']} | {s['prompt_tokens']:.1f} | {s['prefill_ms']:.1f} | {s['answer_ms']:.1f} | "
              f"{s['em']:.3f} | {s['f1']:.3f} | {s['contained']:.3f} |")
    kb = next((s for s in summary if s["row"] == "kblampp"), None)
    rag = [s for s in summary if s["row"].startswith("rag_k")]
    if kb and rag:
        for what in ("prefill_ms", "answer_ms"):
            slower = [s["row"] for s in rag if s[what] > kb[what]]
            print(f"crossover ({what.replace('_ms', '')}): RAG is slower than KBLaM++ for "
                  f"{', '.join(slower) if slower else 'no k measured'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--checkpoint", default=None, help="trained KB checkpoint or run folder (default: untrained)")
    p.add_argument("--qa", default="data/qa/synth_world_test.jsonl", help="held-out questions (QA JSONL)")
    p.add_argument("--facts", default="data/5tuple/synth_world.jsonl", help="5-tuples to encode when no store exists")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 4, 8, 16], help="RAG facts per prompt")
    p.add_argument("--max_questions", type=int, default=30, help="type-stratified subset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    p.add_argument("--out", default=None, help="write per-question rows and the summary as JSON here")
    args = p.parse_args(argv)
    if any(k < 1 for k in args.ks):
        p.error("--ks: every k must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    summary = summarise(result)
    print_table(result, summary)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"argv": sys.argv, **result, "summary": summary}, indent=1))
        os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    from kblampp.cli import run_main
    raise SystemExit(run_main(main))
