"""Batched greedy generation shared by every evaluation row.

Every row (backbone alone, RAG, oracle context, each KBLaM++ variant) calls `generate_rows` with
prompts from the ONE prompt builder (`kblampp.backbone.build_prompt`), the same new-token budget, the
same stop rule and the same answer line; a row differs only in its prompts (facts written in or not)
and in the per-batch `request` hook (the KB context and the answer head's logits processor).

Only the output's first line is scored, so a sequence stops at its end-of-turn token or at the first
newline after some text (`FirstLineStop`), and a batch stops when every sequence has: tokens after
the answer line are never computed.

Rows without a request (the prompt rows) compute the prompts' common first tokens (the chat template's
system instruction) once and start every batch from that cache (`shared_prefix_cache`): a causal model's
states at those positions do not depend on what follows, and each sequence keeps its positions
(padding sits between the prefix and the rest, masked). KB rows share it only with
`retrieval_positions` "last_prompt" (`share_prefix`): otherwise the knowledge branch reads each
question's embedding at every position. Rows whose requests differ only in their logits
processors (`generate_with_followers`) share one pass over the prompt instead.
"""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from kblampp.kb_context import prefix_shareable
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
    return left_padded(tokenizer, [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts], device)


def left_padded(tokenizer: Any, ids: Sequence[Sequence[int]], device: torch.device | str) -> dict[str, torch.Tensor]:
    """`tokenize_left` of prompts already tokenized."""
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


