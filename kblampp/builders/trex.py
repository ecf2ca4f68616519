"""T-REx to 5-tuples: the document dumps (`docid, title, uri, text, sentences_boundaries, triples`) and
the LAMA T-REx JSON Lines (`sub_label, obj_label, predicate_id, evidences[].masked_sentence`).

Rules: head = subject (the document's own title when the subject is the document's entity, else the
subject's surface form), relation = Wikidata property with a readable label, tail = object surface
form (Q-id kept) or a literal (Wikidata dates normalised to ISO at their precision, tail.id null);
evidence = the sentence of `sentence_id` (character offsets, end-exclusive). A date-valued object
becomes a time window where the property implies one (DATE_WINDOWS); otherwise the window is open.
The same 5-tuple found by several aligners is written once (counted as "duplicate facts merged").
No answer is read or searched for when writing facts: a tail is the aligned object at its offsets (a
LAMA record's object is the Wikidata triple's, so a LAMA-built KB holds every probe's answer by
construction: probes over it measure retrieval and copying, not extraction).
"""
from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

from kblampp.builders.common import BuildResult, iter_records, make_fact, require
from kblampp.builders.wikidata_labels import property_id, property_label

# Which end of a fact's window a date-valued property sets ("point": both ends).
DATE_WINDOWS: dict[str, str] = {
    "P569": "start", "P570": "end", "P571": "start", "P576": "end", "P577": "start", "P580": "start",
    "P582": "end", "P585": "point", "P729": "start", "P730": "end", "P1619": "start", "P3999": "end",
    "P2031": "start", "P2032": "end",
}
_ENTITY = re.compile(r"(?:^|/)(Q\d+)$")
_WD_DATE = re.compile(r"(\+?)(\d{1,4})-(\d{2})-(\d{2})(?:T[\d:]+Z?)?")


def entity_id(uri: str) -> str | None:
    """"Q228" from a Wikidata entity uri or id; None for literals and anything else."""
    match = _ENTITY.search(uri.strip()) if isinstance(uri, str) else None
    return match.group(1) if match else None


def wikidata_date(literal: str) -> str | None:
    """ISO partial date of a Wikidata date literal: '1993-00-00T00:00:00Z^^...#dateTime' -> '1993'.

    Month 00 / day 00 mean unknown (year / month precision); BCE or year 0 dates give None."""
    value = literal.split("^^", 1)[0].strip().strip('"')
    match = _WD_DATE.fullmatch(value)
    if not match or int(match.group(2)) == 0:
        return None
    year, month, day = int(match.group(2)), int(match.group(3)), int(match.group(4))
    if month == 0:
        return f"{year:04d}"
    if month > 12:
        return None
    if day == 0:
        return f"{year:04d}-{month:02d}"
    iso = f"{year:04d}-{month:02d}-{day:02d}"
    try:
        dt.date(year, month, day)
    except ValueError:
        return None
    return iso


def load_lama_relations(path: str | Path) -> dict[str, str]:
    """{predicate id: label} from LAMA's relations.jsonl (`relation`, `label` per line)."""
    labels: dict[str, str] = {}
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{line_no}: <line>: invalid JSON ({err.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("relation"), str) or not isinstance(obj.get("label"), str):
            raise ValueError(f"{path}:{line_no}: relation/label: expected string fields 'relation' and 'label'")
        labels[obj["relation"]] = obj["label"]
    return labels


def _span(text: str, bounds: Any, what: str) -> tuple[int, int] | str:
    """Validated [start, end) offsets into text, or the reason they are bad."""
    if not (isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)):
        return f"{what} must be [start, end] integers, got {json.dumps(bounds)}"
    lo, hi = bounds
    if not 0 <= lo < hi <= len(text):
        return f"{what} [{lo}, {hi}) outside the text (length {len(text)}) or empty"
    return lo, hi


def _tail(obj: dict, text: str) -> tuple[tuple[str | None, str, str | None], str | None] | str:
    """((id, name, type), iso date or None) of a triple's object, or the reason it is bad."""
    uri = obj.get("uri")
    if not isinstance(uri, str) or not uri.strip():
        return "uri: missing or not a string"
    surface = obj.get("surfaceform")
    if obj.get("boundaries") is not None:
        span = _span(text, obj["boundaries"], "boundaries")
        if isinstance(span, str):
            return span
        if isinstance(surface, str) and text[span[0]:span[1]] != surface:
            return f"boundaries: text there is {text[span[0]:span[1]]!r}, not surfaceform {surface!r}"
    if "^^" in uri:
        if uri.endswith("#dateTime"):
            iso = wikidata_date(uri)
            if iso is None:
                return f"uri: unparsable Wikidata date {uri.split('^^')[0]!r}"
            return (None, iso, "DATE"), iso
        value = uri.split("^^", 1)[0].strip().strip('"')
        return ((None, value, "LITERAL"), None) if value else "uri: empty literal"
    if not isinstance(surface, str) or not surface.strip():
        return "surfaceform: missing or empty"
    return (entity_id(uri), surface.strip(), "ENTITY"), None


