"""The documented commands of the data scripts run as written, on tiny data: world and QA generation,
sanity checks, K/V encoding (fresh, and with a trained encoder from a training run) and indexing.

They run in a scratch folder laid out like the repository (configs/, data/, runs/, store/), where
configs/embedded_default.yaml names a tiny random embedding model so that everything takes seconds;
`CFG` in a docstring stands for that config. Each goes through `run_main`, as its `__main__` does."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from doc_commands import ROOT, documented_commands
from kblampp.cli import run_main
from kblampp.config import load_config
from kblampp.kb_params import save_kb_checkpoint
from kblampp.kb_store import KBValueStore
from kblampp.kv_encoder import KVEncoder, load_kv_encoder, save_kv_encoder, weights_hash
from kblampp.model import KB_PREFIX
from test_embedding import make_tiny_embedder_dir

ORDER = ("offline/gen_synth_world.py", "offline/gen_synth_qa.py", "offline/sanity_check_5tuple.py",
         "offline/encode_kv.py", "offline/build_index.py")
NEEDS_A_SERVICE = ("--generator", "http://")  # the LLM generator needs an API endpoint, a Milvus URI a server


def script_main(rel: str):
    spec = importlib.util.spec_from_file_location(f"doc_{Path(rel).stem}", ROOT / rel)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.main


class KBPart(torch.nn.Module):
    """Stands in for the trained model: save_kb_checkpoint keeps its kb_ tensors and the config."""

    def __init__(self) -> None:
        super().__init__()
        setattr(self, f"{KB_PREFIX}gate", torch.nn.Linear(2, 1))


def write_training_run(run: Path, cfg_path: Path, d_ctx: int) -> KVEncoder:
    """What Stage A leaves in its run folder: kb_final.safetensors (config inside) + kv_encoder.safetensors."""
    cfg = load_config(cfg_path)
    encoder = KVEncoder(d_ctx, cfg.d_k, cfg.d_v, cfg.d_tau, hidden=24, seed=5)
    with torch.no_grad():
        encoder.kb_key_mlp.net[2].weight.normal_()  # "trained": keys differ from a fresh encoder's
    run.mkdir(parents=True)
    save_kb_checkpoint(KBPart(), cfg, run / "kb_final.safetensors")
    save_kv_encoder(encoder, run / "kv_encoder.safetensors")
    return encoder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo_layout")
    emb = make_tiny_embedder_dir(root / "tiny_embedder")
    (root / "configs").mkdir()
    cfg = root / "configs/embedded_default.yaml"
    cfg.write_text(f"embedding_model: {json.dumps(str(emb))}\nd_k: 32\nd_v: 32\nd_ctx: 32\nd_tau: 8\n"
                   "tuples_path: data/5tuple/synth_world.jsonl\nstore_dir: store/synth_world\n"
                   "index:\n  method: hnsw\n  similarity: ip\n", encoding="utf-8")
    encoder = write_training_run(root / "runs/main", cfg, d_ctx=32)
    return root, encoder


def test_documented_data_commands_run_as_written(workspace, monkeypatch, capsys):
    root, trained = workspace
    monkeypatch.chdir(root)
    commands = sorted((c for c in documented_commands() if c.script in ORDER and " docstring:" in c.source
                       and not any(word in " ".join(c.args) for word in NEEDS_A_SERVICE)), key=lambda c: (ORDER.index(c.script), c.source))
    assert [c.script for c in commands].count("offline/encode_kv.py") == 3
    assert [c.script for c in commands].count("offline/build_index.py") == 5
    world = root / "data/5tuple/synth_world.jsonl"
    for command in commands:
        if command.script == "offline/encode_kv.py" and not (root / "data/5tuple/new.jsonl").exists():
            # tiny data from here on: the first 300 facts (ivfpq's 8-bit codes need >= 256 keys), and
            # the first 50 as the "new" file that the trained encoder encodes
            lines = world.read_text(encoding="utf-8").splitlines()
            world.write_text("\n".join(lines[:300]) + "\n", encoding="utf-8")
            (root / "data/5tuple/new.jsonl").write_text("\n".join(lines[:50]) + "\n", encoding="utf-8")
        argv = ["configs/embedded_default.yaml" if a == "CFG" else a for a in command.args]
        monkeypatch.setattr(sys, "argv", [command.script, *argv])
        code = run_main(script_main(command.script), argv)
        out = capsys.readouterr()
        assert code == 0, f"{command.source}: {command.script} {' '.join(argv)}\n{out.err[-3000:]}"
    fresh, x, new = (KBValueStore.load(root / "store" / name) for name in ("synth_world", "x", "new"))
    assert fresh.n == x.n == 300 and new.n == 50 and x.manifest["dtype"] == "float16"
    assert {p.name for p in (root / "store/synth_world").glob("index_*")} == {"index_hnsw", "index_ivfflat", "index_ivfpq",
                                                                        "index_milvus"}
    # the store built with the trained encoder carries exactly those weights, and the training settings
    assert new.manifest["kv_encoder"]["sha256"] == weights_hash(trained) != fresh.manifest["kv_encoder"]["sha256"]
    assert new.manifest["embedding_model"] == fresh.manifest["embedding_model"]


def test_kv_encoder_from_a_training_checkpoint_file_or_folder(workspace, tmp_path):
    """The issue's case: --kv_encoder runs/main/kb_final.safetensors (a KBConfig in its metadata)."""
    root, trained = workspace
    want = weights_hash(trained)
    assert weights_hash(load_kv_encoder(root / "runs/main/kb_final.safetensors")) == want
    assert weights_hash(load_kv_encoder(root / "runs/main")) == want
    step = tmp_path / "checkpoints/retrieval-40"  # a step checkpoint: encoder tensors inside, no metadata
    step.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({f"kv.{k}": v.contiguous() for k, v in trained.state_dict().items()}, str(step / "kb.safetensors"))
    back = load_kv_encoder(step / "kb.safetensors")
    assert weights_hash(back) == want and back.config.hidden == 24 and back.config.d_tau == 8


def test_kv_encoder_that_disagrees_with_the_config_is_one_error_line(workspace, tmp_path, capsys, monkeypatch):
    root, _ = workspace
    other = tmp_path / "other.yaml"
    other.write_text(f"embedding_model: {json.dumps(str(root / 'elsewhere'))}\nd_k: 32\nd_v: 32\nd_tau: 8\n",
                     encoding="utf-8")
    monkeypatch.chdir(root)
    code = run_main(script_main("offline/encode_kv.py"), ["--config", str(other), "--kv_encoder",
                                                           "runs/main/kb_final.safetensors", "--store_dir", "store/y"])
    assert code == 2 and not (root / "store/y").exists()
    assert capsys.readouterr().err == (f"error: runs/main/kb_final.safetensors: the encoder was trained with "
                                       f"embedding_model={str(root / 'tiny_embedder')!r}, the config says "
                                       f"{str(root / 'elsewhere')!r}\n")
    (tmp_path / "stage_b").mkdir()
    save_kb_checkpoint(KBPart(), load_config(other), tmp_path / "stage_b/kb_final.safetensors")
    code = run_main(script_main("offline/encode_kv.py"), ["--kv_encoder", str(tmp_path / "stage_b/kb_final.safetensors")])
    assert code == 2 and capsys.readouterr().err.startswith(
        f"error: {tmp_path / 'stage_b/kb_final.safetensors'}: holds no K/V encoder tensors and no "
        "kv_encoder.safetensors lies beside it")
