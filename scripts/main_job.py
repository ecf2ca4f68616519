"""The main job on the embedded default, as a readable sequence of steps (later steps append here).

    python scripts/main_job.py [--config configs/embedded_default.yaml] [--num_worlds 5 --persons 80]

Steps: synthetic worlds -> sanity check -> QA splits -> sanity check -> training-only worlds for the
retrieval phase (not in the KB) -> K/V encode (store) -> faiss
index -> Stage A (retrieval, copy gate, value warm-up, end to end) -> evaluation table (every row on the
whole test split: lookup, lookup_chain, the LLM baselines, KBLaM++ and its ablations; KB-edit check) -> evidence JSON -> alpha plots and training curves.
Each step calls the `kblampp` package (no subprocesses) and prints what it wrote, sizes and times.
`--until STEP` stops after a step; a rerun resumes Stage A from its last checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kblampp.config import KBConfig, add_config_args, config_from_args  # noqa: E402
from kblampp.sanity import run_check  # noqa: E402
from kblampp.synth.pipeline import make_extra_world_files, make_qa_files, make_world_file  # noqa: E402
from kblampp.synth.world import WorldSizes  # noqa: E402


@dataclass
class Job:
    """What the steps share: the config, the CLI arguments and the files written so far."""

    cfg: KBConfig
    args: argparse.Namespace
    files: dict[str, Path] = field(default_factory=dict)
    cache_eval: object = None  # the loaded evaluation context, shared by eval and evidence
    timings: dict[str, float] = field(default_factory=dict)


def qa_location(cfg: KBConfig) -> tuple[Path, str]:
    """QA folder and prefix from the config's train_dataset (`<dir>/<prefix>_train.jsonl`)."""
    train = Path(cfg.train_dataset)
    if not train.name.endswith("_train.jsonl"):
        raise SystemExit(f"train_dataset {cfg.train_dataset!r} must be named <prefix>_train.jsonl")
    return train.parent, train.name[: -len("_train.jsonl")]


def step_world(job: Job) -> None:
    a = job.args
    sizes = WorldSizes(persons=a.persons, organisations=a.organisations)
    report = make_world_file(ROOT / job.cfg.tuples_path, a.seed, a.num_worlds, sizes)
    print("\n".join(report.lines()))
    job.files["facts"] = report.paths["facts"]


def step_check_world(job: Job) -> None:
    result = run_check(job.files["facts"], "5tuple")
    if result.problems:
        raise SystemExit("\n".join(result.lines()))
    print(result.summary)


def step_qa(job: Job) -> None:
    out_dir, prefix = qa_location(job.cfg)
    a = job.args
    report = make_qa_files(job.files["facts"], ROOT / out_dir, prefix, seed=a.seed, dev_worlds=a.dev_worlds,
                           test_worlds=a.test_worlds, train_variants=a.train_variants)
    print("\n".join(report.lines()))
    job.files.update({f"qa_{split}": path for split, path in report.paths.items()})


def step_check_qa(job: Job) -> None:
    for key in ("qa_train", "qa_dev", "qa_test"):
        result = run_check(job.files[key], "qa", facts=str(job.files["facts"]))
        if result.problems:
            raise SystemExit("\n".join(result.lines()[:50]))
        print(result.summary)


def step_extra_worlds(job: Job) -> None:
    """Training-only worlds for the retrieval phase (`stage_a.retrieval_extra_facts`), kept out of the KB."""
    sa, a = job.cfg.stage_a, job.args
    if sa.retrieval_extra_facts is None or a.extra_facts <= 0:
        sa.retrieval_extra_facts = sa.retrieval_extra_qa = None  # Stage A trains on the KB's worlds only
        print("no training-only worlds (--extra_facts 0 or none named in the config)")
        return
    if sa.retrieval_extra_qa is None:
        raise SystemExit("stage_a.retrieval_extra_facts is set but stage_a.retrieval_extra_qa is not: give both")
    report = make_extra_world_files(job.files["facts"], ROOT / sa.retrieval_extra_facts, ROOT / sa.retrieval_extra_qa,
                                    a.extra_facts, a.extra_seed, train_variants=a.train_variants)
    print("\n".join(report.lines()))
    facts, qa = report.paths["facts"], report.paths["qa"]
    for path, kind, options in ((facts, "5tuple", {}), (qa, "qa", {"facts": str(facts)})):
        result = run_check(path, kind, **options)
        if result.problems:
            raise SystemExit("\n".join(result.lines()[:50]))
        print(result.summary)
    job.files.update(extra_facts=facts, extra_qa=qa)


def step_encode(job: Job) -> None:
    from kblampp.kb_store import encode_file

    cfg = job.cfg
    report = encode_file(ROOT / cfg.tuples_path, ROOT / cfg.store_dir, cfg.embedding_model, cfg.d_k, cfg.d_v,
                         d_tau=cfg.d_tau, d_ctx=cfg.d_ctx, seed=cfg.seed)
    print(f"encoded {report['n']} facts in {report['total_s']:.1f} s -> {cfg.store_dir}")
    job.files["store"] = ROOT / cfg.store_dir


def step_index(job: Job) -> None:
    from kblampp.kb_store import build_store_index
    from kblampp.knowledge_index import config_params

    ix = job.cfg.index
    report = build_store_index(ROOT / job.cfg.store_dir, ix.method, ix.similarity, **config_params(ix))
    print(f"{ix.method} index over {report['ntotal']} keys in {report['build_s']:.1f} s -> {report['path']}")


