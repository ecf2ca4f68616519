"""The fact store of SPEC section 5: memory-mapped K/V/meta arrays plus everything needed to encode
more facts identically (raw embeddings, the K/V encoder weights, the embedding model's name).

Layout (relative to the store folder; every array's shape and dtype is in `manifest.json`):
  K.npy (N,d_k)  V.npy (N,d_v)  meta/{ctx_vec,tau_min,tau_max,entity_ids,rel_ids,alive}.npy
  meta/id_maps.json  raw/{e_h,e_r,e_t,e_c}.npy  kv_encoder.safetensors  facts.jsonl  extra/<name>.npy
  index_<method>/ (written by KnowledgeIndex)
`entity_ids` is (N,2) = [head, tail] (tail -1 for a literal without id), ints from `id_maps.json`.
A fact's index never changes: deletes zero the row and clear `alive`, adds append.
faiss stays out of this file; `open_kb` imports the index module only when asked for an index.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from kblampp.progress import progress_bar

from kblampp.embedding import Embedder, embed_unique
from kblampp.kv_encoder import KVEncoder, load_kv_encoder, save_kv_encoder, weights_hash
from kblampp.schema import Fact, SchemaError, check_fact, fact_from_dict
from kblampp.store_io import (StoreError, atomic_dir, check_no_unfinished_commit, check_npy, commit_files,
                              commit_lock, load_npy, read_json, recover, save_npy, sha256_file, write_json_atomic,
                              new_store_id, writer_lock)

FORMAT = "kblampp-store"
RAW = ("e_h", "e_r", "e_t", "e_c")
ENCODER_FILE = "kv_encoder.safetensors"


# ---- encoding ----------------------------------------------------------------------------------

def embed_facts(embedder: Embedder, facts: Sequence[Fact], batch_size: int = 64,
                progress: bool = True) -> dict[str, np.ndarray]:
    """Raw float32 embeddings e_h, e_r, e_t, e_c (N, d_ctx); every distinct string embedded once."""
    fields = ([f.head_name for f in facts], [f.relation_name for f in facts],
              [f.tail_name for f in facts], [f.sentence for f in facts])
    table, index = embed_unique(embedder, [t for col in fields for t in col], batch_size, progress)
    n = len(facts)
    return {name: table[index[i * n:(i + 1) * n]] for i, name in enumerate(RAW)}


def embed_facts_in_parts(embedder: Embedder, facts: Sequence[Fact], parts_dir: str | Path, part_size: int = 50_000,
                         batch_size: int = 128, progress: bool = True) -> dict[str, np.ndarray]:
    """`embed_facts` part by part, each part saved in `parts_dir` when done, so an embedding of hours
    (10^6 facts: ~80 min on 2 cores) that is stopped resumes at the first missing part. A name that
    recurs in several parts is embedded once per part. The folder records the model, the fact count and
    the part size; a folder made for others is refused, not mixed in."""
    from safetensors.numpy import load_file, save_file

    parts_dir = Path(parts_dir)
    meta = {"embedding_model": embedder.name, "n_facts": len(facts), "part_size": part_size}
    meta_path = parts_dir / "parts.json"
    if meta_path.is_file() and read_json(meta_path) != meta:
        raise StoreError(f"{meta_path}: embedding parts of {read_json(meta_path)}, not of {meta}: use another folder")
    parts_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(meta_path, meta)
    out = {k: np.empty((len(facts), embedder.dim), np.float32) for k in RAW}
    starts = range(0, len(facts), part_size)
    for i, start in enumerate(progress_bar(starts, desc="embedding parts", unit="part", disable=not progress)):
        path, chunk = parts_dir / f"part_{i:05d}.safetensors", facts[start:start + part_size]
        if path.is_file():
            arrays = load_file(str(path))
        else:
            arrays = embed_facts(embedder, chunk, batch_size, progress)
            tmp = path.with_suffix(".tmp")
            save_file({k: np.ascontiguousarray(arrays[k], np.float32) for k in RAW}, str(tmp))
            tmp.replace(path)
        for k in RAW:
            out[k][start:start + len(chunk)] = arrays[k]
    return out


def fact_times(facts: Sequence[Fact]) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([f.tau_min for f in facts], dtype=np.float32),
            np.array([f.tau_max for f in facts], dtype=np.float32))


@torch.no_grad()
def compute_kv(encoder: KVEncoder, raw: dict[str, np.ndarray], tau_min: np.ndarray, tau_max: np.ndarray,
               chunk: int = 8192, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """K, V (float32) from raw embeddings in chunks; the exact computation a reload repeats."""
    n = len(tau_min)
    K = np.zeros((n, encoder.config.d_k), np.float32)
    V = np.zeros((n, encoder.config.d_v), np.float32)
    lo, hi = torch.from_numpy(np.array(tau_min, np.float32)), torch.from_numpy(np.array(tau_max, np.float32))
    for s in progress_bar(range(0, n, chunk), desc="encode K/V", disable=not progress or n <= chunk):
        e = slice(s, s + chunk)
        t = {k: torch.from_numpy(np.array(raw[k][e], dtype=np.float32)) for k in RAW}
        K[e] = encoder.encode_keys(t["e_h"], t["e_r"]).numpy()
        V[e] = encoder.encode_values(t["e_t"], t["e_c"], lo[e], hi[e]).numpy()
    return K, V


def _id_key(obj: dict) -> str | None:
    return obj["id"] if obj.get("id") is not None else None


def assign_ids(facts: Sequence[Fact], maps: dict[str, dict[str, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(entity_ids (n,2), rel_ids (n,)) growing `maps` in place; id-less heads/relations use their name."""
    ents, rels = maps.setdefault("entities", {}), maps.setdefault("relations", {})
    e_ids = np.full((len(facts), 2), -1, np.int64)
    r_ids = np.zeros(len(facts), np.int64)
    for i, f in enumerate(facts):
        e_ids[i, 0] = ents.setdefault(f.head_id or f"name:{f.head_name}", len(ents))
        if f.tail_id is not None:
            e_ids[i, 1] = ents.setdefault(f.tail_id, len(ents))
        r_ids[i] = rels.setdefault(f.relation_id or f"name:{f.relation_name}", len(rels))
    return e_ids, r_ids


