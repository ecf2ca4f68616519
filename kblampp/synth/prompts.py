"""The plan's LLM prompts (section 4.1.1 and 4.1.2 of kblampp_plan_b.zh.md), copied verbatim.

Only `QA_WORLD_SUFFIX` is ours: the QA prompt needs the world's facts after it.
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

QA_WORLD_SUFFIX = "\n\nWorld facts (a JSON array; fact i is the element at 0-based index i):\n"


def qa_prompt(world_facts: list[dict]) -> str:
    """The QA prompt followed by one world's facts as a JSON array (local 0-based indices)."""
    import json

    return QA_PROMPT + QA_WORLD_SUFFIX + json.dumps(world_facts, ensure_ascii=False)
