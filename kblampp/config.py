"""The one config loader: YAML -> typed dataclasses, unknown keys rejected, `--set a.b=v` overrides.

`d_model` is optional because it comes from the backbone's own config; a stated value that disagrees
is an error raised where the backbone is loaded.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kblampp.synth.families import DEFAULT_ABSTAIN_ANSWER
from kblampp.timewin import window_days


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names file and key."""


# Where the inject layers retrieve (KBConfig.retrieval_positions): every position of every forward call
# (prefill and each decode step), or only each row's last prompt token, the one position whose
# candidates the answer head, the hop choice and the abstention decision read.
RETRIEVAL_POSITIONS = ("all", "last_prompt")


@dataclass
class OptimizerConfig:
    type: str = "adamw"
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | constant | linear


@dataclass
class IndexConfig:
    method: str = "ivfflat"  # ivfflat | hnsw | ivfpq | flat | milvus (kblampp/milvus_index.py); docs/BENCHMARKS.md
    similarity: str = "ip"  # ip | cosine
    hnsw_m: int = 64  # 64 / 400 / 1024: recall@8 of exact 0.976 at 10^5 facts on the trained model's queries (issue 16)
    ef_construction: int = 400
    ef_search: int = 1024  # search time: applied when an index is loaded, no rebuild (10^6 facts want more: docs/BENCHMARKS.md)
    mips: str = "l2"  # hnsw / ivfflat / milvus + ip: l2 = inner product searched as L2 over norm-equalised keys (exact order); ip = faiss's own
    ivf_nlist: int = 0  # 0 = about 4*sqrt(N)
    pq_m: int = 16
    pq_bits: int = 8
    nprobe: int = 128  # IVF lists searched (ivfflat, ivfpq); search time, applied when an index is loaded
    uri: str = ""  # milvus: a Milvus Lite path ending in .db ("" = milvus.db in the store's index_milvus/) or http://host:19530
    collection: str = "kblampp_keys"  # milvus: the collection holding the keys
    milvus_index_type: str = "HNSW"  # milvus: HNSW (hnsw_m, ef_*) | IVF_FLAT (ivf_nlist, nprobe)


@dataclass
class StageAConfig:
    """Stage A phases, in order; a phase with 0 steps is off (SPEC section 7: retrieval first)."""

    cache_batch: int = 16  # questions per frozen forward when caching inject-layer states
    max_train_questions: int = 0  # 0 = all training questions
    dev_max_questions: int = 1000  # held-out questions scored for retrieval metrics
    retrieval_steps: int = 1500  # contrastive query/key training on cached states
    retrieval_lr: float = 2e-3
    retrieval_batch: int = 64
    retrieval_positives: str = "all"  # all (every supporting fact: a multi-hop chain's first hop too) | answer
    hard_negatives: int = 16  # mined per question (shared name part, same head, same head+relation)
    hard_negative_weight: float = 0.5  # weight of the extra softmax over positive + hard negatives
    sem_weight: float = 1.0  # InfoNCE of sem alone (what the ANN search ranks by) onto the answer's (head, relation)
    negatives: str = "train_worlds"  # train_worlds (softmax over the training worlds' facts) | all
    query_init_scale: float = 200.0  # start Q = scale * key map of e_q (zero-shot match); 0 = random init
    # training-only worlds (not in the KB) for the retrieval phase: more entities for the keys to tell apart
    retrieval_extra_facts: str | None = None  # 5-tuple file (kblampp.training.extra_worlds)
    retrieval_extra_qa: str | None = None  # questions over it (fact ids index retrieval_extra_facts)
    retrieval_eval_interval: int = 250
    time_steps: int = 150  # the time score's per-kind rows: softmax over the answer's same-(head, relation) facts
    time_lr: float = 0.05
    time_batch: int = 128
    time_eval_interval: int = 50
    train_kv_encoder: bool = True  # train the K/V MLPs too (store re-encoded and index rebuilt at the end)
    value_steps: int = 60  # teacher-forced gold facts, CE through the injection path
    value_lr: float = 1e-3
    copy_gate_steps: int = 300  # answer-head copy gate on cached quantities
    copy_gate_lr: float = 5e-3
    copy_gate_questions: int = 512  # training questions whose plain-LM log-probs are cached for the gate
    e2e_steps: int = 40  # real retrieval, mixture CE + injection CE + retrieval loss
    e2e_lr: float = 3e-4
    e2e_retrieval_weight: float = 1.0
    e2e_injection_weight: float = 1.0
    hop_steps: int = 300  # multi-hop (2+ inject layers): per-hop retrieval + hop choice on cached states
    hop_lr: float = 2e-3
    hop_batch: int = 256
    hop_choice_weight: float = 1.0
    hop_eval_interval: int = 100
    hop_value_scale: float = 50.0  # c: |kb_linear_v| of the layer that writes the bridge (kblampp.training.hop_phase.init_bridge)
    hop_query_ctx_share: float = 0.25  # later layers' kb_query_ctx = this share of the first layer's