def _triple(doc: dict, triple: Any, sentences: list, labels: dict | None) -> tuple[str, str] | dict:
    """The 5-tuple of one T-REx triple, or (field, reason) when it is bad."""
    if not isinstance(triple, dict):
        return "", f"expected an object, got {type(triple).__name__}"
    for key in ("subject", "predicate", "object"):
        if not isinstance(triple.get(key), dict):
            return key, "missing or not an object"
    sid = triple.get("sentence_id")
    if not isinstance(sid, int) or isinstance(sid, bool) or not 0 <= sid < len(sentences):
        return "sentence_id", f"{sid!r} is not an index into sentences_boundaries (0..{len(sentences) - 1})"
    span = _span(doc["text"], sentences[sid], f"sentences_boundaries[{sid}]")
    if isinstance(span, str):
        return "sentences_boundaries", span
    sentence = doc["text"][span[0]:span[1]].strip()
    pid = property_id(triple["predicate"].get("uri") or "")
    if pid is None:
        return "predicate.uri", f"not a Wikidata property uri: {triple['predicate'].get('uri')!r}"
    subj = triple["subject"]
    s_uri = subj.get("uri") if isinstance(subj.get("uri"), str) else ""
    if subj.get("boundaries") is not None:
        s_span = _span(doc["text"], subj["boundaries"], "boundaries")
        if isinstance(s_span, str):
            return "subject.boundaries", s_span
    if s_uri and s_uri == doc["uri"]:
        head_name = doc["title"]
    elif isinstance(subj.get("surfaceform"), str) and subj["surfaceform"].strip():
        head_name = subj["surfaceform"].strip()
    else:
        return "subject.surfaceform", "missing or empty (and the subject is not the document's entity)"
    tail = _tail(triple["object"], doc["text"])
    if isinstance(tail, str):
        fld, _, reason = tail.partition(": ")
        return f"object.{fld}", reason
    (tail_entity, iso) = tail
    start = end = None
    mode = DATE_WINDOWS.get(pid) if iso else None
    if mode in ("start", "point"):
        start = iso
    if mode in ("end", "point"):
        end = iso
    return make_fact(
        head=(entity_id(s_uri), head_name, "ENTITY"), relation=(pid, property_label(pid, labels)), tail=tail_entity,
        source="trex", page_title=doc["title"], sentence=sentence, url=doc["uri"], start=start, end=end,
        time_source="wikidata_date", extra_context={"doc_id": doc["docid"], "sentence_id": sid})


def _document(path: Path, where: str, doc: dict, result: BuildResult, labels: dict | None) -> None:
    for key, kind in (("docid", str), ("title", str), ("uri", str), ("text", str),
                      ("sentences_boundaries", list), ("triples", list)):
        reason = require(doc, key, kind, nonempty=key in ("title", "text"))
        if reason:
            result.bad(path, where, key, reason)
            return
    for j, triple in enumerate(doc["triples"]):
        result.notes["triples read"] += 1
        out = _triple(doc, triple, doc["sentences_boundaries"], labels)
        if isinstance(out, tuple):
            result.bad(path, where, f"triples[{j}]" + (f".{out[0]}" if out[0] else ""), out[1])
        else:
            result.add_fact(out)


def _lama(path: Path, where: str, rec: dict, result: BuildResult, labels: dict | None) -> None:
    for key, kind in (("sub_label", str), ("obj_label", str), ("predicate_id", str), ("evidences", list)):
        reason = require(rec, key, kind, nonempty=True)
        if reason:
            result.bad(path, where, key, reason)
            return
    pid = rec["predicate_id"].strip()
    for k, ev in enumerate(rec["evidences"]):
        masked = ev.get("masked_sentence") if isinstance(ev, dict) else None
        if isinstance(masked, str) and masked.strip():
            break
    else:
        result.bad(path, where, "evidences", "no evidence with a non-empty masked_sentence")
        return
    surface = ev.get("obj_surface") if isinstance(ev.get("obj_surface"), str) and ev["obj_surface"].strip() else rec["obj_label"]
    sentence = masked.replace("[MASK]", surface.strip()).strip()
    sub_uri, obj_uri = rec.get("sub_uri"), rec.get("obj_uri")
    sub_id = entity_id(sub_uri) if isinstance(sub_uri, str) else None
    result.notes["lama records read"] += 1
    result.add_fact(make_fact(
        head=(sub_id, rec["sub_label"].strip(), "ENTITY"), relation=(pid, property_label(pid, labels)),
        tail=(entity_id(obj_uri) if isinstance(obj_uri, str) else None, rec["obj_label"].strip(), "ENTITY"),
        source="trex", page_title=rec["sub_label"].strip(), sentence=sentence,
        url=f"http://www.wikidata.org/entity/{sub_id}" if sub_id else None,
        extra_context={"uuid": rec.get("uuid"), "evidence_index": k}))


def build_trex(paths: list[str | Path], max_samples: int | None = None,
               relation_labels: dict[str, str] | None = None) -> BuildResult:
    """5-tuples from T-REx document files and/or LAMA T-REx JSONL files (format found per record)."""
    result = BuildResult()
    for path in map(Path, paths):
        for where, rec in iter_records(path, result, max_samples):
            result.records_read += 1
            if isinstance(rec, dict) and "triples" in rec:
                _document(path, where, rec, result, relation_labels)
            elif isinstance(rec, dict) and "predicate_id" in rec:
                _lama(path, where, rec, result, relation_labels)
            else:
                result.bad(path, where, "<record>", "neither a T-REx document (no 'triples') nor a LAMA record (no 'predicate_id')")
    return result
