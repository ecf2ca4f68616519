"""Stage B: LoRA (peft, adapter `kb_lora`) on the top layers' attention projections - or those layers
unfrozen - at a lower lr, on top of the Stage A KB modules, with alpha supervision:

    L = CE(answer-head mixture) + CE(injection path)
        + aux_alpha_weight * -log(alpha mass on supporting facts at the last prompt token)
        + time_penalty_weight * (alpha mass on candidates whose window misses the question's).

The adapter is named `kb_lora`, so its tensors carry a `kb_`-prefixed name segment and the ordinary
KB freezing/checkpoint selection picks them up (`kblampp.kb_params.is_kb_name`). Recorded alpha is
detached, so the alpha losses recompute the selection at the last prompt token from the recorded
inject-layer state (same numbers, with grad into the query side and scorers).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kblampp import hf_arch
from kblampp.data import QADataset, batch_schedule
from kblampp.kb_context import KBContext
from kblampp.kb_params import is_kb_name, load_kb_checkpoint, save_kb_checkpoint
from kblampp.training.common import StageModules
from kblampp.training.e2e_phase import answer_losses
from kblampp.training.losses import alpha_support_loss, time_penalty
from kblampp.training.loop import Phase

ADAPTER = "kb_lora"


def top_layer_module_names(backbone: nn.Module, n_top: int, targets: list[str]) -> list[str]:
    """Full module names of the `targets` projections (e.g. q_proj, v_proj) inside the top `n_top`
    decoder layers, found by module identity so no layout is hard-coded here."""
    layers = hf_arch.decoder_layers(backbone)
    if not 1 <= n_top <= len(layers):
        raise ValueError(f"stage_b.lora_layers: {n_top} is not in 1..{len(layers)}")
    wanted = {id(layers[i]) for i in range(len(layers) - n_top, len(layers))}
    names: list[str] = []
    for prefix, module in backbone.named_modules():
        if id(module) in wanted:
            names.extend(f"{prefix}.{sub}" for sub, _ in module.named_modules()
                         if sub and sub.split(".")[-1] in targets)
    if not names:
        raise ValueError(f"stage_b.lora_targets: none of {targets} found in the top {n_top} layers")
    return names


def add_lora(backbone: nn.Module, cfg: Any) -> list[str]:
    """Inject LoRA adapters named `kb_lora` in place (B starts at zero: the model is unchanged)."""
    from peft import LoraConfig, inject_adapter_in_model

    sb = cfg.stage_b
    targets = top_layer_module_names(backbone, sb.lora_layers, list(sb.lora_targets))
    lora = LoraConfig(r=sb.lora_r, lora_alpha=sb.lora_alpha, lora_dropout=sb.lora_dropout, target_modules=targets,
                      bias="none")
    inject_adapter_in_model(lora, backbone, adapter_name=ADAPTER)
    return targets


def unfreeze_names(backbone: nn.Module, n_top: int) -> set[str]:
    """Parameter names (as in the backbone) of the top `n_top` decoder layers."""
    layers = hf_arch.decoder_layers(backbone)
    wanted = {id(p) for i in range(len(layers) - n_top, len(layers)) for p in layers[i].parameters()}
    return {n for n, p in backbone.named_parameters() if id(p) in wanted}


class StageBTrainer:
    def __init__(self, mods: StageModules, train: QADataset, tail_table: torch.Tensor, rank: int = 0, world: int = 1):
        self.mods, self.train, self.tail_table, self.rank, self.world = mods, train, tail_table, rank, world
        self.cfg = mods.cfg

    def alpha_at_last_prompt(self, batch: dict[str, torch.Tensor], ctx: KBContext, kb_source: Any
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha (B, K) with grad, cand_ids (B, K)) at each row's last prompt token, first inject layer."""
        layer = self.mods.first_layer
        rows = torch.arange(batch["input_ids"].shape[0], device=batch["input_ids"].device)
        h = ctx.records[layer][0].hidden[rows, batch["last_prompt_pos"]].unsqueeze(1)  # (B, 1, d_model)
        sub = KBContext(source=kb_source, e_q=batch["e_q"], tau=batch["tau"], time_kind=batch.get("time_kind"))
        sel, _ = self.mods.layer_modules()[layer].select(h, sub)
        return sel.alpha[:, 0], sel.cand_ids[:, 0]

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mods = self.mods
        kb = mods.tensor_kb(grad=True)
        parts, ctx = answer_losses(mods, batch, kb, self.tail_table)
        alpha, cand = self.alpha_at_last_prompt(batch, ctx, kb)
        aux, _ = alpha_support_loss(alpha, cand, batch["supporting"])
        safe = cand.clamp(min=0)
        penalty = time_penalty(alpha, kb.tau_min[safe], kb.tau_max[safe], batch["tau"], cand, batch["supporting"])
        return {**parts, "aux_alpha": aux, "time_penalty": penalty}

    def step(self, micro: int) -> tuple[torch.Tensor, dict[str, float], int]:
        rows = batch_schedule(len(self.train), self.cfg.batch_size, micro, self.cfg.seed + 7, self.rank, self.world)
        batch = self.mods.batch(self.train, rows)
        parts = self.losses(batch)
        sb = self.cfg.stage_b
        loss = (parts["mixture"] + parts["injection"] + sb.aux_alpha_weight * parts["aux_alpha"]
                + sb.time_penalty_weight * parts["time_penalty"])
        return loss, {k: float(v.detach()) for k, v in parts.items()}, int(batch["attention_mask"].sum())

    def phase(self, params: dict[str, nn.Parameter]) -> Phase:
        sb = self.cfg.stage_b
        return Phase(name="stage_b", params=params, step_fn=self.step, steps=sb.steps, lr=sb.lr,
                     grad_accum=max(1, self.cfg.grad_accum))


