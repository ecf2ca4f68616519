"""The shared training loop of every phase: AdamW, grad accumulation, lr schedule, periodic eval,
checkpoints (KB tensors + optimizer state + the resolved config), exact resume, metrics JSONL, tqdm.

Built on Hugging Face Accelerate: under `accelerate launch` each process takes its slice of every
batch (see `kblampp.data.batch_schedule`) and gradients of the trainable tensors are averaged by hand
before each optimizer step, so phases that call submodules directly (no DDP forward) sync correctly.
Batches are a pure function of the micro-step, so resuming from step s continues exactly.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from kblampp.progress import progress_bar

from kblampp.config import KBConfig, config_to_dict, save_resolved
from kblampp.kb_params import is_kb_name, upgrade_legacy_tensors

StepFn = Callable[[int], tuple[torch.Tensor, dict[str, float], int]]
EvalFn = Callable[[int], dict[str, Any]]


def make_accelerator(cfg: KBConfig) -> Any:
    """One Accelerator per process (CPU when the config says so or no GPU is visible)."""
    from accelerate import Accelerator

    return Accelerator(cpu=cfg.device == "cpu" or not torch.cuda.is_available())


Select = Callable[[str], bool]


def kb_state(module: torch.nn.Module, select: Select = is_kb_name) -> dict[str, torch.Tensor]:
    """Every selected tensor (default: a `kb_` name segment: KB modules, kb_lora adapters), detached."""
    return {n: t.detach().contiguous().clone() for n, t in module.state_dict().items() if select(n)}


def load_kb_state(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str,
                  select: Select = is_kb_name) -> None:
    """Copy saved tensors in; every selected tensor of the module must be present (and nothing extra)."""
    own = {n: t for n, t in module.state_dict().items() if select(n)}
    tensors = upgrade_legacy_tensors(tensors, own)
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    if missing or extra:
        raise KeyError(f"{source}: KB tensors do not match the model (missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for name, value in tensors.items():
            if own[name].shape != value.shape:
                raise ValueError(f"{source}: {name}: shape {tuple(value.shape)} != model {tuple(own[name].shape)}")
            own[name].copy_(value)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base lr at optimizer step `step` (linear warmup, then the schedule)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    frac = min(1.0, (step - warmup) / span)
    if schedule == "linear":
        return max(0.0, 1.0 - frac)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"optimizer.schedule: {schedule!r} is not one of cosine, linear, constant")


class MetricsLog:
    """Append-only JSONL of metrics (one object per line, flushed each write; main process only)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def drop_after(self, phase: str, step: int) -> None:
        """Forget this phase's rows past `step` (a restarted or resumed phase writes them again)."""
        if not self.enabled or not self.path.exists():
            return
        rows = read_metrics(self.path)
        keep = [r for r in rows if r.get("phase") != phase or int(r.get("step", 0)) <= step]
        if len(keep) != len(rows):
            _atomic_text(self.path, "".join(json.dumps(r, default=float) + "\n" for r in keep))

    def write(self, **row: Any) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, default=float) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass
