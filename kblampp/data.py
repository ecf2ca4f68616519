"""QA records -> training examples: chat-template prompt, answer tokens with loss, question time and e_q.

Loss is on the answer tokens only (prompt positions get label -100). The prompt is the one every
evaluation row uses (`kblampp.backbone.build_prompt`), so training and evaluation see the same text.
Batches are right-padded: the last prompt token of row b sits at `last_prompt_pos[b]`, where the
query must retrieve before any answer token is written (SPEC section 7).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from kblampp.progress import progress_bar

from kblampp.backbone import build_prompt, end_of_turn_id
from kblampp.schema import QARecord
from kblampp.scorers import kinds_from_windows

IGNORE_INDEX = -100


def build_prompt_text(tokenizer: Any, question: str, instruction: str | None = None) -> str:
    """The evaluation prompt (`kblampp.backbone.build_prompt`, its short-answer instruction by default)."""
    if instruction is None:
        return build_prompt(tokenizer, question)
    return build_prompt(tokenizer, question, instruction=instruction)


def answer_end_id(tokenizer: Any) -> int:
    """Token that ends an answer: the chat template's end-of-turn (ChatML <|im_end|>) else eos."""
    return end_of_turn_id(tokenizer)


def pad_id(tokenizer: Any) -> int:
    """Padding id (GGUF-loaded SmolLM2 has no pad token: fall back to eos)."""
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise ValueError("tokenizer has no pad and no eos token; set tokenizer.pad_token")
    return int(pid)


@dataclass
class Example:
    """One tokenized QA record; `index` is its row in the dataset (and in the hidden-state cache)."""

    index: int
    qid: str
    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    tau: tuple[float, float]  # NaN, NaN = no question time
    supporting: tuple[int, ...]
    answer_fact: int
    qtype: str
    time_kind: int = -1  # index into TIME_KINDS; -1 = read from the window (open start before, open end after)


def answer_fact_of(rec: QARecord) -> int:
    """Index of the fact whose tail is the answer: `answer_fact`, else the last supporting fact."""
    value = rec.raw.get("answer_fact")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not rec.supporting_facts:
        raise ValueError(f"qid {rec.qid}: supporting_facts: empty (no answer fact to train on)")
    return int(rec.supporting_facts[-1])


def answerable_records(records: Sequence[QARecord]) -> list[QARecord]:
    """The records retrieval, the copy gate and the answer CE train on: unanswerable questions have no
    answer fact (supporting_facts empty, answer_fact null), so they are left to the abstention decision."""
    return [r for r in records if r.answerable]


def encode_record(tokenizer: Any, rec: QARecord, index: int, max_seq_len: int,
                  instruction: str | None = None, end_id: int | None = None,
                  time: tuple[float, float, int] | None = None) -> Example:
    """Tokenize prompt + answer + end token; the prompt is cut from the left if it is too long.

    Pass `end_id` when encoding many records (looking it up reads the whole vocabulary). `time` =
    (lo, hi, kind) from the question's typed constraint replaces the record's window when given."""
    prompt_ids = tokenizer.encode(build_prompt_text(tokenizer, rec.question, instruction), add_special_tokens=False)
    end = answer_end_id(tokenizer) if end_id is None else end_id
    answer_ids = tokenizer.encode(rec.answer, add_special_tokens=False) + [end]
    if len(answer_ids) >= max_seq_len:
        raise ValueError(f"qid {rec.qid}: answer: {len(answer_ids)} tokens do not fit max_seq_len={max_seq_len}")
    keep = max_seq_len - len(answer_ids)
    if len(prompt_ids) > keep:
        prompt_ids = prompt_ids[-keep:]
    tau = rec.tau if rec.tau is not None else (math.nan, math.nan)
    kind = -1
    if time is not None:
        tau, kind = (time[0], time[1]), int(time[2])
    return Example(index=index, qid=rec.qid, input_ids=prompt_ids + answer_ids,
                   labels=[IGNORE_INDEX] * len(prompt_ids) + answer_ids, prompt_len=len(prompt_ids),
                   tau=(float(tau[0]), float(tau[1])), supporting=tuple(rec.supporting_facts),
                   answer_fact=answer_fact_of(rec), qtype=rec.type, time_kind=kind)


