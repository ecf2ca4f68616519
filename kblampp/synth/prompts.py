"""The plan's LLM prompts (section 4.1.1 and 4.1.2 of kblampp_plan_b.zh.md), copied verbatim.

Only `QA_FAMILIES_SUFFIX` (the question families of docs/DESIGN_QA.md) and `QA_WORLD_SUFFIX` are ours:
the QA prompt needs the families and the world's facts after it.
"""
from __future__ import annotations

WORLD_PROMPT = """You are a data generator for a knowledge-augmented language model.

Task:
1. Create a small fictional world with:
   - 10-15 entities (people, organizations, locations, events),
   - 60-80 facts connecting them.

2. Each fact must be expressed as a 5-tuple in JSON with the following schema:
   {
     "head":    { "id": "E001", "name": "BrightSky Robotics", "type": "ORG" },
     "relation":{ "id": "R001", "name": "chief executive officer" },
     "tail":    { "id": "E002", "name": "Alice Zhang", "type": "PERSON" },
     "context": {
       "source": "llm_synth",
       "page_title": "BrightSky Robotics",
       "sent_span": "Alice Zhang became the CEO of BrightSky Robotics on March 2, 2019.",
       "disamb": { "country": "US" },
       "ver": { "url": null, "rev_id": null }
     },
     "time_window": {
       "start": "2019-03-02",
       "end": null,
       "source": "text_infer"
     }
   }

Requirements:
- Use short string IDs for head.id and tail.id (like "E001", "E002", ...).
- Use short string IDs for relation.id (like "R001", "R002", ...).
- Ensure that:
  - There are one-hop facts,
  - There are 2-hop and 3-hop chains (for multi-hop reasoning),
  - Some facts are time-dependent (e.g., positions, memberships with start/end dates).

Output:
- A pure JSON array of 5-tuples (no extra commentary)."""

QA_PROMPT = """You are given a fictional world described by a list of facts in 5-tuple format.
Each fact T_i has fields: head, relation, tail, context.sent_span, time_window.

Your tasks:
1. Generate SINGLE-HOP questions that can be answered using exactly ONE fact.
2. Generate MULTI-HOP questions that require combining TWO or THREE facts.
3. Generate TEMPORAL questions that depend on the time_window (start/end).

For each question, output a JSON object:
{
  "qid": "Q0001",
  "dataset": "synth_world_01",
  "question": "...",
  "answer": "...",
  "type": "single-hop" | "multi-hop" | "temporal",
  "supporting_facts": [indices_of_used_facts],
  "question_time": { "start": "...", "end": "..." }
}

Notes:
- supporting_facts should list the indices of the facts in the original world array (0-based).
- For temporal questions, question_time should reflect the time constraint in the question.
- Output a pure JSON array of such question objects."""

QA_FAMILIES_SUFFIX = """

Cover these question families and add "family" to every question object:
- "single_hop"; "paraphrase" (no word shared with the relation's name); "lowercase" (names in lower case);
  "initials" ("J. Hubbard", only where no other person has the same initials and surname);
- "multi_hop_2", "multi_hop_3": chains of 2 or 3 facts, each fact's tail the next one's head, over as many
  different relation pairs as the world allows; supporting_facts in chain order;
- time (type "temporal"): "in" / "on" a date, "between" two years, "before" / "after" a year (exactly one
  fact of the entity and relation overlaps), "just_before" / "right_after" a year (the latest started
  before it / the earliest ending after it), "first", "last", "current" (valid on REFERENCE_DATE; say
  "now" or "currently"), "succession" ("Who succeeded / preceded X as CEO of Y?"; supporting_facts:
  X's fact first, then the answer's), "relative" ("When X was CEO of Y, where did Z work?", "In the year
  Y was founded, who ...?"; supporting_facts: the anchoring fact first, then the answer's);
- unanswerable (type "unanswerable", answer "no answer", supporting_facts [], about 10% of all):
  "unans_entity" (a person or organisation that is in no fact), "unans_relation" (an entity the world
  has, asked for a relation it lacks), "unans_time" (a time outside every window of the asked fact);
  add "subject" (the entity asked about) and "relation" (the relation name asked for).
Every answer must be the tail of the last supporting fact and follow from the facts alone."""
QA_WORLD_SUFFIX = "\n\nWorld facts (a JSON array; fact i is the element at 0-based index i):\n"


def qa_prompt(world_facts: list[dict], reference_date: str = "2024-12-31") -> str:
    """The QA prompt, the families it must cover, then one world's facts as a JSON array (local indices)."""
    import json

    return (QA_PROMPT + QA_FAMILIES_SUFFIX.replace("REFERENCE_DATE", reference_date) + QA_WORLD_SUFFIX
            + json.dumps(world_facts, ensure_ascii=False))
