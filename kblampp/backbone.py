"""Backbone loading (embedded SmolLM2, hub ids, local paths; optional 4-bit NF4) and the prompt.

`build_prompt` is the one place that turns a question into model input, so every evaluation row
(backbone alone, RAG, oracle, KBLaM++) gets the same instruction and chat template.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from kblampp import hf_arch
from kblampp.config import ConfigError, KBConfig
from kblampp.embedded import embedded_backbone_dir, is_embedded
from kblampp.schema import Fact
from kblampp.synth.families import DEFAULT_ABSTAIN_ANSWER

log = logging.getLogger(__name__)



def answer_instruction(abstain_answer: str = DEFAULT_ABSTAIN_ANSWER) -> str:
    """The one short-answer instruction of every row; it names the answer for "not known" (the
    config's `abstain_answer`), so prompted rows can abstain the way the KB rows do."""
    return ("Answer the question with only the answer itself (a name, a place, a date or a number). "
            f'Do not write a sentence and do not explain. If the answer is not known, answer "{abstain_answer}".')


SHORT_ANSWER_INSTRUCTION = answer_instruction()
CONTEXT_INSTRUCTION = "Facts that may help:"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
QUANTIZATIONS = (None, "4bit")
# Pad candidates when a tokenizer has none (or pads with its end-of-turn token, which would hide the
# stop token from a loss masked by pad id): dedicated special tokens that never appear in a chat turn.
PAD_CANDIDATES = ("<|endoftext|>", "<|finetune_right_pad_id|>", "<pad>", "<|pad|>")
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")


def resolve_backbone_source(cfg: KBConfig) -> str:
    """`embedded:` names -> the converted cache folder; existing paths -> str path; else a hub id."""
    spec = cfg.backbone.strip()
    if not spec:
        raise ConfigError("backbone: empty value")
    if is_embedded(spec):
        return str(embedded_backbone_dir(spec, cfg.cache_dir))
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"backbone: {path} has no config.json (not a transformers model folder)")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ConfigError(f"backbone: local path {spec!r} does not exist")
    return spec


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that closes an assistant turn (ChatML <|im_end|>, Llama-3 <|eot_id|>), else eos."""
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in vocab:
            return int(vocab[token])
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer {type(tokenizer).__name__} has neither an end-of-turn nor an eos token")
    return int(tokenizer.eos_token_id)


def ensure_pad_token(tokenizer: Any) -> None:
    """Give the tokenizer a pad token that is not its end-of-turn token, where it has one to spare."""
    eot = end_of_turn_id(tokenizer)
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eot:
        return
    vocab = tokenizer.get_vocab()
    for token in PAD_CANDIDATES + ((tokenizer.unk_token,) if tokenizer.unk_token else ()):
        if token in vocab and vocab[token] != eot:
            tokenizer.pad_token = token
            return
    if tokenizer.pad_token_id is None:  # last resort: pad = eos; attention masks still tell them apart
        log.warning("tokenizer has no spare special token; padding with eos %r", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token


def load_tokenizer(source: str) -> Any:
    """The backbone's tokenizer with a pad token and left padding (batched generation)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ConfigError(f"backbone: cannot load the tokenizer from {source!r} ({err})") from err
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "left"
    return tokenizer


def check_backbone(cfg: KBConfig, model_or_config: Any, source: str = "") -> None:
    """d_model and inject layers against the backbone (a model, or an HF config before the load)."""
    name = source or cfg.backbone
    d_model, n_layers = hf_arch.hidden_size(model_or_config), hf_arch.num_layers(model_or_config)
    if cfg.d_model is not None and cfg.d_model != d_model:
        raise ConfigError(
            f"d_model: config says {cfg.d_model} but backbone {name!r} has hidden size {d_model}; "
            f"remove d_model from the config or set it to {d_model}")
    if not cfg.inject_layers:
        raise ConfigError("inject_layers: empty; name at least one decoder layer")
    for i, layer in enumerate(cfg.inject_layers):
        if not 0 <= layer < n_layers:
            raise ConfigError(
                f"inject_layers[{i}]: layer {layer} is out of range for backbone {name!r} with "
                f"{n_layers} layers (valid: 0..{n_layers - 1})")
    if len(set(cfg.inject_layers)) != len(cfg.inject_layers):
        raise ConfigError(f"inject_layers: duplicate layer in {cfg.inject_layers}")


def _quantization_config(cfg: KBConfig, dtype: torch.dtype) -> Any:
    if cfg.quantization not in QUANTIZATIONS:
        raise ConfigError(f"quantization: {cfg.quantization!r} is not supported (use null or '4bit')")
    if cfg.quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    # NF4 with double quantisation; compute in the configured dtype (float32 on CPU)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)


def load_backbone(cfg: KBConfig) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for cfg.backbone, in cfg.dtype on cfg.device, 4-bit NF4 when asked.

    The backbone is checked against d_model and inject_layers before its weights are read.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype: {cfg.dtype!r} is not one of {', '.join(DTYPES)}")
    dtype = DTYPES[cfg.dtype]
    quant = _quantization_config(cfg, dtype)
    source = resolve_backbone_source(cfg)
    try:
        hf_cfg = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ConfigError(f"backbone: cannot load {cfg.backbone!r} ({err})") from err
    check_backbone(cfg, hf_cfg, cfg.backbone)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": cfg.device})
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if quant is None:
        model = model.to(cfg.device)
    hf_arch.check_supported(model)
    tokenizer = load_tokenizer(source)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def format_fact(fact: Fact | str) -> str:
    """One line of prompt context: the triple and its time window (short, so small models copy it)."""
    if isinstance(fact, str):
        return fact
    when = ""
    if fact.start or fact.end:
        when = f" (from {fact.start or 'unknown'} to {fact.end or 'now'})"
    return f"{fact.head_name} | {fact.relation_name} | {fact.tail_name}{when}"


def build_prompt(tokenizer: Any, question: str, instruction: str = SHORT_ANSWER_INSTRUCTION,
                 context_facts: Sequence[Fact | str] | None = None) -> str:
    """The chat-templated prompt (system = instruction, user = optional facts + question), ready
    for the assistant's answer; tokenize it with add_special_tokens=False."""
    if not question.strip():
        raise ValueError("build_prompt: empty question")
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                          "use an instruct/chat backbone")
    user = question.strip()
    if context_facts:
        lines = "\n".join(f"- {format_fact(f)}" for f in context_facts)
        user = f"{CONTEXT_INSTRUCTION}\n{lines}\n\nQuestion: {user}"
    messages = [{"role": "system", "content": instruction}, {"role": "user", "content": user}]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # templates without a system role (jinja raises its own error types)
        if "system" not in str(err).lower():
            raise
        merged = [{"role": "user", "content": f"{instruction}\n\n{user}"}]
        return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
