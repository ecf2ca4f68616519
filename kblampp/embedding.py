"""Sentence embeddings for the fact texts (SPEC section 3/5): one loader for the embedded MiniLM,
hub ids and local folders, always through transformers AutoModel + the model's own pooling.

We avoid the sentence-transformers runtime so that the same code path serves every model; the
pooling mode (mean / cls / max) is read from a sentence-transformers folder's `1_Pooling/config.json`
when there is one (bge uses CLS, MiniLM mean), mean pooling otherwise. Outputs are L2-normalised.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from kblampp.progress import progress_bar

from kblampp.embedded import resolve_embedding_model

def embedded_path(name: str) -> Path:
    """Folder of an `embedded:` model shipped inside a PyPI package (no hub, no network)."""
    return Path(resolve_embedding_model(name))


def _read_json(folder: Path | None, name: str, repo: str | None) -> dict | None:
    """A small json file of a local folder, or (best effort) of a cached/hub repo."""
    if folder is not None:
        path = folder / name
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(repo, name)).read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - not a sentence-transformers repo: fall back to defaults
        return None


def _pooling_mode(folder: Path | None, repo: str | None) -> str:
    modules = _read_json(folder, "modules.json", repo) or []
    pool_dir = next((m.get("path") for m in modules if str(m.get("type", "")).endswith("Pooling")), None)
    cfg = _read_json(folder, f"{pool_dir}/config.json", repo) if pool_dir else None
    if not cfg:
        return "mean"
    for mode in ("cls", "max", "mean"):
        if cfg.get(f"pooling_mode_{mode}_token") or cfg.get(f"pooling_mode_{mode}_tokens"):
            return mode
    return "mean"


class Embedder:
    """A loaded sentence-embedding model: `.name`, `.dim`, `.encode(texts) -> (n, dim) float32`."""

    def __init__(self, name: str, model: torch.nn.Module, tokenizer, pooling: str, max_length: int,
                 device: str = "cpu"):
        self.name, self.model, self.tokenizer = name, model.eval().to(device), tokenizer
        self.pooling, self.max_length, self.device = pooling, max_length, device
        self.dim = int(model.config.hidden_size)

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "max":
            return hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = True) -> np.ndarray:
        """Normalised float32 embeddings in input order; batches sorted by length for speed."""
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        bar = progress_bar(total=len(texts), desc=f"embed {self.name}", unit="sent",
                   disable=not progress or len(texts) <= batch_size)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state
            vec = torch.nn.functional.normalize(self._pool(hidden, batch["attention_mask"]).float(), dim=-1)
            out[idx] = vec.cpu().numpy()
            bar.update(len(idx))
        bar.close()
        return out


def load_embedder(name: str, device: str = "cpu") -> Embedder:
    """Load `embedded:all-MiniLM-L6-v2`, a local folder or a hub id (never trust_remote_code)."""
    from transformers import AutoModel, AutoTokenizer

    if name.startswith("embedded:"):
        folder: Path | None = embedded_path(name)
    else:
        folder = Path(name).expanduser() if Path(name).expanduser().is_dir() else None
    source = str(folder) if folder is not None else name
    local = folder is not None  # local folders (the embedded model included) never touch the hub
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
    model = AutoModel.from_pretrained(source, local_files_only=local)
    pooling = _pooling_mode(folder, None if local else name)
    st_cfg = _read_json(folder, "sentence_bert_config.json", None if local else name) or {}
    limits = [st_cfg.get("max_seq_length"), getattr(model.config, "max_position_embeddings", None), 512]
    max_length = min(int(x) for x in limits if x)
    return Embedder(name, model, tokenizer, pooling, max_length, device)


def embed_unique(embedder: Embedder, texts: Sequence[str], batch_size: int = 64,
                 progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Embed each distinct string once: returns (table (U, dim), index (len(texts),) into it)."""
    uniq: dict[str, int] = {}
    index = np.fromiter((uniq.setdefault(t, len(uniq)) for t in texts), dtype=np.int64, count=len(texts))
    table = embedder.encode(list(uniq), batch_size=batch_size, progress=progress)
    return table, index
