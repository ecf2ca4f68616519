"""The TimeQA table in one command (issue 13), reusing the main job's steps.

    python scripts/timeqa_job.py [--config configs/timeqa.yaml] [--timeqa_dir ../shared/data/real]

Steps: synthetic worlds + QA and the synthetic-only Stage A run (the main job's; reused when
`runs/main/kb_final.safetensors` exists) -> TimeQA KB from the pages (windows inferred from the text)
+ window report -> split by page, files merged with the synthetic ones -> the KB encoded with the
synthetic-only run's K/V encoder, and for the new run -> Stage A on synthetic + TimeQA training
questions, the training pages' unanswerable ones among them (its decision learns them from the start;
threshold on the dev pages' questions with theirs) -> KB rows of both runs, then the baselines -> the
run and `lookup` on each level with its unanswerable questions -> the table (official EM). Every
evaluation runs on the held-out pages, easy and hard apart, on the same questions.
`--until STEP` stops after a step; reruns resume Stage A and skip evaluations already written.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import main_job  # noqa: E402
from kblampp.config import add_config_args, config_from_args, load_config  # noqa: E402
from kblampp.sanity import run_check  # noqa: E402

BASELINE_ROWS = ("backbone", "rag", "oracle_context")
BUILT_FACTS, BUILT_QA = "data/5tuple/timeqa_pages.jsonl", "data/qa/timeqa_pages.jsonl"  # the build step's output
LEVELS = ("easy", "hard")


@dataclasses.dataclass
class TimeQAJob:
    """The TimeQA run (`cfg`) beside the synthetic-only main run (`main`), and their files."""

    cfg: object
    main: main_job.Job
    args: argparse.Namespace
    files: dict[str, Path] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    def as_main_job(self) -> main_job.Job:
        """The TimeQA config wrapped as a main-job Job, so its encode / index / Stage A steps apply."""
        job = main_job.Job(self.cfg, self.main.args)
        job.files = dict(self.files)
        return job


def step_synthetic(job: TimeQAJob) -> None:
    """The synthetic worlds, QA and synthetic-only Stage A run: the main job's own steps (skipped when done)."""
    m = job.main
    facts = ROOT / m.cfg.tuples_path
    qa_dir, prefix = main_job.qa_location(m.cfg)
    if facts.is_file() and (ROOT / qa_dir / f"{prefix}_train.jsonl").is_file():
        m.files["facts"] = facts
        print(f"reusing {facts} and {qa_dir}/{prefix}_*.jsonl")
    else:
        for step in (main_job.step_world, main_job.step_check_world, main_job.step_qa, main_job.step_check_qa):
            step(m)
    if _trained(m.cfg):
        print(f"reusing the synthetic-only run {m.cfg.output_dir}")
        return
    for step in (main_job.step_encode, main_job.step_index, main_job.step_stage_a):
        step(m)


def step_build(job: TimeQAJob) -> None:
    """TimeQA pages -> facts (windows from the text) + QA (unanswerable kept), and the window report."""
    from kblampp.builders.common import finish
    from kblampp.builders.timeqa import build_timeqa, load_timeqa_relations
    from kblampp.builders.timeqa_split import report_lines, window_report

    src = Path(job.args.timeqa_dir)
    inputs = [src / name for name in job.args.timeqa_files]
    labels = load_timeqa_relations(src / "timeqa_relations.json") if (src / "timeqa_relations.json").is_file() else None
    result = build_timeqa(inputs, relation_labels=labels, keep_unanswerable=True)
    facts, qa = ROOT / BUILT_FACTS, ROOT / BUILT_QA
    if finish(result, facts, qa, strict=True, stream=sys.stdout) != 0:
        raise SystemExit("TimeQA build failed")
    report = "\n".join(report_lines(window_report(result.facts, result.qa)))
    out = ROOT / job.cfg.output_dir / "window_report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report + "\n", encoding="utf-8")
    print(report)
    job.files.update(timeqa_facts=facts, timeqa_qa=qa, window_report=out)


