"""Where the inject layers retrieve: `retrieval_positions` "all" (every prompt position and every
decode step) against "last_prompt" (the last prompt token only), prefill and decode time.

The main job's trained checkpoint on the embedded default backbone, its real store and faiss index,
real test questions with the evaluation's prompt (left-padded batches of `--batch`). Interleaved runs
(plain, all, last_prompt, plain, ...), medians reported as ratios: prefill = one forward over the
batch's prompts; decode = `--gen_tokens` greedy single-token steps with the KV cache after an untimed
prefill (bench_injection.decode_steps), each run in a fresh KB request. "last_prompt, shared prefix"
is the prefill evaluation and serving run under "last_prompt": the prompts' common first tokens (the
chat template's system part) computed once without a request (untimed, once per run as there), each
batch forwarding only the rest (`kblampp.inference.generate.with_prefix`, the cache copy included).
The load average is printed before and after (the machine may be shared).

    python bench/bench_positions.py --config runs/main/config.resolved.yaml --batch 16 --repeats 5
    python bench/bench_positions.py --config runs/main/config.resolved.yaml --batch 4 --repeats 2 --threads 1   # smoke
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kblampp.config import RETRIEVAL_POSITIONS, add_config_args, config_from_args  # noqa: E402

MODES = ("plain",) + RETRIEVAL_POSITIONS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, required=False)
    p.set_defaults(config="runs/main/config.resolved.yaml")
    p.add_argument("--checkpoint", default=None, help="KB checkpoint or run folder (default: the config's output_dir)")
    p.add_argument("--retrieval", default="faiss", choices=["faiss", "exact"])
    p.add_argument("--batch", type=int, default=16, help="questions per batch (one left-padded generate() batch)")
    p.add_argument("--gen_tokens", type=int, default=16, help="decode steps timed after the prefill")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--out", default=None, help="write the timings as JSON here")
    args = p.parse_args(argv)

    import torch

    from bench_injection import decode_steps, timed
    from kblampp.backbone import answer_instruction
    from kblampp.evaluation.baselines import backbone_prompts
    from kblampp.evaluation.kbqa import question_taus
    from kblampp.evaluation.runner import load_eval_context, select_questions
    from kblampp.inference.generate import common_prefix_len, left_padded, shared_prefix_cache, tokenize_left, with_prefix
    from kblampp.kb_context import KBContext
    from kblampp.schema import load_qa

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = dataclasses.replace(config_from_args(args), retrieval=args.retrieval)
    t0 = time.perf_counter()
    ec = load_eval_context(cfg, args.checkpoint or cfg.output_dir, progress=False)
    records = select_questions(load_qa(cfg.test_dataset or cfg.eval_dataset, num_facts=len(ec.facts)), args.batch)
    prompts = backbone_prompts(ec.tokenizer, records, answer_instruction(cfg.abstain_answer))
    device = cfg.device
    batch = tokenize_left(ec.tokenizer, prompts, device)
    e_q = torch.as_tensor(ec.embed([r.question for r in records])).float().to(device)
    tau = question_taus(records, cfg.reference_date).to(device)
    model = ec.model
    load_before = os.getloadavg()
    print(f"# {cfg.backbone}, inject layers {model.inject_layers}, K_top {cfg.K_top}, {ec.store.n:,} facts, "
          f"retrieval {args.retrieval}; batch {len(records)} x {batch['input_ids'].shape[1]} prompt tokens, "
          f"decode {args.gen_tokens} tokens; {torch.get_num_threads()} threads; loaded in "
          f"{time.perf_counter() - t0:.1f} s; load avg {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)

    def in_mode(mode: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        """fn run as the plain backbone, or inside a fresh KB request of one scope."""
        def run() -> Any:
            if mode == "plain":
                return fn()
            ctx = KBContext(source=ec.source, e_q=e_q, tau=tau, retrieval_positions=mode)
            with model.kb_request(ctx):
                return fn()
        return run

    ids, mask = batch["input_ids"], batch["attention_mask"]
    prefill = lambda: model(input_ids=ids, attention_mask=mask, logits_to_keep=1)  # noqa: E731
    decode = lambda: decode_steps(model, ids, mask, args.gen_tokens, device)  # noqa: E731
    token_ids = [ec.tokenizer(x, add_special_tokens=False)["input_ids"] for x in prompts]
    n = common_prefix_len(token_ids)
    with torch.inference_mode():
        prefix_cache = shared_prefix_cache(model, token_ids[0][:n], device)
    suffixes = left_padded(ec.tokenizer, [x[n:] for x in token_ids], device)

    def shared_prefill() -> Any:
        inputs = with_prefix(suffixes, token_ids[0][:n], prefix_cache)
        positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0)[:, n:]  # as in the whole prompt
        return model(input_ids=inputs["input_ids"][:, n:], attention_mask=inputs["attention_mask"],
                     past_key_values=inputs["past_key_values"], position_ids=positions, logits_to_keep=1)

    times: dict[str, list[float]] = {f"{m}_{part}": [] for m in MODES for part in ("prefill", "decode")}
    times["last_prompt_shared_prefill"] = []
    with torch.inference_mode():
        for mode in MODES:  # warm-up
            timed(in_mode(mode, prefill), device)
        timed(in_mode("last_prompt", shared_prefill), device)
        for _ in range(args.repeats):  # interleaved
            for mode in MODES:
                times[f"{mode}_prefill"].append(timed(in_mode(mode, prefill), device))
                times[f"{mode}_decode"].append(in_mode(mode, decode)())
            times["last_prompt_shared_prefill"].append(timed(in_mode("last_prompt", shared_prefill), device))
    med = {k: statistics.median(v) for k, v in times.items()}
    load_after = os.getloadavg()
    print(f"\n(shared prefix: {n} of {ids.shape[1]} padded prompt tokens)")
    print("| part | plain ms | all ms | last_prompt ms | all / last_prompt | all / plain | last_prompt / plain |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    lines = {"prefill": ("prefill", "prefill"), "decode": ("decode", "decode"),
             "prefill, last_prompt from the shared prefix": ("prefill", "shared_prefill")}
    for name, (part, lp_part) in lines.items():  # plain and all always run the whole prompt
        pl, al, lp = med[f"plain_{part}"], med[f"all_{part}"], med[f"last_prompt_{lp_part}"]
        print(f"| {name} | {1e3 * pl:.1f} | {1e3 * al:.1f} | {1e3 * lp:.1f} | {al / lp:.2f} | {al / pl:.2f} | "
              f"{lp / pl:.2f} |")
    print(f"\nload average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    if args.out:
        from kblampp.store_io import write_json_atomic

        write_json_atomic(Path(args.out), {
            "argv": sys.argv, "batch": len(records), "prompt_tokens": int(ids.shape[1]), "shared_prefix": n,
            "gen_tokens": args.gen_tokens, "repeats": args.repeats, "threads": torch.get_num_threads(),
            "inject_layers": list(model.inject_layers), "n_facts": ec.store.n, "retrieval": args.retrieval,
            "load_before": load_before, "load_after": load_after, "seconds": times, "median_s": med})
    return 0


if __name__ == "__main__":
    from kblampp.cli import run_main

    raise SystemExit(run_main(main))
