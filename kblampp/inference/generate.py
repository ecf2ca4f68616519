"""Batched greedy generation shared by every evaluation row.

Every row (backbone alone, RAG, oracle context, each KBLaM++ variant) calls `generate_rows` with
prompts from the ONE prompt builder (`kblampp.backbone.build_prompt`), the same new-token budget, the
same stop rule and the same answer line; a row differs only in its prompts (facts written in or not)
and in the per-batch `request` hook (the KB context and the answer head's logits processor).

Only the output's first line is scored, so a sequence stops at its end-of-turn token or at the first
newline after some text (`FirstLineStop`), and a batch stops when every sequence has: tokens after
the answer line are never computed.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from kblampp.metrics import answer_line
from kblampp.progress import progress_bar

# (row indices of the batch, the tokenized batch) -> context manager yielding extra generate() kwargs
RequestHook = Callable[[list[int], dict[str, torch.Tensor]], ContextManager[dict[str, Any]]]


@dataclass
class Generation:
    """One row's output for one question: raw text, its answer line (what is scored), prompt tokens."""

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


_LINE_TABLES: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def line_tables(tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per vocabulary id (cached per tokenizer): (has text, has a newline, ends a line it started)."""
    key = id(tokenizer)
    if key not in _LINE_TABLES:
        size = max(len(tokenizer), int(getattr(tokenizer, "vocab_size", 0) or 0))
        text = [tokenizer.decode([i]) for i in range(size)]
        has_text = torch.tensor([bool(t.strip()) for t in text])
        has_newline = torch.tensor(["\n" in t for t in text])
        ends_own_line = torch.tensor([bool(t.split("\n", 1)[0].strip()) and "\n" in t for t in text])
        _LINE_TABLES[key] = (has_text, has_newline, ends_own_line)
    return _LINE_TABLES[key]


class FirstLineStop(StoppingCriteria):
    """StoppingCriteria: a sequence is done once its answer line is complete (a newline after some
    generated text). Leading blank lines do not stop it: the answer line is the first non-empty one."""

    def __init__(self, tokenizer: Any, prompt_len: int):
        self.has_text, self.has_newline, self.ends_own_line = line_tables(tokenizer)
        self.prompt_len = prompt_len
        self.seen_text: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        if input_ids.shape[1] <= self.prompt_len:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        last = input_ids[:, -1].cpu().clamp(0, self.has_text.shape[0] - 1)
        seen = torch.zeros_like(last, dtype=torch.bool) if self.seen_text is None else self.seen_text
        done = (seen & self.has_newline[last]) | self.ends_own_line[last]
        self.seen_text = seen | self.has_text[last]
        return done.to(input_ids.device)


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
def generate_rows(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int | Sequence[int],
                  batch_size: int = 16, request: RequestHook | None = None, desc: str = "generate",
                  progress: bool = True, questions: Sequence[str] | None = None) -> list[Generation]:
    """Greedy answers for `prompts` (input order kept). Prompts are batched by length to cut padding;
    `request(indices, batch)` wraps each generate() call (KB context, logits processors). A sequence
    stops at the end-of-turn token or once its first line is complete (`FirstLineStop`); `questions`
    is accepted for callers that pass it and only checked for length. `max_new_tokens` may be one
    budget per prompt (a served batch): a batch runs to its largest and each row keeps its own first
    tokens, which greedy decoding makes the same as stopping there."""
    if questions is not None and len(questions) != len(prompts):
        raise ValueError(f"questions: {len(questions)} for {len(prompts)} prompts")
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts):
        raise ValueError(f"max_new_tokens: {len(budgets)} budgets for {len(prompts)} prompts")
    if any(b < 1 for b in budgets):
        raise ValueError(f"max_new_tokens: must be >= 1, got {min(budgets)}")
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
        first_line = StoppingCriteriaList([FirstLineStop(tokenizer, batch["input_ids"].shape[1])])
        with hook(idx, batch) as extra:
            out = model.generate(**batch, max_new_tokens=max(budgets[i] for i in idx), do_sample=False, num_beams=1,
                                 eos_token_id=stop, pad_token_id=pad, stopping_criteria=first_line, **extra)
        new = out[:, batch["input_ids"].shape[1]:]
        for row, i in enumerate(idx):
            text = tokenizer.decode(new[row, :budgets[i]], skip_special_tokens=True)
            results[i] = Generation(output=text, pred=answer_line(text), prompt_tokens=lengths[i])
        bar.update(len(idx))
    bar.close()
    return [r for r in results if r is not None]
