"""Cached inputs of the retrieval phase: the frozen backbone's state entering the first inject layer
at each question's last prompt token, and the question embeddings e_q.

The backbone is frozen and the KB modules act only from the inject layer on, so these states never
change during Stage A: one forward per question (stopped early at the inject layer by a hook) serves
every contrastive step. Stored as safetensors in the run folder, keyed by a hash of (backbone, layer,
prompts), so a rerun reuses them.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from kblampp.progress import progress_bar

from kblampp import hf_arch


class _StopForward(Exception):
    """Raised by the hook once the inject layer's input is captured: the top layers never run."""


def cache_key(backbone_name: str, layer: int, prompts: Sequence[Sequence[int]], extra: str = "") -> str:
    """sha256 (first 20 hex) over the backbone name, the layer and every prompt's token ids."""
    digest = hashlib.sha256(f"{backbone_name}|{layer}|{extra}|".encode())
    for ids in prompts:
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:20]


def common_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix every prompt shares (the system prompt), leaving each >= 1 own token."""
    if not prompts:
        return 0
    first, n = list(prompts[0]), min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


class PrefixCache:
    """KV cache of the shared prompt prefix, computed once (up to `stop_layer` when given) and copied
    per batch, so each question only runs its own tokens. Causal attention makes the states equal
    (to float tolerance) to a full forward over prefix + suffix."""

    def __init__(self, backbone: torch.nn.Module, prefix: Sequence[int], stop_layer: int | None = None):
        from transformers import DynamicCache

        self.length = len(prefix)
        self.cache = DynamicCache() if self.length else None
        if not self.length:
            return
        device = next(backbone.parameters()).device
        handle = None
        if stop_layer is not None:
            def stop(_m: Any, _args: tuple, _kwargs: dict) -> None:
                raise _StopForward
            handle = hf_arch.get_attention(backbone, stop_layer).register_forward_pre_hook(stop, with_kwargs=True)
        try:
            backbone(input_ids=torch.tensor([list(prefix)], device=device), past_key_values=self.cache, use_cache=True)
        except _StopForward:
            pass
        finally:
            if handle is not None:
                handle.remove()

    def for_batch(self, batch: int) -> Any:
        if self.cache is None:
            return None
        import copy

        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(batch)
        return cache

    def run(self, backbone: torch.nn.Module, suffix_ids: torch.Tensor, suffix_mask: torch.Tensor) -> Any:
        """Forward over right-padded suffixes (B, S) after the shared prefix."""
        bsz = suffix_ids.shape[0]
        mask = torch.cat([torch.ones(bsz, self.length, dtype=suffix_mask.dtype, device=suffix_mask.device),
                          suffix_mask], dim=1)
        cache = self.for_batch(bsz)
        return backbone(input_ids=suffix_ids, attention_mask=mask, past_key_values=cache, use_cache=cache is not None)


def _suffix_batches(prompts: Sequence[Sequence[int]], plen: int, pad: int, batch_size: int
                    ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(rows, ids, mask) of right-padded prompt suffixes after the shared prefix, in length-sorted batches."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in rows) - plen
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, i in enumerate(rows):
            own = list(prompts[i][plen:])
            ids[b, :len(own)] = torch.tensor(own, dtype=torch.long)
            mask[b, :len(own)] = 1
        yield rows, ids, mask


def _captured_batches(backbone: torch.nn.Module, prefix: "PrefixCache", prompts: Sequence[Sequence[int]], plen: int,
                      pad: int, batch_size: int, captured: Any, desc: str, progress: bool) -> Iterator[list[int]]:
    """Run the prompt suffixes batch by batch after the shared prefix (the hooks fill `captured`,
    emptied before each batch; a hook may stop the forward early) and yield each batch's rows."""
    device = next(backbone.parameters()).device
    bar = progress_bar(total=len(prompts), desc=desc, unit="q", disable=not progress)
    for rows, ids, mask in _suffix_batches(prompts, plen, pad, batch_size):
        captured.clear()
        try:
            prefix.run(backbone, ids.to(device), mask.to(device))
        except _StopForward:
            pass
        yield rows
        bar.update(len(rows))
    bar.close()


@torch.inference_mode()
def inject_layer_states(backbone: torch.nn.Module, prompts: Sequence[Sequence[int]], layer: int, pad: int,
                        batch_size: int = 16, positions: Sequence[Sequence[int]] | None = None,
                        progress: bool = True) -> torch.Tensor:
    """(n, d_model) normalised hidden state that layer `layer`'s attention reads, at each prompt's last
    token (or (n, P, d_model) at the given `positions` per prompt, all of equal count P).

    Prompts are right-padded in length-sorted batches; a pre-hook on the layer's attention captures
    its input and stops the forward, so layers above `layer` are never run."""
    attn = hf_arch.get_attention(backbone, layer)
    captured: list[torch.Tensor] = []

    def hook(_module: Any, args: tuple, kwargs: dict) -> None:
        captured.append(hf_arch.attention_hidden_states(args, kwargs))
        raise _StopForward

    out: torch.Tensor | None = None
    plen = common_prefix_len(prompts)
    prefix = PrefixCache(backbone, list(prompts[0][:plen]), stop_layer=layer)
    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for rows in _captured_batches(backbone, prefix, prompts, plen, pad, batch_size, captured,
                                      f"cache layer-{layer} states", progress):
            if not captured:
                raise RuntimeError(f"layer {layer} attention was not reached during the forward")
            hidden = captured[0].float().cpu()
            if out is None:
                shape = (len(prompts), hidden.shape[-1]) if positions is None else (
                    len(prompts), len(positions[0]), hidden.shape[-1])
                out = torch.zeros(shape)
            for b, i in enumerate(rows):
                if positions is None:
                    out[i] = hidden[b, len(prompts[i]) - 1 - plen]
                else:
                    out[i] = hidden[b, torch.tensor(list(positions[i]), dtype=torch.long) - plen]
    finally:
        handle.remove()
    assert out is not None, "no prompts"
    return out


