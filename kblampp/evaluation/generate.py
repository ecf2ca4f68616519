"""Batched greedy generation shared by every evaluation row.

Every row (backbone alone, RAG, oracle context, each KBLaM++ variant) calls `generate_rows` with
prompts from the ONE prompt builder (`kblampp.backbone.build_prompt`), the same new-token budget, the
same stop token and the same answer extraction; a row differs only in its prompts (facts written in
or not) and in the per-batch `request` hook (the KB context and the answer head's logits processor).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
from kblampp.progress import progress_bar

from kblampp.metrics import extract_answer

# (row indices of the batch, the tokenized batch) -> context manager yielding extra generate() kwargs
RequestHook = Callable[[list[int], dict[str, torch.Tensor]], ContextManager[dict[str, Any]]]


@dataclass
class Generation:
    """One row's output for one question: raw text, extracted answer, prompt length in tokens."""

    output: str
    pred: str
    prompt_tokens: int


def stop_token_id(tokenizer: Any) -> int:
    """The end-of-turn token (ChatML <|im_end|>, Llama-3 <|eot_id|>), else eos."""
    try:
        from kblampp.backbone import end_of_turn_id
    except ImportError:  # pragma: no cover - backbone.py is part of the package
        end_of_turn_id = None
    if end_of_turn_id is not None:
        return int(end_of_turn_id(tokenizer))
    return int(tokenizer.eos_token_id)


@contextlib.contextmanager
def _no_request(indices: list[int], batch: dict[str, torch.Tensor]) -> Iterator[dict[str, Any]]:
    yield {}


def _pad_id(tokenizer: Any) -> int:
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise ValueError("tokenizer has no pad and no eos token; set tokenizer.pad_token")
    return int(pid)


def tokenize_left(tokenizer: Any, prompts: Sequence[str], device: torch.device | str) -> dict[str, torch.Tensor]:
    """Left-padded input_ids / attention_mask (the last prompt token is at position -1 in every row)."""
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(x) for x in ids)
    pad = _pad_id(tokenizer)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        if not seq:
            raise ValueError(f"prompt {row} of the batch tokenizes to nothing")
        input_ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


@torch.inference_mode()
def generate_rows(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                  batch_size: int = 16, request: RequestHook | None = None, desc: str = "generate",
                  progress: bool = True, questions: Sequence[str] | None = None) -> list[Generation]:
    """Greedy answers for `prompts` (input order kept). Prompts are batched by length to cut padding;
    `request(indices, batch)` wraps each generate() call (KB context, logits processors); with
    `questions`, the answer extraction may cut a sentence-like output to its answer span."""
    if questions is not None and len(questions) != len(prompts):
        raise ValueError(f"questions: {len(questions)} for {len(prompts)} prompts")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    hook = request or _no_request
    device = next(model.parameters()).device
    stop, pad = stop_token_id(tokenizer), _pad_id(tokenizer)
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    results: list[Generation | None] = [None] * len(prompts)
    bar = progress_bar(total=len(prompts), desc=desc, unit="q", disable=not progress)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = tokenize_left(tokenizer, [prompts[i] for i in idx], device)
        with hook(idx, batch) as extra:
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 eos_token_id=stop, pad_token_id=pad, **extra)
        new = out[:, batch["input_ids"].shape[1]:]
        for row, i in enumerate(idx):
            text = tokenizer.decode(new[row], skip_special_tokens=True)
            question = None if questions is None else questions[i]
            results[i] = Generation(output=text, pred=extract_answer(text, question), prompt_tokens=lengths[i])
        bar.update(len(idx))
    bar.close()
    return [r for r in results if r is not None]
