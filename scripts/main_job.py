"""The main job on the embedded default, as a readable sequence of steps (later steps append here).

    python scripts/main_job.py [--config configs/embedded_default.yaml] [--num_worlds 5 --persons 80]

Now: synthetic world -> sanity check -> QA splits -> sanity check (indices against the world file).
Each step calls the `kblampp` package (no subprocesses) and prints what it wrote, sizes and times.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kblampp.config import KBConfig, add_config_args, config_from_args  # noqa: E402
from kblampp.sanity import run_check  # noqa: E402
from kblampp.synth.pipeline import make_qa_files, make_world_file  # noqa: E402
from kblampp.synth.world import WorldSizes  # noqa: E402


@dataclass
class Job:
    """What the steps share: the config, the CLI arguments and the files written so far."""

    cfg: KBConfig
    args: argparse.Namespace
    files: dict[str, Path] = field(default_factory=dict)
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


STEPS = [("world", step_world), ("check world", step_check_world), ("qa", step_qa), ("check qa", step_check_qa)]


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
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    job = Job(config_from_args(args), args)
    print(f"config: {args.config} (backbone {job.cfg.backbone}, embedding {job.cfg.embedding_model})")
    for name, step in STEPS:
        print(f"== {name}")
        t0 = time.perf_counter()
        step(job)
        job.timings[name] = time.perf_counter() - t0
    print("== done: " + ", ".join(f"{k} {v:.1f}s" for k, v in job.timings.items()))
    for key, path in job.files.items():
        print(f"  {key}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