@torch.inference_mode()
def hop_layer_states(backbone: torch.nn.Module, prompts: Sequence[Sequence[int]], layers: Sequence[int], pad: int,
                     batch_size: int = 16, progress: bool = True) -> dict[str, torch.Tensor]:
    """At each prompt's last token, for every inject layer l: `residual_l` (n, d_model), the residual
    stream entering layer l, and `attn_l` (n, d_model), its attention output (plain backbone). The
    forward stops after the last layer's attention. The hop phase steps the last token's residual
    stream from one inject layer to the next with these (`kblampp.hops.next_inject_input`)."""
    layers = sorted(int(x) for x in layers)
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def residual_hook(name: str):
        def hook(_module: Any, args: tuple, kwargs: dict) -> None:
            captured[name] = hf_arch.attention_hidden_states(args, kwargs)
        return hook

    def attn_hook(name: str, stop: bool):
        def hook(_module: Any, _args: tuple, output: Any) -> None:
            captured[name] = output[0] if isinstance(output, tuple) else output
            if stop:
                raise _StopForward
        return hook

    plen = common_prefix_len(prompts)
    prefix = PrefixCache(backbone, list(prompts[0][:plen]), stop_layer=layers[-1] + 1
                         if layers[-1] + 1 < hf_arch.num_layers(backbone) else None)
    out: dict[str, torch.Tensor] = {}
    for layer in layers:
        handles.append(hf_arch.decoder_layer(backbone, layer).register_forward_pre_hook(
            residual_hook(f"residual_{layer}"), with_kwargs=True))
        handles.append(hf_arch.get_attention(backbone, layer).register_forward_hook(
            attn_hook(f"attn_{layer}", layer == layers[-1])))
    try:
        for rows in _captured_batches(backbone, prefix, prompts, plen, pad, batch_size, captured,
                                      f"cache layers {layers} states", progress):
            for name, value in captured.items():
                value = value.float().cpu()
                if name not in out:
                    out[name] = torch.zeros(len(prompts), value.shape[-1])
                for b, i in enumerate(rows):
                    out[name][i] = value[b, len(prompts[i]) - 1 - plen]
    finally:
        for handle in handles:
            handle.remove()
    missing = [f"{k}_{x}" for x in layers for k in ("residual", "attn") if f"{k}_{x}" not in out]
    if missing:
        raise RuntimeError(f"hop_layer_states: {', '.join(missing)} not reached during the forward")
    return out


def save_cache(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Atomic safetensors write with JSON metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"meta": json.dumps(meta)})
    os.replace(tmp, path)
    return path


def load_cache(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads((handle.metadata() or {}).get("meta", "{}"))
        return {k: handle.get_tensor(k) for k in handle.keys()}, meta


def cached_question_states(cache_dir: str | Path, backbone: torch.nn.Module, backbone_name: str,
                           prompts: Sequence[Sequence[int]], questions: Sequence[str], layer: int, pad: int,
                           embed: Any, batch_size: int = 16, progress: bool = True,
                           hop_layers: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """{"hidden" (n, d_model), "e_q" (n, d_ctx)} from `cache_dir/<hash>.safetensors`, computed if absent.

    `embed(list[str]) -> np.ndarray` gives the question embeddings (the facts' embedding model). With
    `hop_layers` (every inject layer, `layer` the first) the same single forward also keeps each hop
    layer's `residual_l` / `attn_l` (`hop_layer_states`), and `hidden` is layer `layer`'s input norm of
    its residual."""
    name = getattr(embed, "__qualname__", "") or type(embed).__name__
    hops = sorted(int(x) for x in hop_layers) if hop_layers is not None and len(hop_layers) > 1 else None
    if hops is not None and hops[0] != layer:
        raise ValueError(f"hop_layers {hops} must start with the cached layer {layer}")
    tag = "" if hops is None else "|hops" + ",".join(map(str, hops))
    texts = hashlib.sha256("\n".join(questions).encode()).hexdigest()[:12]  # e_q's texts may differ from the prompts'
    key = cache_key(backbone_name, layer, prompts, extra=f"{name}|{len(questions)}|{texts}{tag}")
    path = Path(cache_dir) / f"states_{key}.safetensors"
    if path.exists():
        tensors, meta = load_cache(path)
        if meta.get("n") == len(prompts) and "hidden" in tensors and "e_q" in tensors:
            return tensors
    if hops is None:
        tensors = {"hidden": inject_layer_states(backbone, prompts, layer, pad, batch_size, progress=progress)}
    else:
        tensors = hop_layer_states(backbone, prompts, hops, pad, batch_size, progress=progress)
        norm = hf_arch.input_norm(backbone, layer)
        weight = next(norm.parameters())
        with torch.no_grad():
            tensors["hidden"] = norm(tensors[f"residual_{layer}"].to(weight.device, weight.dtype)).float().cpu()
    e_q = torch.from_numpy(np.ascontiguousarray(embed(list(questions)), dtype=np.float32))
    tensors["e_q"] = e_q
    save_cache(path, tensors, {"n": len(prompts), "backbone": backbone_name, "layer": layer, "key": key})
    return tensors