class QADataset(torch.utils.data.Dataset):
    """Tokenized QA records plus each question's context vector e_q (row-aligned array)."""

    def __init__(self, records: Sequence[QARecord], tokenizer: Any, e_q: np.ndarray, max_seq_len: int,
                 instruction: str | None = None, times: Sequence[tuple[float, float, int]] | None = None):
        if e_q.ndim != 2 or e_q.shape[0] != len(records):
            raise ValueError(f"e_q: expected shape ({len(records)}, d_ctx), got {tuple(e_q.shape)}")
        self.records = list(records)
        end_id = answer_end_id(tokenizer)
        if times is not None and len(times) != len(self.records):
            raise ValueError(f"times: {len(times)} rows for {len(self.records)} records")
        self.examples = [encode_record(tokenizer, r, i, max_seq_len, instruction, end_id,
                                       None if times is None else times[i])
                         for i, r in enumerate(progress_bar(records, desc="tokenize QA", disable=len(records) < 2000))]
        self.e_q = torch.from_numpy(np.ascontiguousarray(e_q, dtype=np.float32))
        self.pad_id = pad_id(tokenizer)

    def __len__(self) -> int:
        return len(self.examples)

    def set_context(self, e_q: np.ndarray | torch.Tensor) -> None:
        """Attach the question embeddings once computed (row-aligned with the records)."""
        e_q = torch.as_tensor(np.asarray(e_q, dtype=np.float32))
        if e_q.ndim != 2 or e_q.shape[0] != len(self.examples):
            raise ValueError(f"e_q: expected shape ({len(self.examples)}, d_ctx), got {tuple(e_q.shape)}")
        self.e_q = e_q.contiguous()

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    def collate(self, batch: Sequence[Example]) -> dict[str, torch.Tensor]:
        return collate(batch, self.pad_id, self.e_q)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Collated batch of the given rows (training loops pick rows by a seeded schedule)."""
        return self.collate([self.examples[int(i)] for i in indices])


def collate(batch: Sequence[Example], pad: int, e_q: torch.Tensor) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row; supporting facts padded with -1."""
    width = max(len(ex.input_ids) for ex in batch)
    n_sup = max(1, max(len(ex.supporting) for ex in batch))
    bsz = len(batch)
    input_ids = torch.full((bsz, width), pad, dtype=torch.long)
    labels = torch.full((bsz, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((bsz, width), dtype=torch.long)
    supporting = torch.full((bsz, n_sup), -1, dtype=torch.long)
    for b, ex in enumerate(batch):
        n = len(ex.input_ids)
        input_ids[b, :n] = torch.tensor(ex.input_ids)
        labels[b, :n] = torch.tensor(ex.labels)
        mask[b, :n] = 1
        supporting[b, :len(ex.supporting)] = torch.tensor(ex.supporting, dtype=torch.long)
    index = torch.tensor([ex.index for ex in batch], dtype=torch.long)
    return {
        "input_ids": input_ids, "attention_mask": mask, "labels": labels,
        "prompt_len": torch.tensor([ex.prompt_len for ex in batch], dtype=torch.long),
        "last_prompt_pos": torch.tensor([ex.prompt_len - 1 for ex in batch], dtype=torch.long),
        "tau": torch.tensor([ex.tau for ex in batch], dtype=torch.float32),
        "time_kind": time_kinds([ex.tau for ex in batch], [ex.time_kind for ex in batch]),
        "e_q": e_q[index], "supporting": supporting,
        "answer_fact": torch.tensor([ex.answer_fact for ex in batch], dtype=torch.long),
        "index": index,
    }


def time_kinds(taus: Sequence[tuple[float, float]], kinds: Sequence[int]) -> torch.Tensor:
    """(B,) long kind ids; rows with kind -1 take the kind their window implies."""
    implied = kinds_from_windows(torch.tensor(list(taus), dtype=torch.float32).reshape(len(taus), 2))
    given = torch.tensor(list(kinds), dtype=torch.long)
    return torch.where(given >= 0, given, implied)


def batch_schedule(n: int, batch_size: int, step: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """Rows of optimizer micro-step `step`: a seeded permutation per epoch, so resume is exact.

    With several processes each takes a disjoint slice of the global batch."""
    if n <= 0:
        raise ValueError("empty dataset")
    global_bs = batch_size * world
    start = step * global_bs
    rows: list[int] = []
    while len(rows) < global_bs:
        epoch, offset = divmod(start + len(rows), n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        rows.extend(perm[offset:offset + global_bs - len(rows)].tolist())
    return rows[rank * batch_size:(rank + 1) * batch_size]
