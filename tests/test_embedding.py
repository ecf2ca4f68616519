"""Embedding loader: tiny random BERT from a local folder (mean pooling) and the embedded MiniLM.

`make_tiny_embedder_dir` is shared with the store tests (a fast, offline, deterministic embedder).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from kblampp.embedding import embed_unique, embedded_path, load_embedder

MINILM = "embedded:all-MiniLM-L6-v2"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def make_tiny_embedder_dir(folder: Path, hidden: int = 32, seed: int = 0, pooling: str | None = None) -> Path:
    """A random 2-layer BERT (hidden 32) with MiniLM's tokenizer, saved as a plain local folder."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(embedded_path(MINILM) / name, folder / name)
    if pooling:
        (folder / "1_Pooling").mkdir()
        (folder / "modules.json").write_text(json.dumps([{"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
        (folder / "1_Pooling/config.json").write_text(json.dumps({f"pooling_mode_{pooling}_token": True}))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_embedder(str(make_tiny_embedder_dir(tmp_path_factory.mktemp("tiny_bert"))))


def test_tiny_local_folder_mean_pooling_matches_manual(tiny):
    texts = ["Alice Zhang", "chief executive officer of a very long company name", "x"]
    out = tiny.encode(texts, batch_size=2, progress=False)
    assert out.shape == (3, 32) and out.dtype == np.float32 and tiny.dim == 32 and tiny.pooling == "mean"
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    with torch.no_grad():  # reference: one sentence at a time, no padding
        for text, row in zip(texts, out):
            enc = tiny.tokenizer([text], return_tensors="pt")
            ref = tiny.model(**enc).last_hidden_state.mean(1)[0]
            np.testing.assert_allclose(row, (ref / ref.norm()).numpy(), atol=1e-5)


def test_batching_and_order_do_not_change_results(tiny):
    texts = [f"entity number {i} " * (i % 5 + 1) for i in range(11)]
    a = tiny.encode(texts, batch_size=3, progress=False)
    b = tiny.encode(texts[::-1], batch_size=64, progress=False)[::-1]
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_embed_unique_dedupes_and_maps_back(tiny):
    texts = ["b", "a", "b", "c", "a"]
    table, index = embed_unique(tiny, texts, progress=False)
    assert table.shape == (3, 32) and index.tolist() == [0, 1, 0, 2, 1]
    np.testing.assert_allclose(table[index], tiny.encode(texts, progress=False), atol=1e-5)


def test_cls_pooling_read_from_sentence_transformers_config(tmp_path):
    emb = load_embedder(str(make_tiny_embedder_dir(tmp_path / "cls", pooling="cls")))
    assert emb.pooling == "cls"
    with torch.no_grad():
        enc = emb.tokenizer(["hello world"], return_tensors="pt")
        ref = emb.model(**enc).last_hidden_state[0, 0]
    np.testing.assert_allclose(emb.encode(["hello world"], progress=False)[0], (ref / ref.norm()).numpy(), atol=1e-5)


def test_unknown_embedded_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"embedding_model: unknown embedded model 'embedded:nope' \(known: embedded:all-minilm-l6-v2\)"):
        load_embedder("embedded:nope")


def test_embedded_minilm_loads_offline_and_ranks_paraphrases(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    emb = load_embedder(MINILM)
    assert emb.dim == 384 and emb.pooling == "mean" and emb.max_length == 256
    v = emb.encode(["Who is the CEO of BrightSky Robotics?", "BrightSky Robotics chief executive officer",
                    "The river flows through the valley."], progress=False)
    assert float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.2
