"""kblampp.config: the plan's example and the backbone configs load; unknown keys, overrides, types."""
from __future__ import annotations

import argparse

import pytest
import yaml

from kblampp.config import (ConfigError, KBConfig, add_config_args, config_from_args, config_from_dict,
                            config_to_dict, load_config, save_resolved)


def test_plan_example_loads_as_written(repo_root):
    cfg = load_config(repo_root / "configs/synth_world_stageA_llama1b.yaml")
    assert cfg.backbone == "meta-llama/Llama-3.2-1B-Instruct"
    assert cfg.embedding_model == "BAAI/bge-small-en-v1.5"
    assert (cfg.d_model, cfg.d_k, cfg.d_v, cfg.d_ctx) == (2048, 384, 384, 384)
    assert (cfg.inject_layers, cfg.K_top, cfg.gamma, cfg.eta, cfg.temperature) == ([8], 8, 1.0, 1.0, 1.0)
    assert cfg.train_dataset == "data/qa/synth_world_train.jsonl"
    assert (cfg.batch_size, cfg.max_steps, cfg.grad_accum, cfg.max_seq_len) == (1, 5000, 4, 512)
    # PyYAML reads `5e-4` (no dot) as a string; the loader coerces it to a float.
    assert yaml.safe_load("lr: 5e-4")["lr"] == "5e-4"
    assert cfg.optimizer.lr == 5e-4 and isinstance(cfg.optimizer.lr, float)
    assert (cfg.optimizer.type, cfg.optimizer.weight_decay) == ("adamw", 0.01)


def test_backbone_configs_load(repo_root):
    llama = load_config(repo_root / "configs/backbone_llama1b.yaml")
    qwen = load_config(repo_root / "configs/backbone_qwen3b.yaml")
    assert (llama.backbone, llama.quantization, llama.inject_layers) == ("meta-llama/Llama-3.2-1B-Instruct", None, [8])
    assert (qwen.backbone, qwen.quantization, qwen.inject_layers, qwen.K_top, qwen.d_k) == (
        "Qwen/Qwen2.5-3B-Instruct", "4bit", [12, 20], 16, 512)


def test_embedded_default(repo_root):
    cfg = load_config(None)
    assert (cfg.backbone, cfg.embedding_model, cfg.d_model) == (
        "embedded:smollm2-135m-instruct", "embedded:all-MiniLM-L6-v2", None)
    assert cfg == KBConfig()
    file_cfg = load_config(repo_root / "configs/embedded_default.yaml")
    assert (file_cfg.backbone, file_cfg.embedding_model) == (cfg.backbone, cfg.embedding_model)


def test_unknown_keys_are_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("backbone: x\nbogus_key: 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{path}: unknown key 'bogus_key' \(known: K_pool, K_top, abstain_answer, abstention, backbone, "):
        load_config(path)
    path.write_text("optimizer:\n  lr: 1.0e-3\n  momentum: 0.9\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{path}: optimizer: unknown key 'momentum' \(known: lr, schedule, "):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^<defaults>: optimizer: unknown key 'lrr'"):
        load_config(None, ["optimizer.lrr=1e-4"])


def test_overrides_nested_and_typed(repo_root):
    cfg = load_config(repo_root / "configs/synth_world_stageA_llama1b.yaml",
                      ["optimizer.lr=1e-4", "inject_layers=[4, 9]", "index.method=flat", "K_top=16",
                       "quantization=4bit", "d_ctx=null"])
    assert cfg.optimizer.lr == 1e-4 and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.weight_decay == 0.01  # untouched siblings keep the file's values
    assert (cfg.inject_layers, cfg.index.method, cfg.K_top, cfg.quantization, cfg.d_ctx) == ([4, 9], "flat", 16, "4bit", None)
    assert cfg.d_model == 2048


@pytest.mark.parametrize("override, message", [
    ("K_top=abc", "<defaults>: K_top: expected int, got 'abc'"),
    ("K_top=2.5", "<defaults>: K_top: expected int, got 2.5"),
    ("gamma=true", "<defaults>: gamma: expected float, got True"),
    ("inject_layers=5", "<defaults>: inject_layers: expected a list, got int"),
    ("inject_layers=[1, x]", "<defaults>: inject_layers[1]: expected int, got 'x'"),
    ("optimizer=3", "<defaults>: optimizer: expected a mapping, got int"),
    ("backbone=null", "<defaults>: backbone: expected str, got None"),
    ("noequals", "--set noequals: expected key=value"),
    ("=1", "--set =1: expected key=value"),
    ("backbone.x=1", "<defaults>: backbone: expected str, got {'x': 1}"),
])
def test_type_errors(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value) == message


def test_override_into_a_scalar_from_file(repo_root):
    with pytest.raises(ConfigError, match=r"^--set backbone.x: backbone is not a mapping$"):
        load_config(repo_root / "configs/backbone_llama1b.yaml", ["backbone.x=1"])


def test_file_errors(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{bad}: expected a mapping at the top level$"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found$"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{broken}: invalid YAML"):
        load_config(broken)
    typed = tmp_path / "typed.yaml"
    typed.write_text("optimizer:\n  lr: fast\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{typed}: optimizer.lr: expected float, got 'fast'$"):
        load_config(typed)


def test_save_resolved_round_trip(tmp_path, repo_root):
    cfg = load_config(repo_root / "configs/synth_world_stageA_llama1b.yaml", ["optimizer.lr=1e-4", "index.method=flat"])
    path = save_resolved(cfg, tmp_path / "run1")
    assert path == tmp_path / "run1" / "config.resolved.yaml"
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.resolved.yaml"]  # no temp file left
    assert load_config(path) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert yaml.safe_load(path.read_text(encoding="utf-8"))["optimizer"]["lr"] == 1e-4


def test_script_args():
    parser = argparse.ArgumentParser()
    add_config_args(parser, required=False)
    args = parser.parse_args(["--set", "K_top=4", "--set", "optimizer.lr=0.001"])
    cfg = config_from_args(args)
    assert (cfg.K_top, cfg.optimizer.lr) == (4, 0.001)


def test_reference_date_is_checked_and_yaml_dates_accepted(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("reference_date: 2020-05-01\n", encoding="utf-8")
    assert load_config(path).reference_date == "2020-05-01"
    assert load_config(None).reference_date == "2024-12-31" and load_config(None).abstain_answer == "unknown"
    path.write_text("reference_date: '2020-02-30'\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{path}: reference_date: unparsable date '2020-02-30' \(day is out of range"):
        load_config(path)


def test_abstention_block_defaults_and_overrides():
    cfg = load_config(None)
    assert cfg.abstention.threshold is None and cfg.abstention.lookup_threshold is None
    cfg = load_config(None, ["abstention.threshold=0.35", "abstention.steps=0"])
    assert cfg.abstention.threshold == 0.35 and cfg.abstention.steps == 0
    with pytest.raises(ConfigError, match=r"abstention\.threshold: expected float, got 'high'"):
        load_config(None, ["abstention.threshold=high"])