def step_split(job: TimeQAJob) -> None:
    """Split by page and merge with the synthetic facts / training QA; check every file written."""
    from kblampp.builders.timeqa_split import write_split_files

    qa_dir, prefix = main_job.qa_location(job.cfg)
    m_dir, m_prefix = main_job.qa_location(job.main.cfg)
    for name, built in (("timeqa_facts", BUILT_FACTS), ("timeqa_qa", BUILT_QA)):  # `--steps split` alone
        job.files.setdefault(name, ROOT / built)
    fractions = tuple(float(x) for x in job.args.split.split(","))
    written = write_split_files(job.files["timeqa_facts"], job.files["timeqa_qa"], ROOT / job.cfg.tuples_path,
                                ROOT / qa_dir, prefix, base_facts=ROOT / job.main.cfg.tuples_path,
                                base_train=ROOT / m_dir / f"{m_prefix}_train.jsonl", fractions=fractions,
                                seed=job.args.seed)
    print("\n".join(written.lines()))
    print(", ".join(f"{k} {v}" for k, v in written.counts.items() if k.startswith("pages")))
    for name, path in written.paths.items():
        kind = "5tuple" if name == "facts" else "qa"
        result = run_check(path, kind, **({} if kind == "5tuple" else {"facts": str(written.paths["facts"])}))
        if result.problems:
            raise SystemExit("\n".join(result.lines()[:50]))
    job.files.update({f"qa_{k}": v for k, v in written.paths.items() if k != "facts"}, facts=written.paths["facts"])
    write_with_unanswerable(ROOT / qa_dir / prefix)


def write_with_unanswerable(base: Path) -> None:
    """Stage A's files keep the unanswerable questions, so the run's decision learns real ones from
    the start: `<prefix>_train` gets the training pages' and `<prefix>_dev` the dev pages' (easy; its
    answerable questions alone stay in `<prefix>_dev_answerable`, for the rows that never abstain).
    Each test level gets its own in `<prefix>_test_<level>_with_unanswerable` (step `abstention`)."""
    from kblampp.builders.timeqa_split import merge_unanswerable

    Path(f"{base}_dev.jsonl").replace(f"{base}_dev_answerable.jsonl")
    merge_unanswerable([f"{base}_train.jsonl"], f"{base}_train_unanswerable.jsonl", f"{base}_train.jsonl")
    merge_unanswerable([f"{base}_dev_answerable.jsonl"], f"{base}_dev_unanswerable.jsonl", f"{base}_dev.jsonl",
                       level="easy")
    for level in LEVELS:
        merge_unanswerable([f"{base}_test_{level}.jsonl"], f"{base}_test_unanswerable.jsonl",
                           f"{base}_test_{level}_with_unanswerable.jsonl", level=level)


def step_encode(job: TimeQAJob) -> None:
    """Encode + index the TimeQA run's store; the sentence embeddings of the synthetic-only store (same
    facts, same embedding model) are reused, so only the freshly initialised K/V MLPs run."""
    from kblampp.kb_store import encode_file
    from kblampp.kv_encoder import KVEncoder, save_kv_encoder
    from kblampp.store_io import sha256_file

    cfg, other = job.cfg, ROOT / synth_only_cfg(job).store_dir
    target = ROOT / cfg.store_dir
    if _trained(cfg) and (target / "manifest.json").is_file():
        print(f"reusing {cfg.store_dir} (encoded by the finished Stage A run {cfg.output_dir})")
        return
    manifest = other / "manifest.json"
    if not manifest.is_file() or (json.loads(manifest.read_text()).get("source") or {}).get("sha256") != \
            sha256_file(ROOT / cfg.tuples_path):
        mj = job.as_main_job()
        main_job.step_encode(mj)
        main_job.step_index(mj)
        return
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(other, target)
    dim = json.loads(manifest.read_text())["d_ctx"]
    init = ROOT / cfg.output_dir / "kv_encoder_init.safetensors"
    init.parent.mkdir(parents=True, exist_ok=True)
    save_kv_encoder(KVEncoder(dim, cfg.d_k, cfg.d_v, cfg.d_tau, seed=cfg.seed), init)
    report = encode_file(ROOT / cfg.tuples_path, target, cfg.embedding_model, cfg.d_k, cfg.d_v, d_tau=cfg.d_tau,
                         d_ctx=cfg.d_ctx, seed=cfg.seed, kv_encoder=init)
    print(f"encoded {report['n']} facts (sentence embeddings reused: {report['reused_raw']}) -> {cfg.store_dir}")
    main_job.step_index(job.as_main_job())


