"""Question families (docs/DESIGN_QA.md): every QA record names one; evaluation reports EM per family.

Why a fixed tuple: the generator, the schema check, the answer checker and the evaluation table must
agree on the names, and each family belongs to exactly one question `type`.
"""
from __future__ import annotations

SURFACE_FAMILIES = ("paraphrase", "lowercase", "initials")
TIME_FAMILIES = ("in", "on", "between", "before", "after", "just_before", "right_after", "first", "last",
                 "current", "succession", "relative")
UNANSWERABLE_FAMILIES = ("unans_entity", "unans_relation", "unans_time")
FAMILIES = (("single_hop",) + SURFACE_FAMILIES + ("multi_hop_2", "multi_hop_3") + TIME_FAMILIES
            + UNANSWERABLE_FAMILIES)

FAMILY_TYPE: dict[str, str] = {
    **{f: "single-hop" for f in ("single_hop",) + SURFACE_FAMILIES},
    "multi_hop_2": "multi-hop", "multi_hop_3": "multi-hop",
    **{f: "temporal" for f in TIME_FAMILIES},
    **{f: "unanswerable" for f in UNANSWERABLE_FAMILIES},
}
UNANSWERABLE_REASONS = {"unans_entity": "entity_missing", "unans_relation": "relation_missing",
                        "unans_time": "time_outside"}
# Families of the real-data builders (HotpotQA): not generated here, but checked like the others.
# Questions whose answer no supporting sentence states as a tail (comparison, yes/no, or an answer the
# text never names as an entity) are unanswerable from a KB built from the text.
REAL_DATA_FAMILIES = ("hotpot_bridge", "hotpot_unstated", "hotpot_comparison", "hotpot_yesno")
REAL_DATA_FAMILY_TYPE = {"hotpot_bridge": "multi-hop", "hotpot_unstated": "unanswerable",
                         "hotpot_comparison": "unanswerable", "hotpot_yesno": "unanswerable"}
REAL_DATA_REASONS = {f: "answer_not_stated" for f in ("hotpot_unstated", "hotpot_comparison", "hotpot_yesno")}
NO_ANSWER = "no answer"  # the gold `answer` marker of unanswerable records (never matched as a string)
DEFAULT_ABSTAIN_ANSWER = "unknown"  # what a row answers when it abstains (config key abstain_answer)
