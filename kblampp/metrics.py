"""Answer metrics (SPEC section 7): SQuAD-normalised EM / F1, "gold contained", answer extraction.

Every evaluation row goes through the same `extract_answer` so that a row that rambles is not
scored differently from one that answers tersely; `contained` (normalised gold inside the whole
normalised output, on word boundaries) sits beside EM to show when a model knew but did not stop.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
# Lead-ins a chat model puts before a short answer; matched case-insensitively at the start.
_LEAD_INS = re.compile(
    r"^\s*(?:(?:the\s+)?(?:final\s+|short\s+)?answer\s*(?:is|:)\s*:?|a\s*:|answer\s*-)\s*", re.IGNORECASE)
_WRAPPERS = "\"'`*_ "
# A sentence end: a period after 3+ lowercase letters/digits (so "St. Louis", "J. R." survive).
_SENTENCE_END = re.compile(r"(?<=[a-z0-9]{3})[.!?](?:\s|$)")
# A name or number: capitalised/numeric words, joined by a few lowercase connectors ("University of
# Oslo", "Bank of the West", "Jean de la Fontaine") or hyphens.
_CAP = r"(?:[A-Z][\w'’.-]*|\d[\d.,:/-]*)"
_NAME_RUN = re.compile(rf"{_CAP}(?:\s+(?:(?:of|the|de|la|le|du|van|von|der|and|&|y|da|di)\s+)*{_CAP})*")
_LEADING_ARTICLE = re.compile(r"^(?:the|a|an)\s+", re.IGNORECASE)
_YEAR_SUFFIX = re.compile(r",\s*\d{4}\b")
_MONTH_DAY = re.compile(r"\b(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)\w*\.?\s+\d{1,2}$", re.IGNORECASE)
_FUNCTION_WORDS = {"the", "a", "an", "of", "and", "de", "la", "le", "du", "van", "von", "der", "y", "da", "di",
                   "he", "she", "it", "they", "his", "her", "its", "their", "this", "that", "there", "i",
                   "we", "you", "in", "on", "at", "as", "yes", "no"}


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, fold whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _golds(golds: str | Sequence[str]) -> list[str]:
    """One gold string or a list of aliases; empty lists are a caller error."""
    items = [golds] if isinstance(golds, str) else list(golds)
    if not items:
        raise ValueError("golds: need at least one gold answer")
    return items


def exact_match(pred: str, golds: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold alias, else 0.0."""
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(g) for g in _golds(golds)))


def _f1_one(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def f1_score(pred: str, golds: str | Sequence[str]) -> float:
    """Token-level F1 after normalisation, max over aliases."""
    return max(_f1_one(pred, g) for g in _golds(golds))


def contains_gold(output: str, golds: str | Sequence[str]) -> float:
    """1.0 if any normalised gold occurs in the normalised output on word boundaries ("Ann" is not in
    "Anna"); an empty normalised gold never counts."""
    out = f" {normalize_answer(output)} "
    return float(any(g and f" {g} " in out for g in map(normalize_answer, _golds(golds))))


def _restates(run: str, question_words: set[str]) -> bool:
    """True when every content word of `run` already occurs in the question."""
    words = [w for w in re.findall(r"\w+", run.lower()) if w not in _FUNCTION_WORDS]
    return all(w in question_words for w in words)


def _answer_span(line: str, question: str) -> str | None:
    """In a sentence-like answer, the first name/number run that does not restate the question
    ("The CEO of X in 2004 was Kelly Garrett" -> "Kelly Garrett"); None if there is none."""
    question_words = set(re.findall(r"\w+", question.lower()))
    for match in _NAME_RUN.finditer(line):
        run = _LEADING_ARTICLE.sub("", match.group(0)).strip()
        if run and not _restates(run, question_words):
            year = _YEAR_SUFFIX.match(line, match.end())  # "March 2, 2019"
            return run + year.group(0) if year and _MONTH_DAY.search(run) else run
    return None


def extract_answer(output: str, question: str | None = None) -> str:
    """The short answer in a generation: its first non-empty line, without lead-ins such as
    "The answer is", wrapping quotes/asterisks, or a trailing explanation sentence. Given the
    question, a sentence-like line (4+ words) is cut to its first name/number run that does not
    restate the question, so "Luke Glenn was a member of the Hidden Thistle Tennis Club" scores as
    "Hidden Thistle Tennis Club". Every evaluation row uses this same function."""
    line = next((ln for ln in output.splitlines() if ln.strip(_WRAPPERS + "\t")), "")
    prev = None
    while prev != line:  # "Answer: The answer is X" -> X
        prev = line
        line = _LEAD_INS.sub("", line.strip(_WRAPPERS + "\t"), count=1)
    match = _SENTENCE_END.search(line)
    if match:
        line = line[:match.start()]
    line = line.strip(_WRAPPERS + "\t.,;:")
    if question and len(line.split()) >= 4:
        span = _answer_span(line, question)
        if span:
            return span.strip(_WRAPPERS + "\t.,;:")
    return line


def score_answer(output: str, golds: str | Sequence[str], question: str | None = None) -> dict[str, float | str]:
    """All answer metrics of one raw generation: the extracted answer, em, f1, contained."""
    pred = extract_answer(output, question)
    return {"pred": pred, "em": exact_match(pred, golds), "f1": f1_score(pred, golds),
            "contained": contains_gold(output, golds)}


def mean(values: Iterable[float]) -> float | None:
    """Average, or None for an empty group (the report shows it as a dash)."""
    vals = list(values)
    return sum(vals) / len(vals) if vals else None