@dataclass
class StageBConfig:
    """Stage B: LoRA (or unfrozen top layers) plus alpha supervision, at a lower lr."""

    init_from: str | None = None  # Stage A run folder (its final checkpoint); None = output_dir's stage A
    mode: str = "lora"  # lora | unfreeze
    steps: int = 100
    lr: float = 1e-4
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_layers: int = 2  # the top N decoder layers
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    aux_alpha_weight: float = 1.0  # CE of alpha (last prompt token) onto supporting facts
    time_penalty_weight: float = 1.0  # alpha mass on candidates whose window misses the question's


@dataclass
class AbstentionConfig:
    """The learned abstention decision (`kb_abstain`): its Stage A phase, and the thresholds.

    `threshold` None = the value calibrated on dev and saved in the checkpoint; a number overrides it
    (abstain when p(unanswerable) >= t: 0.0 always abstains, anything above 1 never)."""

    steps: int = 400  # Stage A phase on cached signals (0 = off)
    lr: float = 1e-2
    hidden: int = 32  # width of the decision's one hidden layer (0 = a linear decision)
    state_dims: int = 16  # principal directions of the question state the decision reads (0 = KB signals only)
    dev_folds: int = 5  # > 1: dev questions train the decision too, cross-fitted for the calibration (0 = off)
    batch: int = 256
    max_questions: int = 0  # training questions whose signals are cached (0 = all; a seeded uniform subset)
    dev_max_questions: int = 0  # dev questions the threshold is calibrated on (0 = all; a seeded uniform subset)
    max_answerable_loss: float = 0.02  # calibration: most answerable dev questions the model gets right
    # (top-alpha = answer fact) that the threshold may turn into abstentions, as a share of all answerable
    threshold: float | None = None
    name_check: bool = True  # the decision sees whether each candidate's head is named in the question
    lookup_threshold: float | None = None  # `lookup` row: abstain below this similarity (None = the dev-tuned floor)
    grown_stores: list[str] = field(default_factory=list)  # train/train_abstention.py: stores of the run's facts
    # plus many more (bench/bench_kb_size.py --build_only): the decision also learns from their candidates