def step_stage_a(job: Job) -> None:
    from kblampp.training.stage_a import StageA, load_inputs

    stage = StageA(load_inputs(job.cfg), job.cfg.output_dir)
    results = stage.run(resume=True)
    retrieval = results.get("retrieval_final") or results.get("retrieval") or {}
    for split, scores in retrieval.items():  # train / dev (held-out world) retrieval at the last prompt token
        if isinstance(scores, dict):
            shown = {k: round(v, 3) for k, v in scores.items() if k in ("top1", "recall@8", "single-hop/recall@8",
                                                                        "single-hop/top_alpha_precision")}
            print(f"retrieval {split}: {shown}")
    job.files["run"] = ROOT / job.cfg.output_dir


def _eval_context(job: Job):
    from kblampp.evaluation.runner import load_eval_context
    from kblampp.inference.loading import resolve_checkpoint

    if job.cache_eval is None:
        job.files["checkpoint"] = resolve_checkpoint(ROOT / job.cfg.output_dir)
        # evaluation retrieves through the faiss index (SPEC section 6); training used exact top-k
        job.cache_eval = load_eval_context(dataclasses.replace(job.cfg, retrieval="faiss"), job.files["checkpoint"])
    return job.cache_eval


def step_eval(job: Job) -> None:
    from kblampp.evaluation.runner import evaluate

    out_dir = ROOT / job.cfg.output_dir / "eval"
    qa = ROOT / (job.cfg.test_dataset or job.cfg.eval_dataset)
    # batches of up to 64 questions and 5,120 padded prompt tokens: the KB and backbone rows (~70-token
    # prompts) get 64 questions a batch (fewer decode steps over the whole split), RAG (~300 tokens) ~16
    evaluate(_eval_context(job), qa, out_dir, max_questions=job.args.eval_questions, kb_edit_n=job.args.kb_edit,
             batch_size=64, batch_tokens=5120)
    print((out_dir / "results.md").read_text(encoding="utf-8"))
    job.files["results"] = out_dir / "results.md"


def step_evidence(job: Job) -> None:
    from kblampp.evaluation.evidence import write_evidence
    from kblampp.evaluation.runner import collect_evidence, select_questions
    from kblampp.schema import load_qa

    ec = _eval_context(job)
    qa = ROOT / (job.cfg.test_dataset or job.cfg.eval_dataset)
    records = select_questions(load_qa(qa, num_facts=len(ec.facts)), job.args.evidence_questions, None, None, 0)
    out = ROOT / job.cfg.output_dir / "eval" / "evidence.json"
    write_evidence(out, collect_evidence(ec, records))
    print(f"wrote {len(records)} evidence entries to {out}")
    job.files["evidence"] = out


def step_plots(job: Job) -> None:
    from kblampp.evaluation.evidence import read_evidence
    from kblampp.evaluation.plots import plot_evidence, plot_training_curves, read_metrics_jsonl

    out_dir = ROOT / job.cfg.output_dir / "plots"
    written = plot_evidence(read_evidence(job.files["evidence"]), out_dir)
    written += plot_training_curves(read_metrics_jsonl(ROOT / job.cfg.output_dir / "metrics.jsonl"), out_dir)
    print(f"wrote {len(written)} PNG files to {out_dir}")
    job.files["plots"] = out_dir


STEPS = [("world", step_world), ("check_world", step_check_world), ("qa", step_qa), ("check_qa", step_check_qa),
         ("extra_worlds", step_extra_worlds), ("encode", step_encode), ("index", step_index),
         ("stage_a", step_stage_a), ("eval", step_eval), ("evidence", step_evidence), ("plots", step_plots)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, required=False)
    p.set_defaults(config=str(ROOT / "configs/embedded_default.yaml"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_worlds", type=int, default=5)
    p.add_argument("--persons", type=int, default=80, help="persons per world")
    p.add_argument("--organisations", type=int, default=10, help="organisations per world")
    p.add_argument("--dev_worlds", type=int, default=1)
    p.add_argument("--test_worlds", type=int, default=1)
    p.add_argument("--train_variants", type=int, default=1, help="training phrasings per question")
    p.add_argument("--extra_facts", type=int, default=20000,
                   help="facts of training-only worlds for the retrieval phase, not in the KB (0 = none)")
    p.add_argument("--extra_seed", type=int, default=3,
                   help="their world seed (the size benchmark draws its distractors with 1 and 2)")
    p.add_argument("--eval_questions", type=int, default=0, help="test questions in the table (0 = the whole test split)")
    p.add_argument("--kb_edit", type=int, default=50, help="facts edited in the KB-edit check (0 = off)")
    p.add_argument("--evidence_questions", type=int, default=12, help="questions in evidence.json")
    p.add_argument("--until", choices=[name for name, _ in STEPS], help="stop after this step")
    return p.parse_args(argv)


def run_steps(job: Job, steps: list) -> int:
    """Run `steps` in order (until `job.args.until`), timing each; print what was written."""
    print(f"config: {job.args.config} (backbone {job.cfg.backbone}, embedding {job.cfg.embedding_model})")
    for name, step in steps:
        print(f"== {name}")
        t0 = time.perf_counter()
        step(job)
        job.timings[name] = time.perf_counter() - t0
        if name == job.args.until:
            break
    print("== done: " + ", ".join(f"{k} {v:.1f}s" for k, v in job.timings.items()))
    for key, path in job.files.items():
        print(f"  {key}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_steps(Job(config_from_args(args), args), STEPS)


if __name__ == "__main__":
    from kblampp.cli import run_main
    raise SystemExit(run_main(main))
