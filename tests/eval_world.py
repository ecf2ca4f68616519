"""A tiny, fully built evaluation world for the evaluation tests: toy facts and QA, a real store written
by `kb_store.write_store`, a tiny patched Llama whose retrieval is decided by the context score.

The fake embedder is a bag of hashed words, so a question shares most of its vector with its fact's
evidence sentence even after the tail is edited; with gamma large, every candidate in the KB
(K_top = N) and a copy gate near 1, the answer head copies the matching fact's tail exactly.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from kblampp.answer_head import KBCopyGate, load_or_build_tail_table
from kblampp.config import KBConfig
from kblampp.evaluation.runner import EvalContext
from kblampp.inference.loading import build_source
from kblampp.kb_store import KBValueStore, embed_facts, write_store
from kblampp.kv_encoder import KVEncoder
from kblampp.model import KBLaMPP
from kblampp.schema import fact_from_dict, load_facts
from kblampp.training.toy import tiny_tokenizer, toy_facts, toy_qa, write_jsonl
from tiny_models import tiny_llama

D_CTX = 64
STOP = {"where", "who", "was", "in", "for", "the"}


class BowEmbedder:
    """Deterministic bag-of-words embedder (content words hashed into D_CTX buckets), normalised."""

    name, dim = "fake-bow", D_CTX

    def encode(self, texts, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        out = np.zeros((len(texts), D_CTX), np.float32)
        for i, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                if word not in STOP:
                    out[i, int(hashlib.md5(word.encode()).hexdigest(), 16) % D_CTX] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)


def build_world(tmp: Path, n_people: int = 4) -> EvalContext:
    """Store, QA files (train = people 0-1, test = people 2-3) and the EvalContext under `tmp`."""
    raw = toy_facts(n_people)
    facts_path = write_jsonl(raw, tmp / "facts.jsonl")
    write_jsonl(toy_qa(raw, range(0, 2), "train"), tmp / "train.jsonl")
    write_jsonl(toy_qa(raw, range(2, n_people), "test"), tmp / "test.jsonl")
    facts = load_facts(facts_path)
    emb = BowEmbedder()
    encoder = KVEncoder(D_CTX, 16, 16, d_tau=8, hidden=32)
    write_store(tmp / "store", facts, embed_facts(emb, facts, progress=False), encoder, emb.name,
                source_path=facts_path, progress=False)
    store = KBValueStore.load(tmp / "store", embedder=emb)
    cfg = KBConfig(d_k=16, d_v=16, d_ctx=D_CTX, inject_layers=[1], K_top=len(facts), gamma=30.0, eta=3.0,
                   max_new_tokens=8, store_dir=str(tmp / "store"), train_dataset=str(tmp / "train.jsonl"),
                   eval_dataset=str(tmp / "train.jsonl"),
                   test_dataset=str(tmp / "test.jsonl"))
    model = KBLaMPP(tiny_llama(), cfg, d_ctx=D_CTX)
    gate = KBCopyGate(model.d_model, init_bias=20.0)  # g ~ 1: copy whenever a candidate matches
    model.register_kb_module("kb_copy_gate", gate)
    model.eval()
    tok = tiny_tokenizer()
    facts = [fact_from_dict(store.fact(i)) for i in range(store.n)]
    table = load_or_build_tail_table(store, [f.tail_name for f in facts], tok)
    source, _ = build_source(cfg, store)
    return EvalContext(cfg, model, tok, emb.encode, store, source, facts, table, {"test": True})