class Phase:
    """One training phase: what to train and how each micro-step computes its loss."""

    name: str
    params: dict[str, torch.nn.Parameter]  # named trainable tensors (names as in `holder`)
    step_fn: StepFn  # micro-step index -> (loss, scalar metrics, tokens processed)
    steps: int  # optimizer steps
    lr: float
    grad_accum: int = 1
    eval_fn: EvalFn | None = None
    eval_interval: int = 0
    max_grad_norm: float = 1.0
    unit: str = "tok"  # what step_fn's count measures (tokens, or questions for cached phases)
    extra: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """Runs phases in one run folder; `holder` owns every kb_ tensor that a checkpoint saves."""

    def __init__(self, cfg: KBConfig, holder: torch.nn.Module, run_dir: str | Path, accelerator: Any = None,
                 progress: bool = True, select: Select = is_kb_name):
        self.cfg, self.holder, self.run_dir, self.select = cfg, holder, Path(run_dir), select
        self.acc = accelerator if accelerator is not None else make_accelerator(cfg)
        self.main = bool(self.acc.is_main_process)
        self.progress = progress and self.main
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", self.main)
        if self.main:
            save_resolved(cfg, self.run_dir)

    # ---- progress bookkeeping -------------------------------------------------------------------
    def _progress_path(self) -> Path:
        return self.run_dir / "progress.json"

    def completed(self) -> dict[str, Any]:
        p = self._progress_path()
        return json.loads(p.read_text(encoding="utf-8")) if p.exists() else {}

    def mark_done(self, name: str, result: dict[str, Any]) -> None:
        if not self.main:
            return
        done = self.completed()
        done[name] = result
        _atomic_text(self._progress_path(), json.dumps(done, indent=1, default=float))

    # ---- checkpoints ----------------------------------------------------------------------------
    def ckpt_root(self, name: str) -> Path:
        return self.run_dir / "checkpoints" / name

    def latest_checkpoint(self, name: str) -> Path | None:
        root = self.ckpt_root(name)
        steps = sorted(root.glob("step_*")) if root.exists() else []
        return steps[-1] if steps else None

    def save(self, phase: Phase, opt: torch.optim.Optimizer, step: int, keep: int = 2) -> Path | None:
        """Atomic checkpoint folder: kb.safetensors, optim.safetensors, state.json, config.resolved.yaml."""
        if not self.main:
            return None
        root = self.ckpt_root(phase.name)
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step_{step:07d}"
        tmp = Path(tempfile.mkdtemp(prefix=".tmp_", dir=root))
        save_file(kb_state(self.holder, self.select), str(tmp / "kb.safetensors"))
        tensors, scalars = _optimizer_tensors(phase.params, opt)
        save_file(tensors, str(tmp / "optim.safetensors"))
        state = {"phase": phase.name, "step": step, "optimizer_scalars": scalars,
                 "config": config_to_dict(self.cfg)}
        (tmp / "state.json").write_text(json.dumps(state, default=float), encoding="utf-8")
        save_resolved(self.cfg, tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(root.glob("step_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def restore(self, phase: Phase, opt: torch.optim.Optimizer, folder: Path) -> int:
        load_kb_state(self.holder, load_file(str(folder / "kb.safetensors")), str(folder), self.select)
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        _load_optimizer(phase.params, opt, load_file(str(folder / "optim.safetensors")),
                        state["optimizer_scalars"], str(folder))
        return int(state["step"])

    # ---- the loop -------------------------------------------------------------------------------
    def run(self, phase: Phase, resume: bool = True) -> dict[str, Any]:
        """Train `phase` for its steps (resuming from its latest checkpoint); returns the last eval."""
        done = self.completed()
        if phase.name in done:
            if resume:
                return done[phase.name]
        if phase.steps <= 0:
            return {}
        params = list(phase.params.values())
        for p in params:
            p.requires_grad_(True)
        ocfg = self.cfg.optimizer
        opt = torch.optim.AdamW(params, lr=phase.lr, weight_decay=ocfg.weight_decay)
        start = 0
        latest = self.latest_checkpoint(phase.name) if resume else None
        if latest is not None:
            start = self.restore(phase, opt, latest)
        self.metrics.drop_after(phase.name, start)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, phase.steps, ocfg.warmup_steps, ocfg.schedule), last_epoch=-1)
        with warnings.catch_warnings():  # fast-forward the schedule to the resumed step
            warnings.simplefilter("ignore")
            for _ in range(start):
                sched.step()
        bar = progress_bar(total=phase.steps, initial=start, desc=phase.name, disable=not self.progress, unit="step")
        last_eval: dict[str, Any] = {}
        window_tokens, window_start, window_loss, window_n = 0, time.perf_counter(), 0.0, 0
        for step in range(start, phase.steps):
            opt.zero_grad(set_to_none=True)
            step_metrics: dict[str, float] = {}
            for micro in range(phase.grad_accum):
                loss, metrics, n_tok = phase.step_fn(step * phase.grad_accum + micro)
                self.acc.backward(loss / phase.grad_accum)
                window_tokens += n_tok
                for key, value in metrics.items():
                    step_metrics[key] = step_metrics.get(key, 0.0) + float(value) / phase.grad_accum
                step_metrics["loss"] = step_metrics.get("loss", 0.0) + float(loss.detach()) / phase.grad_accum
            self._sync_grads(params)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, phase.max_grad_norm)
            opt.step()
            sched.step()
            window_loss += step_metrics["loss"]
            window_n += 1
            elapsed = max(time.perf_counter() - window_start, 1e-9)
            tok_s = window_tokens / elapsed
            bar.set_postfix({"loss": f"{step_metrics['loss']:.4f}", f"{phase.unit}/s": f"{tok_s:.0f}"})
            bar.update(1)
            n = step + 1
            if n % max(1, self.cfg.log_interval) == 0 or n == phase.steps:
                self.metrics.write(phase=phase.name, step=n, lr=sched.get_last_lr()[0], **{f"{phase.unit}_per_s": tok_s},
                                   mean_loss=window_loss / window_n, grad_norm=float(grad_norm), **step_metrics)
                window_tokens, window_start, window_loss, window_n = 0, time.perf_counter(), 0.0, 0
            if phase.eval_fn is not None and phase.eval_interval > 0 and n % phase.eval_interval == 0 and n < phase.steps:
                last_eval = phase.eval_fn(n)
                self.metrics.write(phase=phase.name, step=n, eval=last_eval)
            if self.cfg.save_interval > 0 and n % self.cfg.save_interval == 0 and n < phase.steps:
                self.save(phase, opt, n)
        bar.close()
        for p in params:
            p.requires_grad_(False)
        if phase.eval_fn is not None:
            last_eval = phase.eval_fn(phase.steps)
            self.metrics.write(phase=phase.name, step=phase.steps, eval=last_eval, final=True)
        self.save(phase, opt, phase.steps)
        self.mark_done(phase.name, last_eval)
        return last_eval

    def _sync_grads(self, params: list[torch.nn.Parameter]) -> None:
        if self.acc.num_processes <= 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad = self.acc.reduce(p.grad, reduction="mean")


def _optimizer_tensors(params: dict[str, torch.nn.Parameter], opt: torch.optim.Optimizer
                       ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """AdamW state keyed by parameter name (tensors) plus JSON scalars (lr, betas, ...)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        for key, value in opt.state.get(p, {}).items():
            tensors[f"{name}::{key}"] = torch.as_tensor(value).detach().contiguous().clone()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return tensors, {"param_groups": groups}


def _load_optimizer(params: dict[str, torch.nn.Parameter], opt: torch.optim.Optimizer,
                    tensors: dict[str, torch.Tensor], scalars: dict[str, Any], source: str) -> None:
    for name, p in params.items():
        keys = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.split("::", 1)[0] == name}
        if not keys:
            raise KeyError(f"{source}: optimizer state for {name} not found")
        opt.state[p] = {k: v.to(p.device) for k, v in keys.items()}
    for group, saved in zip(opt.param_groups, scalars["param_groups"]):
        for key, value in saved.items():
            if key not in ("lr", "initial_lr"):  # the schedule re-derives these from the step
                group[key] = tuple(value) if isinstance(value, list) else value


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
