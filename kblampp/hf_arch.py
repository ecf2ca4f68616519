"""The one module that knows Hugging Face attribute names (layers, self_attn, hidden_size, ...).

Everything else asks this module, so supporting a new architecture means editing one file. Llama and
Qwen2 share one code path: `<CausalLM>.model.layers[i].self_attn`, whose forward takes the already
normalised `hidden_states` and (transformers 5.x) returns `(attn_output, attn_weights)`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kblampp.config import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
ATTN_ATTR = "self_attn"


class UnsupportedArchitectureError(ConfigError):
    """The backbone's model_type has no known layout for KB injection."""


def unwrap(model: nn.Module) -> nn.Module:
    """The plain HF causal LM inside a peft wrapper (Stage B LoRA) or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def hf_config(model: nn.Module | Any) -> Any:
    """The HF config of a model (peft-wrapped or not); a bare config is returned as it is."""
    if not isinstance(model, nn.Module) and hasattr(model, "model_type"):
        return model
    config = getattr(unwrap(model), "config", None)
    if config is None:
        raise UnsupportedArchitectureError(f"{type(model).__name__} has no Hugging Face config")
    return config


def model_type(model: nn.Module) -> str:
    return str(getattr(hf_config(model), "model_type", "<unknown>"))


def check_supported(model: nn.Module) -> None:
    """Raise a clear error for any architecture other than the supported ones."""
    kind = model_type(model)
    if kind not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"backbone model_type {kind!r} ({type(unwrap(model)).__name__}) is not supported for KB "
            f"injection (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if not isinstance(getattr(getattr(unwrap(model), "model", None), "layers", None), nn.ModuleList):
        raise UnsupportedArchitectureError(
            f"backbone {type(unwrap(model)).__name__} has no model.layers; pass the *ForCausalLM model")


def hidden_size(model: nn.Module | Any) -> int:
    return int(hf_config(model).hidden_size)


def num_layers(model: nn.Module | Any) -> int:
    return int(hf_config(model).num_hidden_layers)


def vocab_size(model: nn.Module | Any) -> int:
    return int(hf_config(model).vocab_size)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    check_supported(model)
    return unwrap(model).model.layers


def get_attention(model: nn.Module, layer_idx: int) -> nn.Module:
    return getattr(decoder_layers(model)[layer_idx], ATTN_ATTR)


def set_attention(model: nn.Module, layer_idx: int, module: nn.Module) -> None:
    setattr(decoder_layers(model)[layer_idx], ATTN_ATTR, module)


def decoder_layer(model: nn.Module, layer_idx: int) -> nn.Module:
    return decoder_layers(model)[layer_idx]


def input_norm(model: nn.Module, layer_idx: int) -> nn.Module:
    """The RMSNorm whose output `self_attn` of this layer reads."""
    return decoder_layers(model)[layer_idx].input_layernorm


def after_attention(model: nn.Module, layer_idx: int, residual: torch.Tensor) -> torch.Tensor:
    """The rest of a decoder layer once attention has been added to the residual stream:
    residual + mlp(post_attention_layernorm(residual)). Llama and Qwen2 share this layout."""
    layer = decoder_layers(model)[layer_idx]
    return residual + layer.mlp(layer.post_attention_layernorm(residual))


def input_embeddings(model: nn.Module) -> nn.Embedding:
    return unwrap(model).get_input_embeddings()


def lm_head(model: nn.Module) -> nn.Module:
    return unwrap(model).get_output_embeddings()


def attention_hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    """The normalised hidden state passed to `self_attn` (keyword in HF 5.x, positional allowed)."""
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    if args:
        return args[0]
    raise TypeError("attention called without hidden_states")


def cached_length(kwargs: dict, layer_idx: int) -> int:
    """Positions already in this layer's KV cache when `self_attn` is called (0 without a cache)."""
    cache = kwargs.get("past_key_values")
    return 0 if cache is None else int(cache.get_seq_length(layer_idx))


def add_to_attention_output(output: Any, delta: torch.Tensor, span: slice | None = None) -> Any:
    """Add `delta` to the attention output (element 0 of the tuple), passing everything else through;
    with `span`, delta (B, T', d) goes to those positions only and the others are left bit for bit."""
    attn = output[0] if isinstance(output, tuple) else output
    if span is None:
        fused = attn + delta.to(attn.dtype)
    else:
        fused = torch.cat([attn[:, :span.start], attn[:, span] + delta.to(attn.dtype), attn[:, span.stop:]], dim=1)
    return (fused,) + output[1:] if isinstance(output, tuple) else fused