@dataclass
class KBConfig:
    """Every setting of a run; field names follow the plan's example config (plan section 6.2)."""

    backbone: str = "embedded:smollm2-135m-instruct"
    embedding_model: str = "embedded:all-MiniLM-L6-v2"
    quantization: str | None = None  # None | "4bit"
    dtype: str = "float32"
    device: str = "cpu"

    d_model: int | None = None
    d_k: int = 384
    d_v: int = 384
    d_ctx: int | None = None
    d_tau: int = 32

    inject_layers: list[int] = field(default_factory=lambda: [8])
    K_top: int = 8
    K_pool: int | None = None  # search this many by sem and keep the K_top best by the whole score (None = K_top)
    name_link: bool = False  # the facts whose head the question names lead the first inject layer's candidates
    name_link_limit: int = 64  # at most this many linked facts per question (longest names first)
    name_link_only: bool = False  # a question that names a head gets the named facts only (no searched fact)
    gamma: float = 1.0
    eta: float = 1.0
    temperature: float = 1.0
    retrieval: str = "exact"  # exact (on-device matmul) | faiss
    retrieval_positions: str = "all"  # all | last_prompt (generate(): retrieve and fuse at the last prompt token only)

    tuples_path: str = "data/5tuple/synth_world.jsonl"
    store_dir: str = "store/default"
    index: IndexConfig = field(default_factory=IndexConfig)
    train_dataset: str = "data/qa/synth_world_train.jsonl"
    eval_dataset: str = "data/qa/synth_world_dev.jsonl"
    test_dataset: str | None = None
    output_dir: str = "runs/default"
    cache_dir: str = "~/.cache/kblampp"

    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    stage_a: StageAConfig = field(default_factory=StageAConfig)
    stage_b: StageBConfig = field(default_factory=StageBConfig)
    abstention: AbstentionConfig = field(default_factory=AbstentionConfig)
    batch_size: int = 1
    max_steps: int = 5000
    grad_accum: int = 4
    max_seq_len: int = 512
    max_new_tokens: int = 16
    reference_date: str = "2024-12-31"  # what "now" / "current" in a question means (the synthetic world's last day)
    abstain_answer: str = DEFAULT_ABSTAIN_ANSWER  # the answer of a row that abstains (right only on unanswerable questions)
    log_interval: int = 50
    save_interval: int = 1000
    eval_interval: int = 0
    seed: int = 0


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting where YAML is loose (e.g. '5e-4')."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: expected {_type_name(tp)}, got null")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, datetime.date):  # YAML reads an unquoted 2024-12-31 as a date
            return value.isoformat()
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        loc = where[:-1] if where.endswith(":") else where  # top level: 'file.yaml:' -> 'file.yaml'
        raise ConfigError(f"{loc}: unknown key {unknown[0]!r} (known: {', '.join(sorted(names))})")
    prefix = f"{where}." if not where.endswith(":") else where + " "
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a mapping")
    node[leaf] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> KBConfig:
    """Load a YAML config (or the defaults when `path` is None) and apply `key=value` overrides."""
    data: dict = {}
    label = "<defaults>:"
    if path is not None:
        label = f"{path}:"
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML ({err})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        data = loaded or {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item}: expected key=value")
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    cfg = _build(KBConfig, data, label)
    try:
        window_days(cfg.reference_date, cfg.reference_date)
    except ValueError as err:
        raise ConfigError(f"{label} reference_date: {str(err).partition(': ')[2]}") from None
    check_retrieval_positions(cfg.retrieval_positions, f"{label} retrieval_positions")
    if cfg.name_link_limit < 1:
        raise ConfigError(f"{label} name_link_limit: must be >= 1, got {cfg.name_link_limit}")
    if cfg.name_link_only and not cfg.name_link:
        raise ConfigError(f"{label} name_link_only: needs name_link: true (it keeps the linked facts only)")
    return cfg


def name_link_limit(cfg: KBConfig) -> int | None:
    """How many named facts lead a question's candidates (`name_link`), None when linking is off."""
    return cfg.name_link_limit if cfg.name_link else None


def check_retrieval_positions(value: str, where: str = "retrieval_positions") -> None:
    """Reject a retrieval scope other than RETRIEVAL_POSITIONS, naming the key."""
    if value not in RETRIEVAL_POSITIONS:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(RETRIEVAL_POSITIONS)}")


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_resolved(cfg: KBConfig, run_dir: str | Path) -> Path:
    """Write the resolved config into a run folder as YAML (and return its path)."""
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "config.resolved.yaml"
    tmp = out / ".config.resolved.yaml.tmp"  # temp + rename: never a half-written config
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
    tmp.replace(target)
    return target


def config_from_dict(data: dict, label: str = "<checkpoint>:") -> KBConfig:
    """Rebuild a config saved by `save_resolved` or stored inside a checkpoint."""
    cfg = _build(KBConfig, json.loads(json.dumps(data)), label)
    check_retrieval_positions(cfg.retrieval_positions, f"{label} retrieval_positions")
    return cfg


def add_config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required, help="YAML config file (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, dotted for nested keys (e.g. optimizer.lr=1e-4); repeatable")


def add_run_args(parser: argparse.ArgumentParser, output_help: str) -> None:
    """--output_dir / --no_resume / --no_progress, shared by the training scripts."""
    parser.add_argument("--output_dir", help=output_help)
    parser.add_argument("--no_resume", action="store_true", help="ignore checkpoints already in the run folder")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> KBConfig:
    return load_config(args.config, args.overrides)
