"""File-level steps shared by the offline scripts and scripts/main_job.py (generate, write, report)."""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from kblampp.schema import load_facts
from kblampp.synth.jsonl import write_jsonl
from kblampp.synth.qa import REFERENCE_DATE, generate_qa, write_qa
from kblampp.synth.world import WorldSizes, fact_world, generate_worlds


@dataclass
class StepReport:
    """What a step wrote, how much, and how long it took (printed by scripts)."""

    paths: dict[str, Path]
    counts: dict[str, int]
    seconds: float
    details: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"{name}: {self.counts.get(name, 0)} lines -> {path}" for name, path in self.paths.items()]
        out += [f"  {k}: {v}" for k, v in sorted(self.details.items())]
        out.append(f"  time: {self.seconds:.2f} s")
        return out


def make_world_file(out: str | Path, seed: int, num_worlds: int, sizes: WorldSizes | None = None,
                    progress: bool = True) -> StepReport:
    """Generate `num_worlds` programmatic worlds into one JSONL file (atomic write)."""
    t0 = time.perf_counter()
    facts = generate_worlds(seed, num_worlds, sizes, progress=progress)
    n = write_jsonl(out, facts)
    details = dict(Counter(f"relation '{f['relation']['name']}'" for f in facts))
    details["worlds"] = len({fact_world(f) for f in facts})
    return StepReport({"facts": Path(out)}, {"facts": n}, time.perf_counter() - t0, details)


def qa_counts(splits: dict[str, list[dict]]) -> dict[str, int]:
    """Questions per split and type, and per split and family (the report of a QA step)."""
    return {f"{split} {label}": n for split, recs in splits.items()
            for label, n in Counter([r["type"] for r in recs] + [f"family {r['family']}" for r in recs
                                                                  if "family" in r]).items()}


def make_qa_files(world_path: str | Path, out_dir: str | Path, prefix: str = "synth_world", seed: int = 0,
                  dev_worlds: int = 1, test_worlds: int = 1, train_variants: int = 1,
                  eval_heldout_only: bool = False, reference_date: str = REFERENCE_DATE) -> StepReport:
    """Generate programmatic QA from a world file into `<prefix>_{train,dev,test}.jsonl`."""
    t0 = time.perf_counter()
    facts = load_facts(world_path)
    splits = generate_qa(facts, seed=seed, dev_worlds=dev_worlds, test_worlds=test_worlds, dataset=prefix,
                         train_variants=train_variants, eval_heldout_only=eval_heldout_only,
                         reference_date=reference_date)
    paths = write_qa(splits, out_dir, prefix)
    return StepReport(paths, {s: len(r) for s, r in splits.items()}, time.perf_counter() - t0, qa_counts(splits))


def make_extra_world_files(world_path: str | Path, facts_out: str | Path, qa_out: str | Path, n_facts: int,
                           seed: int, train_variants: int = 1, reference_date: str = REFERENCE_DATE,
                           progress: bool = True) -> StepReport:
    """Training-only worlds (`kblampp.training.extra_worlds`): `n_facts` facts of new worlds drawn with
    `seed`, no entity named like one of `world_path`'s, and training questions over them (fact ids
    index `facts_out`). The KB never holds them; the retrieval phase trains on them."""
    from kblampp.synth.distractors import collisions, distractor_facts

    t0 = time.perf_counter()
    base = [f.raw for f in load_facts(world_path)]
    extra = distractor_facts(base, n_facts, seed=seed, progress=progress)
    clash = collisions(base, extra)
    if clash.names or clash.ids:
        raise ValueError(f"extra worlds share {clash.names} names / {clash.ids} ids with {world_path}: {clash.examples}")
    n = write_jsonl(facts_out, extra)
    prefix = Path(qa_out).name.removesuffix(".jsonl")
    splits = generate_qa(load_facts(facts_out), seed=seed, dev_worlds=0, test_worlds=0, dataset=prefix,
                         train_variants=train_variants, reference_date=reference_date)
    m = write_jsonl(qa_out, splits["train"])
    details = qa_counts({"train": splits["train"]}) | {"worlds": len({fact_world(f) for f in extra})}
    return StepReport({"facts": Path(facts_out), "qa": Path(qa_out)}, {"facts": n, "qa": m},
                      time.perf_counter() - t0, details)