def stage_b_params(mods: StageModules, extra_names: set[str]) -> dict[str, nn.Parameter]:
    """KB modules (query, value, gate; the key MLP when the encoder trains), LoRA adapters, and
    unfrozen top-layer parameters, by holder name."""
    params = mods.params(query=True, value=True, keys=mods.cfg.stage_a.train_kv_encoder, gate=True)
    if not mods.cfg.stage_a.train_kv_encoder:
        params = {n: p for n, p in params.items() if not n.startswith("kv.")}
    for name, p in mods.holder.named_parameters():
        if ADAPTER in name.split(".") or name in extra_names:
            params[name] = p
    return params


def save_stage_b_outputs(mods: StageModules, run_dir: Path, extra_names: set[str], targets: list[str]) -> None:
    """kb_final.safetensors (kb_ tensors incl. kb_lora), and the unfrozen layers when mode=unfreeze."""
    from safetensors.torch import save_file

    save_kb_checkpoint(mods.model, mods.cfg, run_dir / "kb_final.safetensors")
    if extra_names:
        state = {n: t.detach().contiguous() for n, t in mods.holder.state_dict().items() if n in extra_names}
        save_file(state, str(run_dir / "top_layers.safetensors"))
    (run_dir / "stage_b_adapter.json").write_text(json.dumps(
        {"mode": mods.cfg.stage_b.mode, "adapter": ADAPTER, "lora_targets": targets,
         "unfrozen": sorted(extra_names)}, indent=1), encoding="utf-8")


def is_stage_b_name(extra_names: set[str]):
    """Checkpoint selection for Stage B: kb_ names plus unfrozen top-layer parameters."""
    return lambda name: is_kb_name(name) or name in extra_names


def load_stage_a(model: nn.Module, init_from: str | Path) -> dict:
    """Load a Stage A run folder's kb_final.safetensors (or a checkpoint file) into the model."""
    path = Path(init_from)
    if path.is_dir():
        path = path / "kb_final.safetensors"
    return load_kb_checkpoint(model, path)