def _facts_jsonl(facts: Sequence[Fact]) -> bytes:
    return "".join(json.dumps(f.raw, ensure_ascii=False, sort_keys=True) + "\n" for f in facts).encode("utf-8")


def _array_entry(a: np.ndarray) -> dict:
    return {"shape": list(a.shape), "dtype": str(a.dtype)}


def write_store(store_dir: str | Path, facts: Sequence[Fact], raw: dict[str, np.ndarray],
                encoder: KVEncoder, embedding_model: str, source_path: str | Path | None = None,
                dtype: str = "float32", progress: bool = True) -> dict:
    """Encode and write a whole store atomically (temp folder, then swap); returns the manifest."""
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype: {dtype!r} is not float32 or float16")
    tau_min, tau_max = fact_times(facts)
    K, V = compute_kv(encoder, raw, tau_min, tau_max, progress=progress)
    maps: dict[str, dict[str, int]] = {}
    entity_ids, rel_ids = assign_ids(facts, maps)
    arrays = {"K.npy": K.astype(dtype, copy=False), "V.npy": V.astype(dtype, copy=False),  # no second copy
              "meta/ctx_vec.npy": raw["e_c"].astype(dtype, copy=False), "meta/tau_min.npy": tau_min,
              "meta/tau_max.npy": tau_max, "meta/entity_ids.npy": entity_ids, "meta/rel_ids.npy": rel_ids,
              "meta/alive.npy": np.ones(len(facts), bool)}
    arrays.update({f"raw/{k}.npy": np.asarray(raw[k], np.float32) for k in RAW})
    cfg = encoder.config
    manifest = {
        "format": FORMAT, "format_version": 1, "store_uid": new_store_id(), "keys_version": 0,
        "n": len(facts), "d_k": cfg.d_k, "d_v": cfg.d_v, "d_ctx": cfg.d_ctx, "d_tau": cfg.d_tau,
        "dtype": dtype, "embedding_model": embedding_model,
        "kv_encoder": {"file": ENCODER_FILE, "sha256": weights_hash(encoder), "config": vars(cfg).copy()},
        "source": None if source_path is None else {"path": str(source_path),
                                                    "sha256": sha256_file(source_path)},
        "arrays": {name: _array_entry(a) for name, a in arrays.items()},
        "extra": {}, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    exists = (Path(store_dir) / "manifest.json").is_file()
    with writer_lock(store_dir) if exists else contextlib.nullcontext(), atomic_dir(store_dir) as tmp:
        (tmp / "meta").mkdir()
        (tmp / "raw").mkdir()
        for name, a in arrays.items():
            save_npy(tmp / name, a)
        write_json_atomic(tmp / "meta/id_maps.json", maps)
        (tmp / "facts.jsonl").write_bytes(_facts_jsonl(facts))
        save_kv_encoder(encoder, tmp / ENCODER_FILE)
        write_json_atomic(tmp / "manifest.json", manifest)
    return manifest


# ---- the store -----------------------------------------------------------------------------------

def _check_facts_file(path: Path, n: int) -> np.ndarray:
    """Byte offsets of each line's start; the line count must be N."""
    if not path.is_file():
        raise StoreError(f"{path}: missing (the store keeps a copy of its facts)")
    data = np.fromfile(path, dtype=np.uint8)
    ends = np.flatnonzero(data == 10)
    if len(ends) != n or (len(data) and data[-1] != 10):
        raise StoreError(f"{path}: {len(ends)} complete lines, the manifest says n = {n}")
    return np.concatenate([[0], ends + 1]).astype(np.int64)


class KBValueStore:
    """A loaded store; see the module doc. Edits need `embedder=` at load time and are not
    thread-safe: a server serialises edits with a lock (reads may run alongside)."""

    def __init__(self, root: Path, mmap: bool, embedder: Embedder | None):
        self.root, self.mmap, self.embedder = root, mmap, embedder
        self.extra_builders: dict[str, Callable[[list[dict]], np.ndarray]] = {}
        self._crash_after: str | None = None  # tests set "stage" / "commit" to simulate a crash
        self._open()

    @classmethod
    def load(cls, store_dir: str | Path, mmap: bool = True, embedder: Embedder | None = None,
             read_only: bool = False) -> "KBValueStore":
        """Open a store, checking every array, the encoder hash and the embedder against the manifest.

        `read_only`: never write (no recovery of an interrupted edit) and read under the shared commit
        lock, so a writer's commit is never seen half applied."""
        root = Path(store_dir)
        if not root.is_dir():
            raise StoreError(f"{root}: store folder not found (run offline/encode_kv.py)")
        if read_only:
            with commit_lock(root, exclusive=False):
                check_no_unfinished_commit(root)
                return cls(root, mmap, embedder)
        recover(root)
        return cls(root, mmap, embedder)

    def _open(self) -> None:
        root, m = self.root, read_json(self.root / "manifest.json", "store manifest")
        where = root / "manifest.json"
        if m.get("format") != FORMAT:
            raise StoreError(f"{where}: format: not a KBLaM++ store manifest")
        for key in ("n", "d_k", "d_v", "d_ctx", "dtype", "arrays", "kv_encoder", "embedding_model", "store_uid",
                    "keys_version"):
            if key not in m:
                raise StoreError(f"{where}: {key}: missing field")
        n = m["n"]
        expect = {"K.npy": ([n, m["d_k"]], m["dtype"]), "V.npy": ([n, m["d_v"]], m["dtype"]),
                  "meta/ctx_vec.npy": ([n, m["d_ctx"]], m["dtype"]), "meta/tau_min.npy": ([n], "float32"),
                  "meta/tau_max.npy": ([n], "float32"), "meta/entity_ids.npy": ([n, 2], "int64"),
                  "meta/rel_ids.npy": ([n], "int64"), "meta/alive.npy": ([n], "bool"),
                  **{f"raw/{k}.npy": ([n, m["d_ctx"]], "float32") for k in RAW}}
        for name, (shape, dtype) in expect.items():
            entry = m["arrays"].get(name)
            if entry is None:
                raise StoreError(f"{where}: arrays: {name} not listed")
            if entry["shape"] != shape or entry["dtype"] != dtype:
                raise StoreError(f"{where}: arrays.{name}: {entry} disagrees with n={n}, dims and dtype "
                                 f"(expected shape {shape}, dtype {dtype})")
        for name, entry in {**m["arrays"], **{f"extra/{k}.npy": v for k, v in m.get("extra", {}).items()}}.items():
            check_npy(root / name, tuple(entry["shape"]), entry["dtype"])
        arrays = {name: load_npy(root / name, self.mmap) for name in m["arrays"]}
        encoder = load_kv_encoder(root / ENCODER_FILE)
        enc_hash = weights_hash(encoder)
        if enc_hash != m["kv_encoder"]["sha256"]:
            raise StoreError(f"{root / ENCODER_FILE}: weights hash {enc_hash[:12]} does not match the "
                             f"manifest's kv_encoder.sha256 {m['kv_encoder']['sha256'][:12]}")
        cfg = encoder.config
        if (cfg.d_ctx, cfg.d_k, cfg.d_v) != (m["d_ctx"], m["d_k"], m["d_v"]):
            raise StoreError(f"{root / ENCODER_FILE}: encoder dims (d_ctx, d_k, d_v) = "
                             f"{(cfg.d_ctx, cfg.d_k, cfg.d_v)}, manifest {(m['d_ctx'], m['d_k'], m['d_v'])}")
        if self.embedder is not None and (self.embedder.name != m["embedding_model"] or self.embedder.dim != m["d_ctx"]):
            raise StoreError(f"{where}: embedding_model: store was encoded with {m['embedding_model']!r} "
                             f"(d_ctx {m['d_ctx']}), the embedder given is {self.embedder.name!r} (dim {self.embedder.dim})")
        offsets = _check_facts_file(root / "facts.jsonl", n)
        id_maps = read_json(root / "meta/id_maps.json", "id maps")
        # assign together, so a reader never mixes an old manifest with new arrays
        self.arrays, self.encoder, self._offsets, self.id_maps, self.manifest = arrays, encoder, offsets, id_maps, m

    # ---- properties --------------------------------------------------------------------------
    n = property(lambda self: int(self.manifest["n"]))
    d_k = property(lambda self: int(self.manifest["d_k"]))
    d_v = property(lambda self: int(self.manifest["d_v"]))
    d_ctx = property(lambda self: int(self.manifest["d_ctx"]))
    alive = property(lambda self: np.asarray(self.arrays["meta/alive.npy"]))

    @property
    def store_id(self) -> str:
        """Identity of the keys an index must match: changes on every add/replace/delete."""
        return f"{self.manifest['store_uid']}@{self.manifest['keys_version']}"

    def index_dir(self, method: str) -> Path:
        return self.root / f"index_{method}"

    # ---- reading -----------------------------------------------------------------------------
    def fetch(self, indices: torch.Tensor, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """Rows for `indices` (any shape): K, V, ctx_vec (float32), tau_min/max, entity_ids, rel_ids, alive."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        flat = idx.reshape(-1).cpu().numpy()
        if flat.size and (flat.min() < 0 or flat.max() >= self.n):
            bad = flat[(flat < 0) | (flat >= self.n)][0]
            raise IndexError(f"fact index {int(bad)} out of range 0..{self.n - 1}")
        names = {"K": "K.npy", "V": "V.npy", "ctx_vec": "meta/ctx_vec.npy", "tau_min": "meta/tau_min.npy",
                 "tau_max": "meta/tau_max.npy", "entity_ids": "meta/entity_ids.npy",
                 "rel_ids": "meta/rel_ids.npy", "alive": "meta/alive.npy"}
        out = {}
        for key, name in names.items():
            rows = np.asarray(self.arrays[name][flat])
            if rows.dtype == np.float16:
                rows = rows.astype(np.float32)
            out[key] = torch.from_numpy(np.ascontiguousarray(rows)).reshape(*idx.shape, *rows.shape[1:]).to(device or "cpu")
        return out

    def keys_tensor(self) -> torch.Tensor:
        return torch.from_numpy(np.array(self.arrays["K.npy"], dtype=np.float32))

    def values_tensor(self) -> torch.Tensor:
        return torch.from_numpy(np.array(self.arrays["V.npy"], dtype=np.float32))

    def alive_tensor(self) -> torch.Tensor:
        return torch.from_numpy(np.array(self.alive))

    def raw(self, name: str) -> np.ndarray:
        """Raw embedding array e_h / e_r / e_t / e_c (N, d_ctx) float32, for recomputing K/V."""
        if name not in RAW:
            raise KeyError(f"raw embedding {name!r} is not one of {RAW}")
        return self.arrays[f"raw/{name}.npy"]

    def fact(self, i: int) -> dict:
        """The source 5-tuple of fact `i` (deleted facts keep their record; see `alive`)."""
        if not 0 <= i < self.n:
            raise IndexError(f"fact index {i} out of range 0..{self.n - 1}")
        with open(self.root / "facts.jsonl", "rb") as handle:
            handle.seek(int(self._offsets[i]))
            return json.loads(handle.read(int(self._offsets[i + 1] - self._offsets[i])))

    def read_extra(self, name: str) -> np.ndarray:
        if name not in self.manifest.get("extra", {}):
            raise KeyError(f"{self.root}: no extra array {name!r} (have: {sorted(self.manifest.get('extra', {}))})")
        return load_npy(self.root / f"extra/{name}.npy", self.mmap)

    # ---- writing -----------------------------------------------------------------------------
    def write_extra(self, name: str, array: np.ndarray) -> None:
        """Save `extra/<name>.npy` (e.g. tail token ids) and list it in the manifest, atomically.

        Arrays whose first dimension is N are per-fact: later edits must supply their rows
        (`extra_rows=` or a builder registered in `extra_builders[name]`)."""
        if not name.isidentifier():
            raise ValueError(f"extra name {name!r}: use letters, digits and underscores")
        array = np.asarray(array)
        if array.dtype == object:
            raise ValueError(f"extra {name!r}: object arrays are not allowed (no pickle)")
        m = json.loads(json.dumps(self.manifest))
        m.setdefault("extra", {})[name] = {**_array_entry(array), "per_fact": bool(array.ndim and len(array) == self.n)}
        self._commit({f"extra/{name}.npy": array}, m, None)

    def _need_edit(self) -> None:
        if self.embedder is None:
            raise RuntimeError(f"{self.root}: editing facts needs the embedding model: "
                               f"KBValueStore.load(..., embedder=load_embedder({self.manifest['embedding_model']!r}))")

    def _parse(self, objs: Sequence[dict], label: str) -> list[Fact]:
        problems = [p for line, obj in enumerate(objs, start=1) for p in check_fact(obj, line)]
        if problems:
            raise SchemaError(label, problems)
        return [fact_from_dict(json.loads(json.dumps(o))) for o in objs]

    def _encode(self, facts: list[Fact]) -> dict[str, np.ndarray]:
        raw = embed_facts(self.embedder, facts, progress=False)
        tau_min, tau_max = fact_times(facts)
        K, V = compute_kv(self.encoder, raw, tau_min, tau_max, progress=False)
        return {"raw": raw, "K": K, "V": V, "tau_min": tau_min, "tau_max": tau_max}

    def _extra_rows(self, facts: list[Fact], given: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        rows = {}
        for name, entry in self.manifest.get("extra", {}).items():
            if not entry.get("per_fact"):
                continue
            if given and name in given:
                rows[name] = np.asarray(given[name])
            elif name in self.extra_builders:
                rows[name] = np.asarray(self.extra_builders[name]([f.raw for f in facts]))
            else:
                raise ValueError(f"{self.root}: per-fact extra array {name!r} needs rows for the edited facts "
                                 f"(pass extra_rows={{{name!r}: ...}} or register extra_builders[{name!r}])")
            want = (len(facts), *entry["shape"][1:])
            if rows[name].shape != want:
                raise ValueError(f"extra_rows[{name!r}]: shape {rows[name].shape}, expected {want}")
        return rows

    def _row_arrays(self, enc: dict, facts: list[Fact], maps: dict) -> dict[str, np.ndarray]:
        e_ids, r_ids = assign_ids(facts, maps)
        dt = self.manifest["dtype"]
        out = {"K.npy": enc["K"].astype(dt), "V.npy": enc["V"].astype(dt),
               "meta/ctx_vec.npy": enc["raw"]["e_c"].astype(dt), "meta/tau_min.npy": enc["tau_min"],
               "meta/tau_max.npy": enc["tau_max"], "meta/entity_ids.npy": e_ids, "meta/rel_ids.npy": r_ids,
               "meta/alive.npy": np.ones(len(facts), bool)}
        out.update({f"raw/{k}.npy": enc["raw"][k] for k in RAW})
        return out

    def add_facts(self, facts: Sequence[dict], index: Any = None,
                  extra_rows: dict[str, np.ndarray] | None = None) -> list[int]:
        """Append 5-tuple dicts (indices N, N+1, ...); `index` (a KnowledgeIndex) is updated in the same commit."""
        self._need_edit()
        parsed = self._parse(facts, "<add_facts>")
        if not parsed:
            return []
        enc, maps = self._encode(parsed), json.loads(json.dumps(self.id_maps))
        rows, extra = self._row_arrays(enc, parsed, maps), self._extra_rows(parsed, extra_rows)
        n0, n1 = self.n, self.n + len(parsed)
        new = {name: np.concatenate([np.asarray(self.arrays[name]), a]) for name, a in rows.items()}
        new.update({f"extra/{k}.npy": np.concatenate([np.asarray(self.read_extra(k)), v]) for k, v in extra.items()})
        ids = list(range(n0, n1))
        if index is not None:
            index.add(enc["K"], np.array(ids), exact=True)
        self._edit(new, maps, n1, index, facts_tail=_facts_jsonl(parsed))
        return ids

    def replace_fact(self, i: int, fact: dict, index: Any = None,
                     extra_rows: dict[str, np.ndarray] | None = None) -> None:
        """Re-encode fact `i` from a new 5-tuple (same index); the index entry is swapped."""
        self._need_edit()
        self.fact(i)  # bounds check
        parsed = self._parse([fact], f"<replace_fact {i}>")
        enc, maps = self._encode(parsed), json.loads(json.dumps(self.id_maps))
        rows, extra = self._row_arrays(enc, parsed, maps), self._extra_rows(parsed, extra_rows)
        new = {}
        for name, a in {**rows, **{f"extra/{k}.npy": v for k, v in extra.items()}}.items():
            arr = np.array(self.arrays[name] if name in self.arrays else self.read_extra(name[6:-4]))
            arr[i] = a[0]
            new[name] = arr
        if index is not None:
            index.remove([i])
            index.add(enc["K"], np.array([i]), exact=True)
        self._edit(new, maps, self.n, index, replace_line=(i, parsed[0]))

    def delete_fact(self, i: int, index: Any = None) -> None:
        """Mark fact `i` deleted: zero its K/V/ctx rows, clear `alive`, drop it from `index`."""
        self.fact(i)
        new = {}
        for name in ("K.npy", "V.npy", "meta/ctx_vec.npy", "meta/alive.npy"):
            arr = np.array(self.arrays[name])
            arr[i] = 0
            new[name] = arr
        if index is not None:
            index.remove([i])
        self._edit(new, self.id_maps, self.n, index)

    def _edit(self, arrays: dict[str, np.ndarray], maps: dict, n: int, index: Any,
              facts_tail: bytes | None = None, replace_line: tuple[int, Fact] | None = None) -> None:
        m = json.loads(json.dumps(self.manifest))
        m["n"], m["keys_version"] = n, m["keys_version"] + 1
        for name, a in arrays.items():
            target = m["extra"][name[6:-4]] if name.startswith("extra/") else m["arrays"][name]
            target.update(_array_entry(a))
        facts_path = self.root / "facts.jsonl"
        old = facts_path.read_bytes()
        if facts_tail is not None:
            data = old + facts_tail
        elif replace_line is not None:
            i, fact = replace_line
            lo, hi = int(self._offsets[i]), int(self._offsets[i + 1])
            data = old[:lo] + _facts_jsonl([fact]) + old[hi:]
        else:
            data = old
        writers: dict[str, Callable[[Path], None]] = {"facts.jsonl": lambda p: p.write_bytes(data),
                                                      "meta/id_maps.json": lambda p: write_json_atomic(p, maps)}
        self._commit(arrays, m, index, writers)

    def _commit(self, arrays: dict[str, np.ndarray], manifest: dict, index: Any,
                writers: dict[str, Callable[[Path], None]] | None = None) -> None:
        writers = dict(writers or {})
        for name, a in arrays.items():
            writers[name] = lambda p, a=a: save_npy(p, a)
        if index is not None:
            index.store_id, index.n = f"{manifest['store_uid']}@{manifest['keys_version']}", manifest["n"]
            for name, write in index.writers().items():
                writers[f"index_{index.method}/{name}"] = write
        writers["manifest.json"] = lambda p: write_json_atomic(p, manifest)
        try:  # the old memory maps stay valid while files are replaced (POSIX rename semantics)
            with writer_lock(self.root):  # refused while another process (a server) writes this store
                commit_files(self.root, writers, _crash_after=self._crash_after)
        finally:
            self._open()

    def apply_changes(self, changes: list[tuple[int, dict | None, bool]], encoded: dict[str, Any],
                      index: Any = None, extras: dict[str, np.ndarray] | None = None) -> None:
        """Fold many edits into the store in ONE commit (each array written once, not once per edit).

        `changes`: (fact index, new 5-tuple dict or None to keep the stored record, alive), the final
        state per index; indices >= n must be n, n+1, ... (appends, which need their 5-tuple). The rows
        in `encoded` ("K", "V", "tau_min", "tau_max", "raw": {e_h, e_r, e_t, e_c}, as `_encode` gives)
        belong, in order, to the changes that carry a dict, so nothing is embedded again. A change with
        alive False is a delete (K/V/ctx rows zeroed, `alive` cleared). `index` (already holding the
        final keys) is committed with them; `extras` are whole extra arrays for the same commit."""
        n0 = self.n
        with_fact = [(i, f) for i, f, _ in changes if f is not None]
        added = sorted(i for i, _, _ in changes if i >= n0)
        if added != list(range(n0, n0 + len(added))) or any(i >= n0 for i, f, _ in changes if f is None):
            raise ValueError(f"apply_changes: appends must be facts at {n0}, {n0 + 1}, ... (got {added[:5]})")
        parsed = self._parse([f for _, f in with_fact], "<apply_changes>")
        maps = json.loads(json.dumps(self.id_maps))
        rows = self._row_arrays(encoded, parsed, maps) if parsed else {}
        rows.update({f"extra/{k}.npy": v for k, v in (self._extra_rows(parsed, None) if parsed else {}).items()})
        n1, pos = n0 + len(added), np.array([i for i, _ in with_fact], np.int64)
        new: dict[str, np.ndarray] = {}
        names = [*self.manifest["arrays"], *(f"extra/{k}.npy" for k, e in self.manifest.get("extra", {}).items()
                                            if e.get("per_fact"))]
        for name in names:
            old = np.asarray(self.arrays[name] if name in self.arrays else self.read_extra(name[6:-4]))
            arr = np.zeros((n1, *old.shape[1:]), old.dtype)
            arr[:n0] = old
            if name in rows and len(pos):
                arr[pos] = rows[name]
            new[name] = arr
        dead = np.array([i for i, _, alive in changes if not alive], np.int64)
        for name in ("K.npy", "V.npy", "meta/ctx_vec.npy", "meta/alive.npy"):
            new[name][dead] = 0
        lines = self.root.joinpath("facts.jsonl").read_bytes().splitlines(keepends=True) + [b""] * len(added)
        for (i, _), fact in zip(with_fact, parsed):
            lines[i] = _facts_jsonl([fact])
        new.update({f"extra/{name}.npy": np.asarray(a) for name, a in (extras or {}).items()})
        m = json.loads(json.dumps(self.manifest))
        m["n"], m["keys_version"] = n1, m["keys_version"] + 1
        for name, a in new.items():
            if name.startswith("extra/"):
                key = name[6:-4]
                per_fact = key not in (extras or {}) and m.setdefault("extra", {}).get(key, {}).get("per_fact", False)
                m.setdefault("extra", {})[key] = {**_array_entry(a), "per_fact": per_fact}
            else:
                m["arrays"][name].update(_array_entry(a))
        data = b"".join(lines)
        self._commit(new, m, index, {"facts.jsonl": lambda p: p.write_bytes(data),
                                     "meta/id_maps.json": lambda p: write_json_atomic(p, maps)})


def encode_file(tuples_path: str | Path, store_dir: str | Path, embedding_model: str, d_k: int, d_v: int,
                d_tau: int = 32, d_ctx: int | None = None, kv_encoder: str | Path | None = None,
                dtype: str = "float32", batch_size: int = 64, hidden: int = 512, seed: int = 0,
                embedder: Embedder | None = None, progress: bool = True) -> dict:
    """The whole `offline/encode_kv.py` step; returns a report (manifest, timings, what was reused).

    With `kv_encoder` (trained weights) and an existing store of the same source file and embedding
    model, the stored raw embeddings are reused, so only the MLPs run again."""
    from kblampp.schema import load_facts

    t0 = time.perf_counter()
    facts = load_facts(tuples_path)
    if not facts:
        raise ValueError(f"{tuples_path}: no facts (an empty store is not useful)")
    source_sha = sha256_file(tuples_path)
    raw, reused = None, False
    if kv_encoder is not None and (Path(store_dir) / "manifest.json").is_file():
        try:
            old = KBValueStore.load(store_dir)
        except StoreError:
            old = None
        if (old is not None and (old.manifest.get("source") or {}).get("sha256") == source_sha
                and old.manifest["embedding_model"] == embedding_model and old.n == len(facts)):
            raw, reused, dim = {k: np.array(old.raw(k)) for k in RAW}, True, old.d_ctx
    if raw is None:
        embedder = embedder or _load_embedder(embedding_model)
        if embedder.name != embedding_model:
            raise ValueError(f"embedder {embedder.name!r} is not the configured {embedding_model!r}")
        dim = embedder.dim
        raw = embed_facts(embedder, facts, batch_size=batch_size, progress=progress)
    if d_ctx is not None and d_ctx != dim:
        raise ValueError(f"d_ctx: config says {d_ctx}, the embedding model {embedding_model!r} gives {dim}")
    t_embed = time.perf_counter()
    if kv_encoder is None:
        encoder = KVEncoder(dim, d_k, d_v, d_tau, hidden=hidden, seed=seed)
    else:
        encoder = load_kv_encoder(kv_encoder)  # a trained encoder's config: its metadata or its shapes
        got = encoder.config
        if (got.d_ctx, got.d_k, got.d_v, got.d_tau) != (dim, d_k, d_v, d_tau):
            raise ValueError(f"{kv_encoder}: encoder dims (d_ctx, d_k, d_v, d_tau) = "
                             f"{(got.d_ctx, got.d_k, got.d_v, got.d_tau)}, config wants {(dim, d_k, d_v, d_tau)}")
    manifest = write_store(store_dir, facts, raw, encoder.eval(), embedding_model, tuples_path, dtype, progress)
    t_end = time.perf_counter()
    return {"manifest": manifest, "n": len(facts), "reused_raw": reused, "embed_s": t_embed - t0,
            "kv_and_write_s": t_end - t_embed, "total_s": t_end - t0}


def _load_embedder(name: str) -> Embedder:
    from kblampp.embedding import load_embedder

    return load_embedder(name)


def build_store_index(store_dir: str | Path, method: str = "hnsw", similarity: str = "cosine",
                      **params) -> dict:
    """The `offline/build_index.py` step: index the live keys, check ntotal, save `index_<method>/`."""
    from kblampp.knowledge_index import KnowledgeIndex  # faiss only here

    store = KBValueStore.load(store_dir)
    ids = np.flatnonzero(store.alive)
    t0 = time.perf_counter()
    keys = np.asarray(store.arrays["K.npy"], dtype=np.float32)[ids]
    if method == "milvus" and not params.get("uri"):  # default: a Milvus Lite file inside index_milvus/
        params["uri"] = str(store.index_dir(method) / "milvus.db")
    index = KnowledgeIndex.build(keys, method, similarity, ids=ids, store_id=store.store_id, n=store.n, **params)
    build_s = time.perf_counter() - t0
    if index.ntotal != len(ids):  # == N unless facts were deleted
        raise StoreError(f"{store.index_dir(method)}: ntotal {index.ntotal} != live facts {len(ids)}")
    index.save(store.index_dir(method))
    KnowledgeIndex.load(store.index_dir(method), expect_n=store.n, expect_dim=store.d_k,
                        expect_store_id=store.store_id)
    return {"path": str(store.index_dir(method)), "ntotal": index.ntotal, "n": store.n,
            "build_s": build_s, "params": index.params}


def open_kb(store_dir: str | Path, method: str | None = None, embedder: Embedder | None = None,
            mmap: bool = True, read_only: bool = False):
    """(store, index): the index of `method` (or the only `index_*` folder; None if there is none)."""
    store = KBValueStore.load(store_dir, mmap=mmap, embedder=embedder, read_only=read_only)
    found = sorted(p.name[len("index_"):] for p in store.root.glob("index_*") if p.is_dir())
    if method is None:
        if len(found) > 1:
            raise StoreError(f"{store.root}: several indexes ({', '.join(found)}): pass method=")
        if not found:
            return store, None
        method = found[0]
    from kblampp.knowledge_index import KnowledgeIndex  # faiss only when an index is wanted

    index = KnowledgeIndex.load(store.index_dir(method), expect_n=store.n, expect_dim=store.d_k,
                                expect_store_id=store.store_id)
    return store, index


__all__ = ["KBValueStore", "open_kb", "write_store", "encode_file", "build_store_index", "embed_facts",
           "embed_facts_in_parts", "compute_kv", "assign_ids"]
