"""A tiny character tokenizer (ids < 300, ChatML template) and a toy world, for tests and smoke runs.

The tiny random models in tests have a 300-token vocabulary and no tokenizer; this one fits them.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<unk>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: 6 specials then printable ASCII (ids 0..105), pad 0, eos 2."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", unk_token="<unk>")
    tok.chat_template = CHATML
    return tok


def toy_facts(n_people: int = 12) -> list[dict]:
    """5-tuples: each person has a birthplace and two successive employers (time windows)."""
    cities = ["Oslo", "Lima", "Pune", "Kyiv", "Rome", "Baku"]
    orgs = ["Acme", "Zeta", "Orbo", "Quix", "Vela"]
    facts = []
    for p in range(n_people):
        name = f"P{p:02d} Lee" if p % 2 else f"Ann P{p:02d}"
        head = {"id": f"E{p:03d}", "name": name, "type": "PERSON"}
        city = cities[p % len(cities)]
        facts.append(_fact(head, "born in", city, f"{name} was born in {city}.", "1980", "1980"))
        for k, (start, end) in enumerate((("2001", "2010"), ("2011", None))):
            org = orgs[(p + k) % len(orgs)]
            facts.append(_fact(head, "employer", org, f"{name} worked for {org}.", start, end))
    return facts


def _fact(head: dict, rel: str, tail: str, sent: str, start: str | None, end: str | None) -> dict:
    return {"head": head, "relation": {"id": rel.replace(" ", "_"), "name": rel},
            "tail": {"id": None, "name": tail, "type": "ORG"},
            "context": {"source": "toy", "sent_span": sent},
            "time_window": {"start": start, "end": end, "source": "toy"}}


def toy_qa(facts: list[dict], people: range, prefix: str) -> list[dict]:
    """One single-hop and one temporal question per person in `people` (3 facts per person)."""
    out = []
    for p in people:
        born, early, late = 3 * p, 3 * p + 1, 3 * p + 2
        name = facts[born]["head"]["name"]
        out.append({"qid": f"{prefix}{p}b", "dataset": "toy", "question": f"Where was {name} born?",
                    "answer": facts[born]["tail"]["name"], "type": "single-hop",
                    "supporting_facts": [born], "question_time": None, "answer_fact": born})
        out.append({"qid": f"{prefix}{p}e", "dataset": "toy", "question": f"Who employed {name} in 2005?",
                    "answer": facts[early]["tail"]["name"], "type": "temporal",
                    "supporting_facts": [early], "question_time": {"start": "2005", "end": "2005"},
                    "answer_fact": early})
        del late
    return out


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


class HashEmbedder:
    """Deterministic bag-of-character-trigrams embedding, L2-normalised: a MiniLM stand-in for tests.

    Texts sharing words get similar vectors, so a toy retrieval problem is learnable."""

    name = "toy:hash-trigram"

    def __init__(self, dim: int = 32):
        self.dim = dim

    def encode(self, texts: list[str], **_: object) -> "np.ndarray":
        import zlib

        import numpy as np

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            padded = f"  {text.lower()}  "
            for i in range(len(padded) - 2):
                code = zlib.crc32(padded[i:i + 3].encode("utf-8"))
                out[row, code % self.dim] += 1.0 if (code >> 16) & 1 else -1.0
            norm = np.linalg.norm(out[row])
            if norm > 0:
                out[row] /= norm
        return out
