"""HotpotQA end to end on a file given on the command line, with the main job's encode/index/train steps.

    python scripts/hotpot_job.py HOTPOT.json [--config configs/hotpot.yaml] [--set key=value ...]

Steps: build (answer-blind facts, QA with `answerable`) -> split by qid (seeded) -> sanity checks ->
K/V encode -> index -> Stage A (answerable training questions) -> evaluation of the test split, the
answerable and the non-answerable questions in separate tables (eval/answerable, eval/not_answerable).
On non-answerable questions the KB holds no fact whose tail is the answer: EM there is what the
model gets right without the KB's answer; they are the questions an abstaining model should refuse.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import main_job  # noqa: E402
from kblampp.builders.common import finish  # noqa: E402
from kblampp.builders.hotpot import build_hotpot, reachability  # noqa: E402
from kblampp.config import add_config_args, config_from_args  # noqa: E402
from kblampp.sanity import run_check  # noqa: E402
from kblampp.synth.jsonl import write_jsonl  # noqa: E402

SPLITS = ("train", "dev", "test")


def step_build(job: main_job.Job) -> None:
    result = build_hotpot(job.args.inputs, max_samples=job.args.max_samples)
    job.files["facts"], job.files["qa_all"] = ROOT / job.cfg.tuples_path, _qa_path(job, "all")
    if finish(result, job.files["facts"], job.files["qa_all"], strict=False, stream=sys.stdout) != 0:
        raise SystemExit("build failed")
    print(json.dumps(reachability(result)))


def _qa_path(job: main_job.Job, split: str) -> Path:
    out_dir, prefix = main_job.qa_location(job.cfg)
    return ROOT / out_dir / f"{prefix}_{split}.jsonl"


def split_questions(records: list[dict], dev_fraction: float, test_fraction: float, seed: int) -> dict[str, list[dict]]:
    """Seeded split by question; train/dev keep the answerable questions only (training and the dev
    retrieval metrics need the answer's fact), test keeps every question."""
    order = np.random.default_rng(seed).permutation(len(records))
    n_test, n_dev = round(test_fraction * len(records)), round(dev_fraction * len(records))
    parts = {"test": order[:n_test], "dev": order[n_test:n_test + n_dev], "train": order[n_test + n_dev:]}
    out = {name: [records[i] for i in sorted(idx)] for name, idx in parts.items()}
    for name in ("train", "dev"):
        out[name] = [r for r in out[name] if r.get("answerable", True)]
    out["test_answerable"] = [r for r in out["test"] if r.get("answerable", True)]
    out["test_not_answerable"] = [r for r in out["test"] if not r.get("answerable", True)]
    return out


def step_split(job: main_job.Job) -> None:
    records = [json.loads(line) for line in job.files["qa_all"].read_text(encoding="utf-8").splitlines() if line.strip()]
    parts = split_questions(records, job.args.dev_fraction, job.args.test_fraction, job.cfg.seed)
    if not parts["train"]:
        raise SystemExit("no answerable training question: use a larger HotpotQA file or a smaller --test_fraction")
    for name, rows in parts.items():
        job.files[f"qa_{name}"] = _qa_path(job, name)
        write_jsonl(job.files[f"qa_{name}"], rows)
        print(f"{name}: {len(rows)} questions -> {job.files[f'qa_{name}']}")


def step_check(job: main_job.Job) -> None:
    for key, kind in [("facts", "5tuple")] + [(f"qa_{s}", "qa") for s in SPLITS]:
        options = {} if kind == "5tuple" else {"facts": str(job.files["facts"])}
        result = run_check(job.files[key], kind, **options)
        if result.problems:
            raise SystemExit("\n".join(result.lines()[:50]))
        print(result.summary)


def step_eval(job: main_job.Job) -> None:
    from kblampp.evaluation.runner import DEFAULT_ROWS, evaluate

    for part in ("answerable", "not_answerable"):
        qa = job.files[f"qa_test_{part}"]
        if not qa.read_text(encoding="utf-8").strip():
            print(f"== eval {part}: no test questions")
            continue
        out_dir = ROOT / job.cfg.output_dir / "eval" / part
        rows = job.args.rows.split(",") if job.args.rows else DEFAULT_ROWS
        evaluate(main_job._eval_context(job), qa, out_dir, rows=rows, max_questions=job.args.eval_questions,
                 kb_edit_n=job.args.kb_edit if part == "answerable" else 0, batch_size=16)
        print(f"== eval {part} ({qa})")
        print((out_dir / "results.md").read_text(encoding="utf-8"))
        job.files[f"results_{part}"] = out_dir / "results.md"


STEPS = [("build", step_build), ("split", step_split), ("check", step_check), ("encode", main_job.step_encode),
         ("index", main_job.step_index), ("stage_a", main_job.step_stage_a), ("eval", step_eval)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="HotpotQA JSON / JSON Lines files (.gz allowed)")
    add_config_args(p, required=False)
    p.set_defaults(config=str(ROOT / "configs/hotpot.yaml"))
    p.add_argument("--max_samples", type=int, default=None, help="read at most this many HotpotQA records")
    p.add_argument("--dev_fraction", type=float, default=0.1)
    p.add_argument("--test_fraction", type=float, default=0.3)
    p.add_argument("--eval_questions", type=int, default=0, help="test questions per table (0 = all)")
    p.add_argument("--rows", default="", help="comma-separated evaluation rows (default: every default row)")
    p.add_argument("--kb_edit", type=int, default=0, help="facts edited in the KB-edit check (0 = off)")
    p.add_argument("--until", choices=[name for name, _ in STEPS], help="stop after this step")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return main_job.run_steps(main_job.Job(config_from_args(args), args), STEPS)


if __name__ == "__main__":
    from kblampp.cli import run_main
    raise SystemExit(run_main(main))
