"""One error path for every script (kblampp.cli): a known error is `error: <message>` on one line of
stderr and exit 2; an unexpected one keeps its traceback.

The four findings of the issue run as real subprocesses; the other script families run their
`main` through `run_main` in-process (exactly what their `__main__` block does), to stay fast."""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kblampp import cli
from kblampp.cli import KNOWN_ERRORS, error_line, is_known, run_main
from kblampp.schema import load_facts
from doc_commands import scripts_with_main

ROOT = Path(__file__).resolve().parents[1]
GOOD_FACT = (ROOT / "tests/fixtures/good_5tuple.jsonl").read_text(encoding="utf-8").splitlines()[0]


def script_main(rel: str):
    spec = importlib.util.spec_from_file_location(f"script_{Path(rel).stem}", ROOT / rel)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in a script look their module up
    spec.loader.exec_module(module)
    return module.main


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(cli.TRACEBACK_ENV, None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def one_line(proc_or_err: str) -> str:
    lines = proc_or_err.splitlines()
    assert len(lines) == 1, proc_or_err
    return lines[0]


def bad_tuples(tmp_path: Path) -> Path:
    """Line 2's time window ends before it starts (the issue's inverted_time_line2.jsonl)."""
    fact = json.loads(GOOD_FACT)
    fact["time_window"] = {"start": "2015", "end": "2010", "source": "text"}
    path = tmp_path / "inverted_time_line2.jsonl"
    path.write_text(GOOD_FACT + "\n" + json.dumps(fact) + "\n", encoding="utf-8")
    return path


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# ---- the four findings, as real processes ------------------------------------------------

def test_bad_5tuple_file_to_encode_kv(tmp_path):
    tuples = bad_tuples(tmp_path)
    proc = run_script(str(ROOT / "offline/encode_kv.py"), "--tuples", str(tuples), "--store_dir", "s", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert one_line(proc.stderr) == (f"error: {tuples}:2: time_window.end: window ends (2010) before it starts (2015)")
    assert not (tmp_path / "s").exists()


def test_unknown_config_key_to_training(tmp_path):
    cfg = config_file(tmp_path, "d_k: 8\nbogus_key: 1\n")
    proc = run_script(str(ROOT / "train/train_stageA.py"), "--config", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert line.startswith(f"error: {cfg}: unknown key 'bogus_key' (known: K_pool, K_top, ") and ", backbone, " in line


def test_missing_checkpoint_to_evaluation(tmp_path):
    proc = run_script(str(ROOT / "eval/eval_qa.py"), "--config", str(ROOT / "configs/embedded_default.yaml"),
                      "--checkpoint", "runs/none/kb_final.safetensors", cwd=tmp_path)
    assert proc.returncode == 2
    assert one_line(proc.stderr) == "error: runs/none/kb_final.safetensors: checkpoint not found"


def test_build_index_without_arguments(tmp_path):
    proc = run_script(str(ROOT / "offline/build_index.py"), cwd=tmp_path)
    assert proc.returncode == 2
    assert one_line(proc.stderr) == "error: store/default: store folder not found (run offline/encode_kv.py)"


# ---- every family through run_main ---------------------------------------------------------------

def test_every_script_exits_through_run_main():
    for path in scripts_with_main():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        block = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
        assert len(block) == 1 and "run_main(main)" in ast.unparse(block[0]), path


def check(capsys, rel: str, argv: list[str], expected: str, prefix: bool = False) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", [str(ROOT / rel), *argv])  # argparse names the script as when run
        code = run_main(script_main(rel), argv)
    err = capsys.readouterr().err.strip()
    line = one_line(err)
    assert code == 2, err
    assert line.startswith(expected) if prefix else line == expected


def test_offline_family(capsys, tmp_path):
    check(capsys, "offline/build_index.py", ["--method", "nope"],
          "error: build_index.py: argument --method: invalid choice: 'nope' (choose from 'hnsw', 'ivfflat', 'ivfpq', 'flat', 'milvus') "
          "(see build_index.py --help)")
    check(capsys, "offline/gen_synth_qa.py", ["--world", str(tmp_path / "none.jsonl"), "--out_dir", str(tmp_path)],
          f"error: {tmp_path / 'none.jsonl'}: No such file or directory")
    check(capsys, "offline/sanity_check_5tuple.py", [str(tmp_path / "none.jsonl")],
          f"error: {tmp_path / 'none.jsonl'}: no such file or folder")
    check(capsys, "offline/build_5tuple_from_trex.py", [str(tmp_path / "none.json"), "--out_facts",
                                                        str(tmp_path / "f.jsonl")],
          f"error: {tmp_path / 'none.json'}: input file not found")
    check(capsys, "offline/encode_kv.py", ["--kv_encoder", str(tmp_path), "--tuples", str(bad_tuples(tmp_path))],
          f"error: {tmp_path}: no kv_encoder.safetensors in this folder (give a training run folder, a store "
          "folder, a training checkpoint or an encoder file)")


def test_eval_family(capsys, tmp_path):
    cfg = str(ROOT / "configs/embedded_default.yaml")
    check(capsys, "eval/dump_evidence.py", ["--config", cfg, "--checkpoint", str(tmp_path)],
          f"error: {tmp_path}: no kb_final.safetensors in this run folder (did training finish?)")
    check(capsys, "eval/eval_qa.py", ["--config", cfg, "--checkpoint", "x", "--set", "K_top=many"],
          f"error: {cfg}: K_top: expected int, got 'many'")
    check(capsys, "eval/visualize_alpha.py", ["--evidence", str(tmp_path / "none.json"), "--out_dir", str(tmp_path)],
          f"error: {tmp_path / 'none.json'}:", prefix=True)


def test_train_family(capsys, tmp_path):
    cfg = config_file(tmp_path, "stage_b:\n  mode: lora\n")
    check(capsys, "train/train_stageB.py", ["--config", str(cfg), "--set", "stage_b.bogus=1"],
          f"error: {cfg}: stage_b: unknown key 'bogus'", prefix=True)
    check(capsys, "train/dataloader.py", ["--config", str(tmp_path / "none.yaml")],
          f"error: {tmp_path / 'none.yaml'}: config file not found")


def test_infer_family(capsys, tmp_path):
    check(capsys, "infer/infer_server.py", ["--config", str(config_file(tmp_path, "[1, 2]\n")), "--checkpoint", "x"],
          f"error: {tmp_path / 'cfg.yaml'}: expected a mapping at the top level")


def test_main_job_and_bench_families(capsys, tmp_path):
    cfg = config_file(tmp_path, "train_dataset: data/qa/questions.jsonl\n")
    check(capsys, "scripts/main_job.py", ["--config", str(cfg), "--set", "d_k=x"],
          f"error: {cfg}: d_k: expected int, got 'x'")
    check(capsys, "bench/bench_rag.py", ["--config", str(cfg), "--ks", "0"],
          "error: bench_rag.py: --ks: every k must be >= 1 (see bench_rag.py --help)")


# ---- the rules themselves ------------------------------------------------------------------------

def test_known_error_names_are_real_classes():
    for name in KNOWN_ERRORS:
        module, _, cls = name.rpartition(".")
        assert issubclass(getattr(importlib.import_module(module), cls), Exception), name


def test_schema_error_shows_the_first_problem_and_how_many_more(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text("{}\n[]\n", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        load_facts(path)
    assert is_known(info.value)
    n = len(info.value.problems)
    assert error_line(info.value) == (f"{info.value.problems[0].format(path)} (and {n - 1} more problem(s); list them "
                                      f"all with offline/sanity_check_5tuple.py {path})")


def test_file_errors_and_multi_line_messages(capsys, tmp_path):
    def missing() -> int:
        open(tmp_path / "nothing.txt", encoding="utf-8")
        return 0

    assert run_main(missing) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nothing.txt'}: No such file or directory\n"

    def exits() -> int:
        raise SystemExit("first problem\nsecond problem\nthird problem")

    assert run_main(exits) == 2
    assert capsys.readouterr().err == "error: first problem (and 2 more line(s))\n"
    assert run_main(lambda: None) == 0 and run_main(lambda: 3) == 3


def test_unexpected_errors_keep_their_traceback(capsys, monkeypatch):
    def bug() -> int:
        raise TypeError("unsupported operand")

    def library_value_error() -> int:
        return int(np.zeros(2) + np.zeros(3))  # numpy's shape error surfaces on this line: not a `raise`

    def project_check() -> int:
        raise ValueError("rows: 'x' is not one of backbone, rag")

    with pytest.raises(TypeError):
        run_main(bug)
    with pytest.raises(ValueError, match="broadcast"):
        run_main(library_value_error)
    assert run_main(project_check) == 2
    assert capsys.readouterr().err == "error: rows: 'x' is not one of backbone, rag\n"
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
    with pytest.raises(ValueError, match="rows"):
        run_main(project_check)


def test_argparse_is_restored_after_run_main():
    def parse() -> int:
        argparse.ArgumentParser(prog="p").parse_args(["--nope"])
        return 0

    assert run_main(parse) == 2
    with pytest.raises(SystemExit):
        argparse.ArgumentParser(prog="p").parse_args(["--nope"])
