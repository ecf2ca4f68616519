"""Tiny seeded random Llama / Qwen2 causal LMs for fast CPU tests (no hub, no network).

Shape: hidden 64, 2 layers, 4 heads / 2 KV heads, vocab 300. Other test files import
`tiny_llama`, `tiny_qwen2` and `TINY_MODELS`; keep this API stable.
"""
from __future__ import annotations

from typing import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

VOCAB = 300
_COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)


def _build(model_cls: type, config, seed: int) -> PreTrainedModel:
    """Seeded construction so every call with the same seed gives identical weights."""
    config._attn_implementation = "eager"  # deterministic and identical on every machine
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = model_cls(config)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A random 2-layer LlamaForCausalLM (hidden 64)."""
    return _build(LlamaForCausalLM, LlamaConfig(**_COMMON), seed)


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    """A random 2-layer Qwen2ForCausalLM (hidden 64; Qwen2 has q/k/v biases)."""
    return _build(Qwen2ForCausalLM, Qwen2Config(**_COMMON, use_sliding_window=False), seed)


TINY_MODELS: dict[str, Callable[..., PreTrainedModel]] = {"llama": tiny_llama, "qwen2": tiny_qwen2}
