"""HotpotQA (one JSON list, or JSON Lines; `_id` or `id`; `supporting_facts [[title, sent_id]]`,
`context [[title, [sentences]]]`, or the dict-of-lists variant `{title: [...], sent_id: [...]}` /
`{title: [...], sentences: [[...]]}`) to 5-tuples from the supporting sentences, plus QA records that
say which questions the KB can answer.

Facts never see the answer (nor the question): each supporting sentence yields one fact per tail it
states (`kblampp.builders.hotpot_text` holds the rules), head = the paragraph's page (name without the
disambiguation suffix, id `enwiki:<title>` with HTML entities un-escaped), window open (HotpotQA facts
carry no time; a date tail's parsed ISO range is kept in `context.tail_date`).

QA records (one per question that has an answer; records without one still give facts):
  family          hotpot_yesno (answer yes/no), hotpot_comparison, hotpot_bridge, or hotpot_unstated
                  (a bridge question whose answer no supporting sentence states);
  supporting_facts the facts of the supporting sentences, first hop first, answer fact last;
  answer_fact     the supporting fact whose tail equals the answer after SQuAD normalisation, from the
                  last hop's paragraph when there is one (bridge questions only); absent otherwise;
  answerable      true exactly when there is an answer_fact (yes/no and comparison answers are never a
                  stated tail: false);
  bridge_linked   (bridge questions with two supporting pages) a fact of one page links to the other;
  type            "multi-hop"; question_time null.
A question the KB cannot answer is written as docs/DESIGN_QA.md lays out (type "unanswerable", answer
"no answer", reason answer_not_stated): the dataset's answer goes to `source_answer`, the supporting
sentences' facts to `near_miss_facts`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kblampp.builders.common import BuildResult, iter_records, make_fact, position, require
from kblampp.builders.hotpot_text import statements, title_base, unescape_title
from kblampp.metrics import normalize_answer
from kblampp.synth.families import NO_ANSWER

TAIL_TYPES = {"title": "ENTITY", "name": "NAME", "date": "DATE", "number": "NUMBER", "native": "NATIVE_NAME"}


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


def _check(rec: Any) -> tuple[str, str] | tuple[str, list, dict]:
    """(qid, supporting pairs, {title: sentences}) of a record, or (field, reason) when it is bad."""
    if not isinstance(rec, dict):
        return "<record>", f"expected a JSON object, got {type(rec).__name__}"
    qid_key = "_id" if "_id" in rec else "id"
    for key in (qid_key, "question"):
        reason = require(rec, key, str, nonempty=True)
        if reason:
            return ("_id/id" if key == qid_key and reason == "missing field" else key), reason
    if "answer" in rec and not isinstance(rec["answer"], str):
        return "answer", f"expected str, got {type(rec['answer']).__name__}"
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


def entity_id(title: str) -> str:
    """`enwiki:<page>` of a paragraph title (HTML entities un-escaped, spaces as underscores)."""
    return "enwiki:" + unescape_title(title).replace(" ", "_")


def build_hotpot(paths: list[str | Path], max_samples: int | None = None) -> BuildResult:
    """5-tuples + QA from HotpotQA files; supporting_facts index the facts of this run."""
    result = BuildResult()
    seen: dict[str, str] = {}
    known: dict[str, int] = {}  # a fact's text (tail id aside) -> its index, across questions
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
            facts = _facts(support, paragraphs, result, known)
            if isinstance(rec.get("answer"), str) and rec["answer"].strip():
                result.qa.append(qa_record(rec, qid, facts, result.facts))
            else:
                result.notes["records without an answer (facts only, no QA)"] += 1
    return result


def _facts(support: list, paragraphs: dict[str, list], result: BuildResult,
           known: dict[str, int]) -> list[tuple[str, int]]:
    """Add the facts of the supporting sentences; (paragraph title, fact index) in sentence order.
    Reads only the titles and sentences: the answer never reaches this function. A sentence seen in
    another question's context is the same fact; if only one context held the tail's page, the
    fact keeps that link (so a fact does not depend on which distractors came with it)."""
    titles = list(paragraphs)
    out: list[tuple[str, int]] = []
    for title, sent_id in support:
        sentence = paragraphs[title][sent_id].strip()
        found = statements(sentence, title, titles)
        result.notes["supporting sentences"] += 1
        if not found:
            result.notes["supporting sentences without a fact"] += 1
        full, base = unescape_title(title), title_base(title)
        for st in found:
            tail = st.tail
            extra: dict[str, Any] = {"sent_id": sent_id, "tail_kind": tail.kind}
            if tail.date:
                extra["tail_date"] = {"start": tail.date[0], "end": tail.date[1]}
            fact = make_fact(
                head=(entity_id(title), base, None), relation=(None, st.relation),
                tail=(entity_id(tail.title) if tail.title else None, tail.text, TAIL_TYPES[tail.kind]),
                source="hotpot", page_title=full, sentence=sentence,
                url="https://en.wikipedia.org/wiki/" + full.replace(" ", "_"), extra_context=extra)
            if base != full:
                fact["context"]["disamb"] = {"wikipedia_title": full}
            index = _add_once(result, known, fact)
            if (title, index) not in out:
                out.append((title, index))
    return out


def _add_once(result: BuildResult, known: dict[str, int], fact: dict) -> int:
    key = json.dumps([fact["head"]["id"], fact["relation"]["name"], fact["tail"]["name"], fact["context"]["sent_span"]],
                     ensure_ascii=False)
    if key not in known:
        known[key] = result.add_fact(fact)
        return known[key]
    kept = result.facts[known[key]]
    result.notes["duplicate facts merged"] += 1
    if kept["tail"]["id"] is None and fact["tail"]["id"] is not None:
        kept["tail"], kept["context"]["tail_kind"] = fact["tail"], fact["context"]["tail_kind"]
        result.notes["facts linked by another question's context"] += 1
    return known[key]


def _family(rec: dict) -> str:
    if normalize_answer(rec["answer"]) in ("yes", "no"):
        return "hotpot_yesno"
    return "hotpot_comparison" if rec.get("type") == "comparison" else "hotpot_bridge"


def _hop_order(support_titles: list[str], facts: list[tuple[str, int]], all_facts: list[dict]) -> tuple[list[str], bool]:
    """Supporting pages in hop order (a page whose fact links to another comes first) and whether any
    supporting page links to another one (the bridge chain is in the KB)."""
    ids = {entity_id(t): t for t in support_titles}
    links = {(title, ids[all_facts[i]["tail"]["id"]]) for title, i in facts
             if all_facts[i]["tail"]["id"] in ids and ids[all_facts[i]["tail"]["id"]] != title}
    if not links:
        return support_titles, False
    first = next(src for src, _ in sorted(links, key=lambda l: support_titles.index(l[0])))
    return [first] + [t for t in support_titles if t != first], True


def qa_record(rec: dict, qid: str, facts: list[tuple[str, int]], all_facts: list[dict]) -> dict:
    """The QA record of one question (fields in the module doc); reads the answer, writes no fact."""
    family = _family(rec)
    support_titles = list(dict.fromkeys(t for t, _ in facts))
    order, linked = _hop_order(support_titles, facts, all_facts)
    ordered = [i for t in order for title, i in facts if title == t]
    answer_fact = None
    if family == "hotpot_bridge":
        gold = normalize_answer(rec["answer"])
        matches = [(title, i) for title, i in facts if normalize_answer(all_facts[i]["tail"]["name"]) == gold]
        last_hop = [i for title, i in matches if title == order[-1]]
        answer_fact = last_hop[0] if last_hop else (matches[-1][1] if matches else None)
    if answer_fact is not None:
        ordered = [i for i in ordered if i != answer_fact] + [answer_fact]
    qa = {"qid": qid, "dataset": "hotpot", "question": rec["question"].strip(), "answer": rec["answer"].strip(),
          "type": "multi-hop", "family": family, "supporting_facts": ordered, "question_time": None,
          "answerable": answer_fact is not None, "hotpot_type": rec.get("type"), "level": rec.get("level")}
    if answer_fact is not None:  # absent = none (the sanity check wants an index where the key is present)
        qa["answer_fact"] = answer_fact
    if family == "hotpot_bridge" and len(support_titles) >= 2:
        qa["bridge_linked"] = linked
    if answer_fact is None:  # unanswerable from the KB (docs/DESIGN_QA.md); the dataset's answer is kept aside
        qa.update(type="unanswerable", family="hotpot_unstated" if family == "hotpot_bridge" else family,
                  answer=NO_ANSWER, source_answer=qa["answer"], supporting_facts=[], near_miss_facts=ordered,
                  unanswerable_reason="answer_not_stated")
    return qa


def reachability(result: BuildResult) -> dict[str, Any]:
    """What the KB built from the text can answer: facts per supporting sentence, relation vocabulary,
    answers that are a supporting fact's tail, bridge chains linked (the numbers docs/DATASETS.md reports)."""
    sentences = result.notes["supporting sentences"]
    relations = [f["relation"]["name"] for f in result.facts]
    vocab = {r: relations.count(r) for r in set(relations)}
    bridge = [q for q in result.qa if q["family"] in ("hotpot_bridge", "hotpot_unstated")]
    chains = [q for q in bridge if "bridge_linked" in q]
    share = lambda part, whole: round(part / whole, 3) if whole else None  # noqa: E731
    return {
        "questions": len(result.qa), "supporting sentences": sentences, "facts": len(result.facts),
        "facts per supporting sentence": share(len(result.facts), sentences),
        "sentences without a fact": result.notes["supporting sentences without a fact"],
        "relation vocabulary": len(vocab), "relations used once": sum(1 for n in vocab.values() if n == 1),
        "families": {f: sum(1 for q in result.qa if q["family"] == f)
                     for f in ("hotpot_bridge", "hotpot_comparison", "hotpot_yesno", "hotpot_unstated")},
        "answerable": sum(1 for q in result.qa if q["answerable"]),
        "answerable share": share(sum(1 for q in result.qa if q["answerable"]), len(result.qa)),
        "bridge answers reachable": share(sum(1 for q in bridge if q["answerable"]), len(bridge)),
        "bridge chains linked": share(sum(1 for q in chains if q["bridge_linked"]), len(chains)),
    }