def _trained(cfg) -> bool:
    return (ROOT / cfg.output_dir / "kb_final.safetensors").is_file()


def step_stage_a(job: TimeQAJob) -> None:
    if _trained(job.cfg) and not job.args.retrain:
        print(f"reusing the finished Stage A run {job.cfg.output_dir} (--retrain to resume it anyway)")
        return
    main_job.step_stage_a(job.as_main_job())


def synth_only_cfg(job: TimeQAJob):
    """The synthetic-only run evaluated on the TimeQA KB: its own checkpoint, the KB in its own store."""
    qa_dir, prefix = main_job.qa_location(job.cfg)
    return dataclasses.replace(job.cfg, store_dir=job.cfg.store_dir + "_synthonly", output_dir=job.main.cfg.output_dir,
                               train_dataset=job.main.cfg.train_dataset,
                               eval_dataset=f"{qa_dir}/{prefix}_dev_answerable.jsonl")


def step_encode_synth_only(job: TimeQAJob) -> None:
    """The same TimeQA KB encoded with the synthetic-only run's trained K/V encoder (+ its index)."""
    from kblampp.kb_store import encode_file

    cfg = synth_only_cfg(job)
    report = encode_file(ROOT / cfg.tuples_path, ROOT / cfg.store_dir, cfg.embedding_model, cfg.d_k, cfg.d_v,
                         d_tau=cfg.d_tau, d_ctx=cfg.d_ctx, seed=cfg.seed,
                         kv_encoder=ROOT / cfg.output_dir / "kv_encoder.safetensors")
    print(f"encoded {report['n']} facts with {cfg.output_dir}/kv_encoder.safetensors -> {cfg.store_dir}")
    main_job.step_index(main_job.Job(cfg, job.main.args))


def _evaluate(cfg, name: str, rows: tuple[str, ...], job: TimeQAJob, test_name: str = "test_{level}") -> None:
    """`rows` of the run `cfg` on the test questions of each level (`<prefix>_<test_name>.jsonl`)
    -> <output_dir>/eval/<name>_<level>/."""
    from kblampp.evaluation.runner import evaluate, load_eval_context
    from kblampp.inference.loading import resolve_checkpoint

    ec = None
    qa_dir, prefix = main_job.qa_location(job.cfg)
    for level in LEVELS:
        out = ROOT / job.cfg.output_dir / "eval" / f"{name}_{level}"
        if (out / "results.json").is_file() and not job.args.reevaluate:
            print(f"reusing {out}")
            continue
        if ec is None:
            ec = load_eval_context(dataclasses.replace(cfg, retrieval="faiss"), resolve_checkpoint(ROOT / cfg.output_dir))
        evaluate(ec, ROOT / qa_dir / f"{prefix}_{test_name.format(level=level)}.jsonl", out, rows=rows,
                 max_questions=job.args.eval_questions, batch_size=16)
        print((out / "results.md").read_text(encoding="utf-8"))


def step_eval(job: TimeQAJob) -> None:
    """The synthetic + TimeQA run's KB rows, one row at a time (each written as soon as it is done)."""
    _evaluate(job.cfg, "synth_timeqa", ("kblampp",), job)
    _evaluate(job.cfg, "synth_timeqa_eta0", ("kblampp_eta0",), job)


def step_eval_synth_only(job: TimeQAJob) -> None:
    """The synthetic-only run's KB rows on the same questions and facts."""
    _evaluate(synth_only_cfg(job), "synth_only", ("kblampp",), job)
    _evaluate(synth_only_cfg(job), "synth_only_eta0", ("kblampp_eta0",), job)


def step_eval_lookup(job: TimeQAJob) -> None:
    """`lookup`: top-1 fact by embedding similarity with the parsed time filter, its tail copied (no LLM;
    the same facts in either store, so it is loaded with the synthetic-only run, which exists first)."""
    _evaluate(synth_only_cfg(job), "lookup", ("lookup",), job)


def step_eval_baselines(job: TimeQAJob) -> None:
    """Backbone, RAG and oracle context (no KB module; same questions, facts and prompt)."""
    _evaluate(job.cfg, "baselines", BASELINE_ROWS, job)


