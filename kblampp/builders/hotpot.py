"""HotpotQA (one JSON list, or JSON Lines; `_id` or `id`; `supporting_facts [[title, sent_id]]`,
`context [[title, [sentences]]]`, or the dict-of-lists variant `{title: [...], sent_id: [...]}` /
`{title: [...], sentences: [[...]]}`) to 5-tuples from the supporting sentences plus multi-hop QA.

Extraction rule (HotpotQA has sentences, not triples), one fact per supporting sentence:
  head     = the title of the sentence's paragraph (its Wikipedia page);
  tail     = the first of: (answer) the answer, if it occurs in the sentence and is not the head or
             yes/no; (bridge) the title of another paragraph of the question mentioned in the
             sentence, supporting paragraphs first; (date) the first date or year in the sentence;
             (description) the rest of the sentence after the head mention, at most 12 words;
  relation = the words between the head mention (or the sentence start, less a leading pronoun)
             and the tail, brackets and punctuation dropped, at most 8 words; "mentions" if none
             ("description" for the description rule);
  window   = open (HotpotQA facts carry no time); question_time = null.
The QA's supporting_facts are these facts' indices; answer_fact is the fact built by the answer rule.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from kblampp.builders.common import BuildResult, iter_records, make_fact, position, require

_PRONOUN = re.compile(r"^(?:he|she|it|they|his|her|its|their|this|the|these|those)\b\s*", re.I)
_MONTH = r"(?:January|February|March|April|May|June|July|August|September|October|November|December)"
_DATE = re.compile(rf"{_MONTH}\s+\d{{1,2}},\s+\d{{4}}|\d{{1,2}}\s+{_MONTH}\s+\d{{4}}|{_MONTH}\s+\d{{4}}|(?<!\d)\d{{4}}(?!\d)")
MAX_RELATION_WORDS = 8
MAX_DESCRIPTION_WORDS = 12


def _pairs(value: Any, keys: tuple[str, str]) -> list[tuple[Any, Any]] | str:
    """[[a, b], ...] or {keys[0]: [...], keys[1]: [...]} as a list of pairs, or the reason it is bad."""
    if isinstance(value, dict):
        if not all(isinstance(value.get(k), list) for k in keys):
            return f"expected lists under {keys[0]!r} and {keys[1]!r}"
        if len(value[keys[0]]) != len(value[keys[1]]):
            return f"{keys[0]!r} and {keys[1]!r} differ in length"
        return list(zip(value[keys[0]], value[keys[1]]))
    if isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 for p in value):
        return [tuple(p) for p in value]
    return f"expected a list of [{keys[0]}, {keys[1]}] pairs or a dict of lists"


def _find(sentence: str, needle: str) -> int:
    """Start of `needle` in `sentence` as whole words, case-insensitive; -1 when absent."""
    if not needle.strip():
        return -1
    match = re.search(rf"(?<!\w){re.escape(needle.strip())}(?!\w)", sentence, re.I)
    return match.start() if match else -1


def _words(text: str, limit: int) -> str:
    text = re.sub(r"\([^)]*\)|\[[^\]]*\]", " ", text)
    words = re.findall(r"[\w'’.-]+", text)
    return " ".join(w.strip(".") for w in words[:limit] if w.strip("."))


def extract(title: str, sentence: str, answer: str, titles: list[str]) -> tuple[str, str, str | None, str]:
    """(relation, tail, tail_title or None, rule) of one supporting sentence (rules in the module doc)."""
    pos = _find(sentence, title)
    head_end = pos + len(title) if pos >= 0 else len(_PRONOUN.match(sentence).group(0)) if _PRONOUN.match(sentence) else 0
    candidates: list[tuple[str, str | None, str]] = []
    if answer.strip().lower() not in ("yes", "no") and answer.strip().lower() != title.lower():
        candidates.append((answer.strip(), next((t for t in titles if t.lower() == answer.strip().lower()), None), "answer"))
    candidates += [(t, t, "bridge") for t in titles if t.lower() != title.lower()]
    for text, tail_title, rule in candidates:
        at = _find(sentence, text)
        if at >= 0:
            relation = _words(sentence[head_end:at], MAX_RELATION_WORDS) if at >= head_end else ""
            return relation or "mentions", sentence[at:at + len(text.strip())], tail_title, rule
    rest = sentence[head_end:]
    date = _DATE.search(rest)
    if date:
        relation = _words(rest[:date.start()], MAX_RELATION_WORDS)
        return relation or "mentions", date.group(0), None, "date"
    description = _words(rest, MAX_DESCRIPTION_WORDS) or _words(sentence, MAX_DESCRIPTION_WORDS)
    return "description", description, None, "description"


def _check(rec: Any) -> tuple[str, str] | tuple[str, list, dict]:
    """(qid, supporting pairs, {title: sentences}) of a record, or (field, reason) when it is bad."""
    if not isinstance(rec, dict):
        return "<record>", f"expected a JSON object, got {type(rec).__name__}"
    qid_key = "_id" if "_id" in rec else "id"
    for key in (qid_key, "question", "answer"):
        reason = require(rec, key, str, nonempty=True)
        if reason:
            return ("_id/id" if key == qid_key and reason == "missing field" else key), reason
    if "supporting_facts" not in rec:
        return "supporting_facts", "missing field"
    if "context" not in rec:
        return "context", "missing field"
    support = _pairs(rec["supporting_facts"], ("title", "sent_id"))
    if isinstance(support, str):
        return "supporting_facts", support
    context = _pairs(rec["context"], ("title", "sentences"))
    if isinstance(context, str):
        return "context", context
    paragraphs: dict[str, list] = {}
    for i, (title, sentences) in enumerate(context):
        if not isinstance(title, str) or not title.strip() or not isinstance(sentences, list) \
                or not all(isinstance(s, str) for s in sentences):
            return f"context[{i}]", "expected [non-empty title, [sentence strings]]"
        paragraphs.setdefault(title, sentences)
    if not support:
        return "supporting_facts", "empty"
    for i, (title, sent_id) in enumerate(support):
        if not isinstance(title, str) or not isinstance(sent_id, int) or isinstance(sent_id, bool):
            return f"supporting_facts[{i}]", f"expected [title, sentence index], got {[title, sent_id]!r}"
        if title not in paragraphs:
            return f"supporting_facts[{i}]", f"title {title!r} is not in the context"
        if not 0 <= sent_id < len(paragraphs[title]):
            return f"supporting_facts[{i}]", f"sentence {sent_id} out of range (paragraph {title!r} has {len(paragraphs[title])})"
        if not paragraphs[title][sent_id].strip():
            return f"supporting_facts[{i}]", f"sentence {sent_id} of {title!r} is empty"
    return rec[qid_key].strip(), support, paragraphs


def _entity_id(title: str) -> str:
    return "enwiki:" + title.strip().replace(" ", "_")


def build_hotpot(paths: list[str | Path], max_samples: int | None = None) -> BuildResult:
    """5-tuples + multi-hop QA from HotpotQA files; supporting_facts index the facts of this run."""
    result = BuildResult()
    seen: dict[str, str] = {}
    for path in map(Path, paths):
        for where, rec in iter_records(path, result, max_samples):
            result.records_read += 1
            checked = _check(rec)
            if len(checked) == 2:
                result.bad(path, where, *checked)
                continue
            qid, support, paragraphs = checked
            if qid in seen:
                result.bad(path, where, "_id/id", f"duplicate id {qid!r} (first at {position(seen[qid])})")
                continue
            seen[qid] = where
            _add(rec, qid, support, paragraphs, result)
    return result


def _add(rec: dict, qid: str, support: list, paragraphs: dict[str, list], result: BuildResult) -> None:
    support_titles = list(dict.fromkeys(t for t, _ in support))
    titles = support_titles + [t for t in paragraphs if t not in support_titles]
    indices: list[int] = []
    answer_fact = None
    for title, sent_id in support:
        sentence = paragraphs[title][sent_id].strip()
        relation, tail, tail_title, rule = extract(title, sentence, rec["answer"], titles)
        result.notes[f"facts by rule {rule}"] += 1
        index = result.add_fact(make_fact(
            head=(_entity_id(title), title.strip(), None), relation=(None, relation),
            tail=(_entity_id(tail_title) if tail_title else None, tail, None), source="hotpot",
            page_title=title.strip(), sentence=sentence,
            url="https://en.wikipedia.org/wiki/" + title.strip().replace(" ", "_"),
            extra_context={"sent_id": sent_id, "extraction_rule": rule}))
        if index not in indices:
            indices.append(index)
        if rule == "answer" and answer_fact is None:
            answer_fact = index
    qa = {"qid": qid, "dataset": "hotpot", "question": rec["question"].strip(), "answer": rec["answer"].strip(),
          "type": "multi-hop", "supporting_facts": indices, "question_time": None,
          "hotpot_type": rec.get("type"), "level": rec.get("level")}
    if answer_fact is not None:  # its fact goes last in supporting_facts (the project's convention)
        qa["supporting_facts"] = [i for i in indices if i != answer_fact] + [answer_fact]
        qa["answer_fact"] = answer_fact
    result.qa.append(qa)
