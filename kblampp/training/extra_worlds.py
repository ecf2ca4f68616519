"""Training-only worlds for the retrieval phase: facts that are not in the KB, and questions about them.

Why: the keys and the query are trained contrastively, and with three training worlds (~400 people)
they learn to tell apart the few hundred names they saw. At 10^5-10^6 facts the held-out world's
people compete with hundreds of thousands of other names, and keys trained that way lose them
(docs/BENCHMARKS.md, "Keys trained on more worlds"). More training worlds, kept out of the KB, give the
retrieval phase many more entities to separate; the KB, the evaluation and every other phase are
unchanged. The facts file and its questions are the synthetic generator's output
(`kblampp.synth.pipeline.make_extra_world_files`); any 5-tuple file with a QA file over it works.

Row ids: the extra facts follow the KB's facts in the retrieval phase's table, so each extra question's
fact ids are shifted by the KB's size (`shift_fact_ids`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from kblampp.schema import Fact, QARecord, load_facts, load_qa, qa_from_dict

FACT_ID_FIELDS = ("answer_fact",)  # single fact ids of a QA record; supporting_facts / near_miss_facts are lists
FACT_LIST_FIELDS = ("supporting_facts", "near_miss_facts")


def shift_fact_ids(records: Sequence[QARecord], offset: int) -> list[QARecord]:
    """The same questions with every fact id moved by `offset` (ids into a table where these facts come
    after `offset` others)."""
    out = []
    for rec in records:
        raw = dict(rec.raw)
        for name in FACT_LIST_FIELDS:
            if isinstance(raw.get(name), list):
                raw[name] = [i + offset for i in raw[name]]
        for name in FACT_ID_FIELDS:
            if isinstance(raw.get(name), int):
                raw[name] = raw[name] + offset
        out.append(qa_from_dict(raw))
    return out


def load_extra_worlds(facts_path: str | Path | None, qa_path: str | Path | None, offset: int
                      ) -> tuple[list[Fact], list[QARecord]]:
    """(extra facts, their questions with ids shifted by `offset`); ([], []) when no file is given.

    Both paths or neither (`stage_a.retrieval_extra_facts` / `retrieval_extra_qa`); the questions'
    ids are checked against the extra facts file before shifting."""
    if (facts_path is None) != (qa_path is None):
        raise ValueError("stage_a.retrieval_extra_facts and stage_a.retrieval_extra_qa: give both or neither "
                         f"(got {facts_path!r} and {qa_path!r})")
    if facts_path is None:
        return [], []
    for name, path in (("retrieval_extra_facts", facts_path), ("retrieval_extra_qa", qa_path)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"stage_a.{name}: {path} not found (the main job's extra_worlds step writes it)")
    facts = load_facts(facts_path)
    records = load_qa(qa_path, num_facts=len(facts))
    return facts, shift_fact_ids(records, offset)
