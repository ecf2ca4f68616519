"""Linking a question to the facts whose head it names: a dictionary of name forms, torch-free.

Why: a fact's key is a trained map of its head's and relation's sentence embeddings. Among 10^6
facts, hundreds of heads embed about as close to the asked one as the asked one itself ("Troy Sims",
"Troy Simms", "Roy Sims"), and the answer fact falls out of the search's top K. The question's own
words name the entity exactly. With `name_link` on, the facts whose head the question names join the
first inject layer's candidates ahead of the searched ones (`KBInjection.select`); the score, the
softmax and the value mix over the kept candidates are unchanged.

A name is matched on lowercased words without punctuation or accents ("Sokolowsko" names Sokołowsko),
whole, with its first name as an initial ("A. Miller" names Alice Miller), or without a trailing
qualifier when two or more words remain ("Palace of the Republic" names "Palace of the Republic,
Berlin"; "German submarine U-66" names "German submarine U-66 (1940)"), as a run of whole words in
the question (`names_head` is the one-pair form, the abstention decision's name check).
"""
from __future__ import annotations

import re
import string
import unicodedata
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np

_POSSESSIVE = re.compile(r"['’]s\b")
_PUNCT = frozenset(string.punctuation) | {"’", "‘", "“", "”", "–", "—"}
_UNDECOMPOSED = str.maketrans("łøđ", "lod")  # letters NFKD does not split into a base and an accent
_QUALIFIER = re.compile(r"\s*(?:\([^()]*\)|,[^,()]*)$")  # "X (1940)", "X, Berlin"


def words(text: str) -> str:
    """Lowercased words of `text` without punctuation, padded with one space on each side (so `in`
    tests whole words). Unlike SQuAD's answer normalisation, articles stay: an initial "A." is a word.
    Accents go ("ł" and "ó" as "l" and "o"): questions often spell a page's name without them."""
    plain = unicodedata.normalize("NFKD", text.lower().translate(_UNDECOMPOSED))
    return f" {' '.join(''.join(ch for ch in plain if ch not in _PUNCT and not unicodedata.combining(ch)).split())} "


@lru_cache(maxsize=1 << 16)
def name_forms(head: str) -> tuple[str, ...]:
    """The head's name as a question may write it: whole, with its first name as an initial, or
    without a trailing qualifier when two or more words are left."""
    head = _POSSESSIVE.sub("", head)
    parts = head.split()
    forms = [words(head)]
    if len(parts) >= 2 and parts[0][:1].isalpha():
        forms.append(words(f"{parts[0][0]}. {' '.join(parts[1:])}"))
    bare = _QUALIFIER.sub("", head)
    if bare != head and len(words(bare).split()) >= 2:
        forms.append(words(bare))
    return tuple(dict.fromkeys(f for f in forms if f.strip()))


def names_head(question: str, head: str) -> bool:
    """Whether the question names this head ("Troy Sims's home" names Troy Sims; "A. Miller" names
    Alice Miller), on `words` (articles kept)."""
    q = words(_POSSESSIVE.sub("", question))
    return any(form in q for form in name_forms(head))


class NameIndex:
    """Name form -> the facts whose head has it. Facts are added and removed as the KB is edited."""

    def __init__(self, heads: Iterable[str] = (), alive: Sequence[bool] | None = None):
        self._facts: dict[str, dict[int, None]] = {}  # form -> fact ids (insertion-ordered set)
        self._forms: dict[int, tuple[str, ...]] = {}  # fact id -> its head's forms
        self._longest = 0  # words in the longest form
        for fact_id, head in enumerate(heads):
            if alive is None or alive[fact_id]:
                self.add(fact_id, head)

    def __len__(self) -> int:
        return len(self._forms)

    def add(self, fact_id: int, head: str) -> None:
        """Index fact `fact_id` under its head's name (an id already indexed is re-indexed)."""
        self.remove(fact_id)
        forms = name_forms(head)
        self._forms[fact_id] = forms
        for form in forms:
            self._facts.setdefault(form, {})[fact_id] = None
            self._longest = max(self._longest, len(form.split()))

    def remove(self, fact_id: int) -> None:
        """Forget fact `fact_id` (a deleted or replaced fact); unknown ids are ignored."""
        for form in self._forms.pop(fact_id, ()):
            facts = self._facts.get(form)
            if facts is not None:
                facts.pop(fact_id, None)
                if not facts:
                    del self._facts[form]

    def link(self, question: str, limit: int | None = None) -> list[int]:
        """The facts whose head `question` names, longest name first, each once (at most `limit`)."""
        tokens = words(_POSSESSIVE.sub("", question)).split()
        out: dict[int, None] = {}
        for n in range(min(self._longest, len(tokens)), 0, -1):
            for start in range(len(tokens) - n + 1):
                for fact_id in self._facts.get(f" {' '.join(tokens[start:start + n])} ", ()):
                    out[fact_id] = None
                    if limit is not None and len(out) >= limit:
                        return list(out)
        return list(out)

    def linked_ids(self, questions: Sequence[str], limit: int) -> np.ndarray:
        """(len(questions), L) int64 linked fact ids per question, -1 padded (L >= 1, L <= limit)."""
        if limit < 1:
            raise ValueError(f"name_link_limit: must be >= 1, got {limit}")
        rows = [self.link(q, limit) for q in questions]
        out = np.full((len(rows), max([1, *map(len, rows)])), -1, dtype=np.int64)
        for i, row in enumerate(rows):
            out[i, :len(row)] = row
        return out