def common_prefix_len(token_ids: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix every prompt starts with, leaving each prompt at least one token of
    its own (the last prompt token must be computed in the batch: its logits start the answer)."""
    if not token_ids:
        return 0
    n = min(len(x) for x in token_ids) - 1
    first = token_ids[0]
    for seq in token_ids[1:]:
        n = next((j for j in range(n) if seq[j] != first[j]), n)
    return max(n, 0)


def shared_prefix_cache(model: Any, prefix: Sequence[int], device: torch.device | str) -> Any:
    """The KV cache (batch 1) of `prefix`, computed once with the plain model (no KB request)."""
    ids = torch.tensor([list(prefix)], dtype=torch.long, device=device)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
    return out.past_key_values


def with_prefix(batch: dict[str, torch.Tensor], prefix: Sequence[int], cache: Any) -> dict[str, Any]:
    """A left-padded batch of prompt suffixes turned into generate() inputs that start from the prefix
    cache: ids [prefix | pads | suffix], mask [1 | 0 | 1] (positions = cumsum of the mask, as in
    the unshared prompt), and the cache copied and repeated for every row."""
    rows = batch["input_ids"].shape[0]
    head = torch.tensor(list(prefix), dtype=torch.long, device=batch["input_ids"].device).expand(rows, -1)
    ids = torch.cat([head, batch["input_ids"]], dim=1)
    mask = torch.cat([torch.ones_like(head), batch["attention_mask"]], dim=1)
    past = copy.deepcopy(cache)
    past.batch_repeat_interleave(rows)
    return {"input_ids": ids, "attention_mask": mask, "past_key_values": past}


def length_batches(lengths: Sequence[int], max_rows: int, max_tokens: int | None = None) -> list[list[int]]:
    """Prompt indices in batches, shortest prompts first (stable), so a batch holds prompts of similar
    length and little padding: at most `max_rows` prompts and, when given, at most `max_tokens` padded
    prompt tokens (rows x longest prompt; a longer single prompt still gets its own batch). Results
    are written back at these indices, in question order."""
    if max_rows < 1:
        raise ValueError(f"batch_size: must be >= 1, got {max_rows}")
    batches: list[list[int]] = []
    current: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: lengths[j]):
        full = len(current) >= max_rows or (max_tokens is not None and (len(current) + 1) * lengths[i] > max_tokens)
        if current and full:
            batches.append(current)
            current = []
        current.append(i)
    return batches + [current] if current else batches


@torch.inference_mode()
def generate_rows(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int | Sequence[int],
                  batch_size: int = 16, request: RequestHook | None = None, desc: str = "generate",
                  progress: bool = True, questions: Sequence[str] | None = None,
                  batch_tokens: int | None = None, share_prefix: bool | None = None) -> list[Generation]:
    """Greedy answers for `prompts` (input order kept). Prompts are batched by length to cut padding
    (`length_batches`: at most `batch_size` prompts and `batch_tokens` padded prompt tokens);
    `request(indices, batch)` wraps each generate() call (KB context, logits processors). A sequence
    stops at the end-of-turn token or once its first line is complete (`FirstLineStop`); `questions`
    is accepted for callers that pass it and only checked for length. `max_new_tokens` may be one
    budget per prompt (a served batch): a batch runs to its largest and each row keeps its own first
    tokens, which greedy decoding makes the same as stopping there. `share_prefix`: as in
    `generate_with_followers`."""
    if questions is not None and len(questions) != len(prompts):
        raise ValueError(f"questions: {len(questions)} for {len(prompts)} prompts")
    return generate_with_followers(model, tokenizer, prompts, max_new_tokens, batch_size, request, (), desc,
                                   progress, batch_tokens, share_prefix)[0][0]


def _greedy(model: Any, tokenizer: Any, inputs: dict[str, Any], max_new_tokens: int, stop_pad: tuple[int, int],
            extra: dict[str, Any], keep_cache: bool) -> tuple[torch.Tensor, Any]:
    """One greedy generate() call: (new tokens, the cache when `keep_cache`)."""
    width = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         eos_token_id=stop_pad[0], pad_token_id=stop_pad[1],
                         stopping_criteria=StoppingCriteriaList([FirstLineStop(tokenizer, width)]),
                         return_dict_in_generate=keep_cache, **extra)
    if not keep_cache:
        return out[:, width:], None
    return out.sequences[:, width:], out.past_key_values


@torch.inference_mode()
def generate_with_followers(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int | Sequence[int],
                            batch_size: int = 16, request: RequestHook | None = None,
                            followers: Sequence[RequestHook] = (), desc: str = "generate", progress: bool = True,
                            batch_tokens: int | None = None, share_prefix: bool | None = None
                            ) -> tuple[list[list[Generation]], list[float]]:
    """`generate_rows` for `request` and for each follower on the same prompts:
    ([answers of request, answers of follower 1, ...], [seconds of each]).

    A follower must run the same forward passes over the prompt as `request` (rows that differ only in
    their logits processors): it starts from the cache of `request`'s prefill, cut back to all but the
    last prompt token, and computes that token and its own answer (its seconds exclude the prefill).
    `max_new_tokens` may be one budget per prompt (a served batch): a batch runs to its largest and
    each row keeps its own first tokens, which greedy decoding makes the same as stopping there.
    `share_prefix`: start every batch from the prompts' common prefix, computed once without a request
    (default: without a request, or when the model's `retrieval_positions` leave those positions to the
    plain model, `kblampp.kb_context.prefix_shareable`)."""
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts):
        raise ValueError(f"max_new_tokens: {len(budgets)} budgets for {len(prompts)} prompts")
    if any(b < 1 for b in budgets):
        raise ValueError(f"max_new_tokens: must be >= 1, got {min(budgets)}")
    hooks = [request or _no_request, *followers]
    device = next(model.parameters()).device
    stop_pad = stop_token_id(tokenizer), _pad_id(tokenizer)
    token_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    lengths = [len(x) for x in token_ids]
    batches = length_batches(lengths, batch_size, batch_tokens)
    if share_prefix is None:
        share_prefix = request is None or prefix_shareable(getattr(model, "retrieval_positions", "all"))
    shared = common_prefix_len(token_ids) if share_prefix else 0
    prefix, cache = token_ids[0][:shared] if shared else [], None
    if shared:
        cache = shared_prefix_cache(model, prefix, device)
    results: list[list[Generation | None]] = [[None] * len(prompts) for _ in hooks]
    seconds = [0.0] * len(hooks)
    bar = progress_bar(total=len(prompts), desc=desc, unit="q", disable=not progress)
    for idx in batches:
        batch = left_padded(tokenizer, [token_ids[i][shared:] for i in idx], device)
        inputs = batch if cache is None else with_prefix(batch, prefix, cache)
        prompt_cache = None
        for k, hook in enumerate(hooks):
            t0 = time.perf_counter()
            step_inputs = inputs if k == 0 else {"input_ids": inputs["input_ids"],
                                                 "attention_mask": inputs["attention_mask"],
                                                 "past_key_values": copy.deepcopy(prompt_cache)}
            with hook(idx, batch) as extra:
                new, past = _greedy(model, tokenizer, step_inputs, max(budgets[i] for i in idx), stop_pad, extra,
                                    keep_cache=k == 0 and len(hooks) > 1)
            if past is not None:  # keep the prompt's states but its last token (followers recompute it)
                past.crop(-(past.get_seq_length() - (inputs["input_ids"].shape[1] - 1)))
                prompt_cache = past
            for row, i in enumerate(idx):
                text = tokenizer.decode(new[row, :budgets[i]], skip_special_tokens=True)
                results[k][i] = Generation(output=text, pred=answer_line(text), prompt_tokens=lengths[i])
            seconds[k] += time.perf_counter() - t0
        bar.update(len(idx))
    bar.close()
    return [[r for r in rows if r is not None] for rows in results], seconds
