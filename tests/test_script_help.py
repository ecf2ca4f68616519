"""Every script answers `--help` (a real process each, run side by side), and every documented example
command (script docstrings, README.md, docs/*.md) uses only flags that script's parser has."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from doc_commands import ROOT, Command, commands_in, documented_commands, scripts_with_main

RUN_FILES = {"kb_final.safetensors", "kv_encoder.safetensors", "metrics.jsonl", "config.resolved.yaml",
             "stage_a_summary.json", "progress.json", "evidence.json", "results.json", "results.md",
             "predictions.jsonl", "stage_b_adapter.json", "top_layers.safetensors",
             "queries.npy"}  # what training/eval write (queries.npy: bench/bench_kb_size.py's real queries)


def option_strings(help_text: str) -> set[str]:
    """Option names from argparse's help: the usage block and the option lines (aliases included)."""
    usage = help_text.split("\n\n", 1)[0]
    heads = [m.group(1) for m in re.finditer(r"^ {2}(-\S.*?)(?: {2,}|$)", help_text, flags=re.M)]
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", usage + "\n" + "\n".join(heads)))


@pytest.fixture(scope="module")
def helps() -> dict[str, subprocess.CompletedProcess]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(path: Path) -> tuple[str, subprocess.CompletedProcess]:
        proc = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, cwd=ROOT,
                              env=env, timeout=300)
        return str(path.relative_to(ROOT)), proc

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(run, scripts_with_main()))


def test_every_script_answers_help(helps):
    assert len(helps) >= 20 and "offline/encode_kv.py" in helps and "scripts/main_job.py" in helps
    for script, proc in helps.items():
        assert proc.returncode == 0 and proc.stdout.startswith("usage: "), (script, proc.stderr[-2000:])
        assert "--help" in option_strings(proc.stdout), script


def test_documented_commands_use_existing_scripts_and_flags(helps):
    commands = documented_commands()
    documented = {c.script for c in commands}
    assert {"offline/encode_kv.py", "offline/build_index.py", "offline/sanity_check_5tuple.py",
            "eval/eval_qa.py", "train/train_stageA.py", "infer/infer_server.py"} <= documented
    for command in commands:
        assert command.script in helps, f"{command.source}: {command.script} is not a script with --help"
        unknown = [f for f in command.flags() if f not in option_strings(helps[command.script].stdout)]
        assert not unknown, f"{command.source}: {command.script} has no {', '.join(unknown)}"


def test_script_docstrings_name_only_files_a_run_writes():
    """`runs/...` paths in script docstrings are run folders or files that training/evaluation write."""
    for command in documented_commands():
        if " docstring:" not in command.source:
            continue
        for arg in command.args:
            for path in re.findall(r"runs/[\w<>./-]+", arg):
                name = Path(path).name
                assert "." not in name or name in RUN_FILES, f"{command.source}: no run writes {path}"


def test_command_parsing():
    text = ("Example:\n    python offline/encode_kv.py --config CFG --fp16   # trained MLPs\n"
            "    KEY=1 .venv/bin/python eval/eval_qa.py --config c.yaml \\\n        --checkpoint runs/main\n"
            "run `python scripts/main_job.py [--until qa]` or `bash scripts/run_main.sh`\n"
            "    accelerate launch train/train_stageA.py --config=CFG\n")
    assert commands_in(text, "t") == [
        Command("t:2", "offline/encode_kv.py", ("--config", "CFG", "--fp16")),
        Command("t:3", "eval/eval_qa.py", ("--config", "c.yaml", "--checkpoint", "runs/main")),
        Command("t:5", "scripts/main_job.py", ("--until", "qa")),
        Command("t:6", "train/train_stageA.py", ("--config=CFG",)),
    ]
    assert commands_in(text, "t")[3].flags() == ["--config"]
    assert option_strings("usage: x.py [-h] [--a A] B\n\noptions:\n  -h, --help  show\n  --a A, -z A  thing\n") == {
        "-h", "--help", "--a", "-z"}