def step_abstention(job: TimeQAJob) -> None:
    """Unanswerable TimeQA questions (the builder's `targets [""]`): `lookup` (its similarity floor tuned on
    the dev file with the dev pages' unanswerable questions, the file Stage A set its threshold on) and
    KBLaM++ (the decision Stage A trained on the training pages' unanswerable questions) on each test
    level with that level's unanswerable questions."""
    _evaluate(job.cfg, "abstain", ("lookup", "kblampp", "kblampp_no_abstention"), job,
              test_name="test_{level}_with_unanswerable")


def step_table(job: TimeQAJob) -> None:
    from kblampp.builders.timeqa_table import abstention_table, timeqa_table

    eval_dir = ROOT / job.cfg.output_dir / "eval"
    text = timeqa_table(eval_dir, LEVELS,
                        [("lookup", "–"), ("baselines", "–"), ("synth_timeqa", "synthetic + TimeQA"),
                         ("synth_timeqa_eta0", "synthetic + TimeQA"), ("synth_only", "synthetic only"),
                         ("synth_only_eta0", "synthetic only")])
    if any((eval_dir / f"abstain_{lv}" / "results.json").is_file() for lv in LEVELS):
        text += "\n\n" + abstention_table(eval_dir, LEVELS, "abstain")
    out = ROOT / job.cfg.output_dir / "timeqa_table.md"
    out.write_text(text + "\n", encoding="utf-8")
    print(text)
    job.files["table"] = out


STEPS = [("synthetic", step_synthetic), ("build", step_build), ("split", step_split),
         ("encode_synth_only", step_encode_synth_only), ("encode", step_encode), ("stage_a", step_stage_a),
         ("eval", step_eval), ("eval_lookup", step_eval_lookup), ("eval_synth_only", step_eval_synth_only),
         ("eval_baselines", step_eval_baselines), ("abstention", step_abstention),
         ("table", step_table)]


def _shared_real() -> Path:
    """`../shared/data/real` beside the checkout (or beside its parent folder, for worktrees)."""
    for base in (ROOT.parent, ROOT.parent.parent):
        if (base / "shared/data/real").is_dir():
            return base / "shared/data/real"
    return ROOT.parent / "shared/data/real"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, required=False)
    p.set_defaults(config=str(ROOT / "configs/timeqa.yaml"))
    p.add_argument("--main_config", default=str(ROOT / "configs/embedded_default.yaml"),
                   help="config of the synthetic-only run (the main job's)")
    p.add_argument("--timeqa_dir", default=str(_shared_real()),
                   help="folder with the TimeQA files and timeqa_relations.json (default ../shared/data/real)")
    p.add_argument("--timeqa_files", nargs="+",
                   default=["timeqa_human_train.easy.jsonl.gz", "timeqa_human_train.hard.jsonl.gz"])
    p.add_argument("--split", default="0.7,0.1,0.2", help="train,dev,test shares of the pages")
    p.add_argument("--seed", type=int, default=0, help="page split seed")
    p.add_argument("--eval_questions", type=int, default=0, help="test questions per level (0 = all)")
    p.add_argument("--reevaluate", action="store_true", help="rerun evaluations already written")
    p.add_argument("--retrain", action="store_true", help="run the Stage A step even when the run has finished")
    p.add_argument("--until", choices=[name for name, _ in STEPS], help="stop after this step")
    p.add_argument("--steps", nargs="+", choices=[name for name, _ in STEPS], help="run only these steps (in order)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    main_args = main_job.parse_args(["--config", args.main_config])
    job = TimeQAJob(config_from_args(args), main_job.Job(load_config(args.main_config), main_args), args)
    print(f"config: {args.config}; synthetic-only run: {job.main.cfg.output_dir}")
    t_all = time.perf_counter()
    for name, step in STEPS:
        if args.steps and name not in args.steps:
            continue
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        step(job)
        job.timings[name] = time.perf_counter() - t0
        if name == args.until:
            break
    print("== done: " + ", ".join(f"{k} {v:.1f}s" for k, v in job.timings.items())
          + f"; total {time.perf_counter() - t_all:.1f}s")
    (ROOT / job.cfg.output_dir).mkdir(parents=True, exist_ok=True)
    (ROOT / job.cfg.output_dir / "timeqa_job_timings.json").write_text(json.dumps(job.timings, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    from kblampp.cli import run_main
    raise SystemExit(run_main(main))
