"""Select, freeze, save and load the KB tensors (every name with a `kb_`-prefixed segment).

Checkpoints hold only KB tensors (safetensors) with the resolved config as JSON in the safetensors
metadata, written atomically; loading demands an exact match of names and shapes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

KB_PREFIX = "kb_"
FORMAT = "kblampp-kb-v1"


class KBCheckpointError(ValueError):
    """A KB checkpoint that does not fit the model; the message names the file and the tensors."""


def is_kb_name(name: str) -> bool:
    return any(part.startswith(KB_PREFIX) for part in name.split("."))


def freeze_non_kb(model: nn.Module) -> tuple[int, int]:
    """requires_grad = True exactly for `kb_` parameters; returns (trainable, frozen) element counts."""
    trainable = frozen = 0
    for name, param in model.named_parameters():
        param.requires_grad_(is_kb_name(name))
        if param.requires_grad:
            trainable += param.numel()
        else:
            frozen += param.numel()
    return trainable, frozen


def kb_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached `kb_` tensors (parameters and buffers) by their state-dict name."""
    return {name: t.detach() for name, t in model.state_dict().items() if is_kb_name(name)}


def _config_json(cfg: Any) -> str:
    if dataclasses.is_dataclass(cfg):
        cfg = dataclasses.asdict(cfg)
    if not isinstance(cfg, dict):
        raise TypeError(f"cfg must be a config dataclass or dict, got {type(cfg).__name__}")
    return json.dumps(cfg, sort_keys=True)


def save_kb_checkpoint(model: nn.Module, cfg: Any, path: str | Path, extra: dict[str, str] | None = None) -> Path:
    """Write the KB tensors + config JSON to `path` (safetensors) via a temp file and os.replace."""
    path = Path(path)
    tensors = {name: t.to("cpu").contiguous().clone() for name, t in kb_state_dict(model).items()}
    if not tensors:
        raise KBCheckpointError(f"{path}: the model has no {KB_PREFIX} tensors to save")
    metadata = {"format": FORMAT, "config": _config_json(cfg), **(extra or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_kb_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on CPU, metadata) of a KB checkpoint, with the file named in every error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: KB checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise KBCheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    if metadata.get("format") != FORMAT:
        raise KBCheckpointError(f"{path}: metadata format is {metadata.get('format')!r}, expected {FORMAT!r}")
    return tensors, metadata


def upgrade_legacy_tensors(tensors: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Older time-scorer weights become today's per-kind matrix, scoring as before
    (`kblampp.scorers.upgrade_legacy_weight`): the window-only weight (4,) of checkpoints written before
    the typed time constraint, and per-kind matrices without the later closeness column. Other tensors pass."""
    from kblampp.scorers import upgrade_legacy_weight

    out = dict(tensors)
    for name, t in tensors.items():
        if (name.endswith("kb_time_scorer.weight") and name in own and own[name].dim() == 2
                and (t.dim() == 1 or (t.dim() == 2 and t.shape[1] < own[name].shape[1]))):
            out[name] = upgrade_legacy_weight(t)
    return out


def load_kb_checkpoint(model: nn.Module, path: str | Path, skip: tuple[str, ...] = ()) -> dict:
    """Copy the checkpoint's KB tensors into `model`; every KB tensor must be found, nothing unexpected,
    every shape equal; tensors named with a prefix in `skip` are left out (a module the caller chose
    not to load). Returns the saved config as a dict (see kblampp.config.config_from_dict)."""
    tensors, metadata = read_kb_checkpoint(path)
    tensors = {name: t for name, t in tensors.items() if not name.startswith(skip)} if skip else tensors
    own = kb_state_dict(model)
    tensors = upgrade_legacy_tensors(tensors, own)
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    problems = []
    if missing:
        problems.append(f"missing KB tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    for name in sorted(set(own) & set(tensors)):
        if tuple(own[name].shape) != tuple(tensors[name].shape):
            problems.append(f"{name}: shape {tuple(tensors[name].shape)} in the file, "
                            f"{tuple(own[name].shape)} in the model")
    if problems:
        raise KBCheckpointError(f"{path}: " + "; ".join(problems))
    with torch.no_grad():
        for name, target in own.items():
            target.copy_(tensors[name].to(device=target.device, dtype=target.dtype))
    try:
        return json.loads(metadata["config"])
    except (KeyError, json.JSONDecodeError) as err:
        raise KBCheckpointError(f"{path}: metadata config is missing or not JSON ({err})") from None

