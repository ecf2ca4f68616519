"""Answer metrics (SPEC section 7): official SQuAD v1.1 EM / F1, "gold contained", abstention.

The headline (`score_answer`'s em / f1) is the official SQuAD v1.1 normalisation applied to the raw
output's first line (`answer_line`: whitespace stripped, nothing cut out of it), so a hedge ("I am
not sure, maybe John Smith"), a sentence or a candidate list ("John Smith or Mary Jones") is not an
exact match. `extract_answer` is a separate, lenient reading (lead-ins and a trailing sentence
dropped, a sentence cut to its answer span) reported in its own column, never as the headline.
`contained` (normalised gold inside the whole normalised output, on word boundaries) shows when a
model knew but did not stop. On an unanswerable question a row is right exactly when its answer
line normalises to the configured abstain answer (docs/DESIGN_QA.md).
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Iterable, Sequence

from kblampp.synth.families import DEFAULT_ABSTAIN_ANSWER

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
# Lead-ins a chat model puts before a short answer; matched case-insensitively at the start.
_LEAD_INS = re.compile(
    r"^\s*(?:(?:the\s+)?(?:final\s+|short\s+)?answer\s*(?:is|:)\s*:?|a\s*:|answer\s*-)\s*", re.IGNORECASE)
_WRAPPERS = "\"'`*_ "
# A sentence end: a period after 3+ lowercase letters/digits (so "St. Louis", "J. R." survive), unless
# the word is a title or another abbreviation ("Prof. John Smith", "Gen. Lee").
_SENTENCE_END = re.compile(r"(?<=[a-z0-9]{3})[.!?](?:\s|$)")
_ABBREVIATIONS = {"prof", "mrs", "sgt", "capt", "gen", "col", "gov", "sen", "rep", "rev", "hon", "lieut", "cmdr",
                  "corp", "inc", "ltd", "bros", "univ", "dept", "est", "ave", "blvd", "mt", "ft", "st", "dr", "mr",
                  "ms", "jr", "sr", "co", "no", "vol", "approx"}
# Markers of a hedge, a negation or a list of candidates: a line holding one is never cut to a span.
_UNCOMMITTED = re.compile(r"\b(?:maybe|perhaps|possibly|probably|likely|unsure|not|no|never|either|or|might|"
                          r"could|guess|unknown|unclear)\b|n't\b", re.IGNORECASE)
# A name or number: capitalised/numeric words, joined by a few lowercase connectors ("University of
# Oslo", "Bank of the West", "Jean de la Fontaine") or hyphens.
# "Miller, Oconnell and Mitchell" is one name: a comma joins capitalised words too.
_CAP = r"(?:[A-Z][\w'’.-]*|\d[\d.,:/-]*)"
_NAME_RUN = re.compile(
    rf"{_CAP}(?:(?:\s+(?:(?:of|the|de|la|le|du|van|von|der|and|&|y|da|di)\s+)*|,\s+(?:and\s+)?){_CAP})*")
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


def answer_line(output: str) -> str:
    """What the headline scores: the raw output's first line, whitespace stripped, nothing cut."""
    text = output.strip()
    return text.split("\n", 1)[0].strip() if text else ""


def _sentence_end(line: str) -> int | None:
    """Where the first sentence of `line` ends (its final mark), skipping titles/abbreviations."""
    for match in _SENTENCE_END.finditer(line):
        word = re.findall(r"\w+", line[:match.start()])
        if not word or word[-1].lower() not in _ABBREVIATIONS:
            return match.start()
    return None


def extract_answer(output: str, question: str | None = None) -> str:
    """The lenient reading of a generation (its own column, never the headline): the first non-empty
    line without lead-ins such as "The answer is", wrapping quotes/asterisks, or a trailing
    explanation sentence. Given the question, a committed sentence-like line (4+ words, no hedge,
    negation or "or") is cut to its first name/number run that does not restate the question, so
    "Luke Glenn was a member of the Hidden Thistle Tennis Club" reads as "Hidden Thistle Tennis Club";
    names such as "Miller, Oconnell and Mitchell" and "Prof. John Smith" stay whole."""
    line = next((ln for ln in output.splitlines() if ln.strip(_WRAPPERS + "\t")), "")
    prev = None
    while prev != line:  # "Answer: The answer is X" -> X
        prev = line
        line = _LEAD_INS.sub("", line.strip(_WRAPPERS + "\t"), count=1)
    end = _sentence_end(line)
    if end is not None:
        line = line[:end]
    line = line.strip(_WRAPPERS + "\t.,;:")
    if question and len(line.split()) >= 4 and not _UNCOMMITTED.search(line):
        span = _answer_span(line, question)
        if span:
            return span.strip(_WRAPPERS + "\t.,;:")
    return line


def is_abstention(output: str, abstain_answer: str) -> bool:
    """The row declined to answer: its answer line normalises to the configured abstain answer."""
    target = normalize_answer(abstain_answer)
    if not target:
        raise ValueError(f"abstain_answer: {abstain_answer!r} normalises to nothing")
    return normalize_answer(answer_line(output)) == target


def score_answer(output: str, golds: str | Sequence[str], question: str | None = None, answerable: bool = True,
                 abstain_answer: str = DEFAULT_ABSTAIN_ANSWER) -> dict[str, float | str | bool]:
    """All answer metrics of one raw generation. `pred` = the answer line; em / f1 = official SQuAD
    v1.1 on it (the headline); `lenient_pred` / `em_lenient` = `extract_answer`'s reading; contained;
    `abstained`. On an unanswerable question every score is 1 exactly when the row abstained."""
    pred, lenient = answer_line(output), extract_answer(output, question)
    abstained = is_abstention(output, abstain_answer)
    if not answerable:
        right = float(abstained)
        return {"pred": pred, "em": right, "f1": right, "contained": right, "lenient_pred": lenient,
                "em_lenient": right, "abstained": abstained}
    return {"pred": pred, "em": exact_match(pred, golds), "f1": f1_score(pred, golds),
            "contained": contains_gold(output, golds), "lenient_pred": lenient,
            "em_lenient": exact_match(lenient, golds), "abstained": abstained}


def mean(values: Iterable[float]) -> float | None:
    """Average, or None for an empty group (the report shows it as a dash)."""
    vals = list(values)
    return sum(vals) / len(vals) if vals else None


def bootstrap_interval(values: Sequence[float], resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean (questions resampled with replacement, seeded);
    None for an empty group."""
    import numpy as np

    vals = np.asarray(list(values), dtype=np.float64)
    if vals.size == 0:
        return None
    if resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap: need resamples >= 1 and 0 < level < 1, got {resamples}, {level}")
    idx = np.random.default_rng(seed).integers(0, vals.size, size=(resamples, vals.size))
    means = vals[idx].mean(axis=1)
    tail = (1.0 - level) / 2.0
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))