def run_stage_b(inp: Any, run_dir: str | Path | None = None, resume: bool = True, progress: bool = True) -> dict:
    """Stage B on top of a Stage A run (`stage_b.init_from`, default the config's output_dir)."""
    import numpy as np

    from kblampp.kv_encoder import load_kv_encoder
    from kblampp.training.loop import Trainer, make_accelerator
    from kblampp.training.stage_a import _subset, build_model

    cfg = inp.cfg
    sb = cfg.stage_b
    init = Path(sb.init_from or cfg.output_dir)
    out_dir = Path(run_dir or Path(cfg.output_dir) / "stage_b")
    if sb.mode not in ("lora", "unfreeze"):
        raise ValueError(f"stage_b.mode: {sb.mode!r} is not one of lora, unfreeze")
    acc = make_accelerator(cfg)
    if acc.device.type == "cuda" and cfg.quantization is None:  # one GPU per process
        inp.backbone.to(acc.device)
    model = build_model(cfg, inp.backbone, inp.d_ctx)
    load_stage_a(model, init)
    kv = inp.kv
    if (init / "kv_encoder.safetensors").is_file():
        kv = load_kv_encoder(init / "kv_encoder.safetensors")
    targets: list[str] = []
    extra: set[str] = set()
    if sb.mode == "lora":
        targets = add_lora(model.backbone, cfg)
    else:
        extra = {f"model.backbone.{n}" for n in unfreeze_names(model.backbone, sb.lora_layers)}
    for p in list(model.parameters()) + list(kv.parameters()):
        p.requires_grad_(False)
    device = next(inp.backbone.parameters()).device
    for mod in (model.kb_layers, model.kb_copy_gate, kv):
        mod.to(device)
    mods = StageModules(cfg, model, kv, inp.table.to(device))
    trainer = Trainer(cfg, mods.holder, out_dir, acc, progress, select=is_stage_b_name(extra))
    train = _subset(inp.train_qa, cfg.stage_a.max_train_questions, cfg.seed)
    ds = QADataset(train, inp.tokenizer, np.zeros((len(train), 1), np.float32), cfg.max_seq_len)
    ds.set_context(inp.embed([r.question for r in train]))
    sbt = StageBTrainer(mods, ds, inp.tail_table, acc.process_index, acc.num_processes)
    result = trainer.run(sbt.phase(stage_b_params(mods, extra)), resume)
    if acc.is_main_process:
        save_stage_b_outputs(mods, out_dir, extra, targets)
    return {"stage_b": result, "lora_targets": targets, "unfrozen": len(extra), "run_dir": str(out_dir)}


def load_stage_b(model: nn.Module, run_dir: str | Path) -> dict:
    """Rebuild a Stage B model for evaluation: inject the same `kb_lora` adapters (from
    stage_b_adapter.json), then load kb_final.safetensors (and top_layers.safetensors if unfrozen)."""
    from peft import LoraConfig, inject_adapter_in_model
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    info = json.loads((run_dir / "stage_b_adapter.json").read_text(encoding="utf-8"))
    if info["lora_targets"]:
        from kblampp.config import config_from_dict
        from kblampp.kb_params import read_kb_checkpoint

        _, meta = read_kb_checkpoint(run_dir / "kb_final.safetensors")
        sb = config_from_dict(json.loads(meta["config"])).stage_b
        inject_adapter_in_model(LoraConfig(r=sb.lora_r, lora_alpha=sb.lora_alpha, lora_dropout=sb.lora_dropout,
                                           target_modules=info["lora_targets"], bias="none"),
                                model.backbone, adapter_name=ADAPTER)
    cfg = load_kb_checkpoint(model, run_dir / "kb_final.safetensors")
    if info["unfrozen"]:
        state = load_file(str(run_dir / "top_layers.safetensors"))
        own = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                own[name.removeprefix("model.")].copy_(value)
    return cfg
