"""The K/V encoder of SPEC section 1: `K = MLP_k(e_h (+) e_r)`, `V = MLP_v(e_t (+) e_c (+) e_tau)`,
`e_tau = MLP_tau(features(tau_min, tau_max))`.

Keys and values are separate methods because training recomputes keys from the stored raw
embeddings on the fly. Each MLP is a linear "base" path plus a GELU residual branch; the key base
starts as the projected mean of e_h and e_r and the key branch starts at zero, so keys begin close
to the sentence-embedding geometry that the question embedding `P(e_q)` lives in. Init is seeded.
Weights live in safetensors with the config in its metadata; the hash covers names, shapes,
dtypes and bytes, so a store can tell whether it was encoded by these exact weights.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

DAY_2000 = 10957.0  # 2000-01-01 in days since 1970-01-01
DAYS_PER_DECADE = 3652.5


@dataclass
class KVEncoderConfig:
    d_ctx: int
    d_k: int
    d_v: int
    d_tau: int = 32
    hidden: int = 512
    seed: int = 0


def time_features(tau_min: torch.Tensor, tau_max: torch.Tensor) -> torch.Tensor:
    """(…,) days -> (…, 4): finite flags and decades since 2000 (an infinite end becomes 0)."""
    feats = []
    for tau in (tau_min, tau_max):
        tau = tau.to(torch.float32)
        finite = torch.isfinite(tau)
        feats.append(finite.to(torch.float32))
        feats.append(torch.where(finite, (tau - DAY_2000) / DAYS_PER_DECADE, torch.zeros_like(tau)))
    return torch.stack([feats[0], feats[2], feats[1], feats[3]], dim=-1)


def _semi_orthogonal(out_dim: int, in_dim: int, gen: torch.Generator) -> torch.Tensor:
    """Identity when square, else a random matrix with orthonormal rows/columns (keeps geometry)."""
    if out_dim == in_dim:
        return torch.eye(out_dim)
    q, _ = torch.linalg.qr(torch.randn(max(out_dim, in_dim), min(out_dim, in_dim), generator=gen))
    return q if out_dim > in_dim else q.T


class ResidualMLP(nn.Module):
    """`base(x) + net(x)`: a linear path (init given) plus a GELU MLP branch."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int):
        super().__init__()
        self.base = nn.Linear(in_dim, out_dim, bias=False)
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.net(x)


class TimeEncoder(nn.Module):
    """(tau_min, tau_max) in days -> e_tau (d_tau) through a small MLP over `time_features`."""

    def __init__(self, d_tau: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, d_tau), nn.GELU(), nn.Linear(d_tau, d_tau))

    def forward(self, tau_min: torch.Tensor, tau_max: torch.Tensor) -> torch.Tensor:
        return self.net(time_features(tau_min, tau_max))


class KVEncoder(nn.Module):
    """MLP_k, MLP_v and MLP_tau; parameter names carry the `kb_` prefix (checkpoint selection)."""

    def __init__(self, d_ctx: int, d_k: int, d_v: int, d_tau: int = 32, hidden: int = 512, seed: int = 0):
        super().__init__()
        self.config = KVEncoderConfig(d_ctx, d_k, d_v, d_tau, hidden, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(seed)
            self.kb_key_mlp = ResidualMLP(2 * d_ctx, d_k, hidden)
            self.kb_value_mlp = ResidualMLP(2 * d_ctx + d_tau, d_v, hidden)
            self.kb_time_mlp = TimeEncoder(d_tau)
            with torch.no_grad():
                proj_k = _semi_orthogonal(d_k, d_ctx, gen)
                self.kb_key_mlp.base.weight.copy_(torch.cat([proj_k, proj_k], dim=1) / 2)
                self.kb_key_mlp.net[2].weight.zero_()
                self.kb_key_mlp.net[2].bias.zero_()
                base_v = torch.zeros(d_v, 2 * d_ctx + d_tau)
                base_v[:, :d_ctx] = _semi_orthogonal(d_v, d_ctx, gen)
                self.kb_value_mlp.base.weight.copy_(base_v)

    def encode_keys(self, e_h: torch.Tensor, e_r: torch.Tensor) -> torch.Tensor:
        return self.kb_key_mlp(torch.cat([e_h, e_r], dim=-1))

    def encode_time(self, tau_min: torch.Tensor, tau_max: torch.Tensor) -> torch.Tensor:
        return self.kb_time_mlp(tau_min, tau_max)

    def encode_values(self, e_t: torch.Tensor, e_c: torch.Tensor, tau_min: torch.Tensor,
                      tau_max: torch.Tensor) -> torch.Tensor:
        e_tau = self.encode_time(tau_min, tau_max).to(e_t.dtype)
        return self.kb_value_mlp(torch.cat([e_t, e_c, e_tau], dim=-1))


def weights_hash(encoder: nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save_kv_encoder(encoder: KVEncoder, path: str | Path) -> str:
    """Write weights + config (metadata) atomically; returns the weights hash."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    save_file(tensors, str(tmp), metadata={"config": json.dumps(asdict(encoder.config)),
                                           "format": ENCODER_FORMAT})
    os.replace(tmp, path)
    return weights_hash(encoder)


ENCODER_FORMAT = "kblampp-kv-encoder"
ENCODER_FILE = "kv_encoder.safetensors"
TRAINING_CONFIG = "config.resolved.yaml"
ENCODER_PARTS = ("kb_key_mlp.", "kb_value_mlp.", "kb_time_mlp.")
MODEL_FIELDS = ("embedding_model", "d_k", "d_v", "d_tau", "d_ctx")  # settings the encoder was trained for


class KVEncoderError(ValueError):
    """Weights that are not (or do not contain) a usable K/V encoder; the message names the file."""


def _strip_to_encoder_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept a bigger KB checkpoint: keep keys containing kb_key_mlp/kb_value_mlp/kb_time_mlp."""
    out = {}
    for key, value in tensors.items():
        for part in ENCODER_PARTS:
            if part in key:
                short = key[key.index(part):]
                if short in out:
                    raise KVEncoderError(f"ambiguous checkpoint: two tensors end with {short!r}")
                out[short] = value
    return out


def _header(path: Path) -> tuple[dict[str, str], list[str]]:
    """(metadata, tensor names) of a safetensors file, with the file named in the error."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {}), list(handle.keys())
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise KVEncoderError(f"{path}: not a readable safetensors file ({err})") from None


def _training_config(folder: Path, checkpoint_meta: dict[str, str] | None = None) -> dict | None:
    """The training run's config: embedded in a KB checkpoint, else the folder's config.resolved.yaml."""
    if checkpoint_meta and "config" in checkpoint_meta:
        return json.loads(checkpoint_meta["config"])
    if (folder / TRAINING_CONFIG).is_file():
        import yaml

        return yaml.safe_load((folder / TRAINING_CONFIG).read_text(encoding="utf-8"))
    return None


def encoder_source(path: str | Path) -> tuple[Path, dict | None]:
    """(K/V encoder weights file, training config dict or None) for what a user may pass as an encoder:

    - an encoder file (`kv_encoder.safetensors` of a store or a training run);
    - a store folder or a training run folder (its `kv_encoder.safetensors`);
    - a training checkpoint: `kb_final.safetensors` (Stage A writes the encoder beside it) or a step
      checkpoint's `kb.safetensors` (which holds the encoder tensors itself).
    The config comes with a training checkpoint or run folder (None for a store's encoder)."""
    p = Path(path)
    if p.is_dir():
        enc = p / ENCODER_FILE
        if not enc.is_file():
            raise KVEncoderError(f"{p}: no {ENCODER_FILE} in this folder (give a training run folder, "
                                 f"a store folder, a training checkpoint or an encoder file)")
        final = p / "kb_final.safetensors"
        return enc, _training_config(p, _header(final)[0] if final.is_file() else None)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: K/V encoder weights not found")
    meta, names = _header(p)
    if meta.get("format") == ENCODER_FORMAT:
        return p, _training_config(p.parent) if (p.parent / "kb_final.safetensors").is_file() else None
    trained = _training_config(p.parent, meta)
    if any(part in name for name in names for part in ENCODER_PARTS):
        return p, trained
    if (p.parent / ENCODER_FILE).is_file():
        return p.parent / ENCODER_FILE, trained
    raise KVEncoderError(f"{p}: holds no K/V encoder tensors and no {ENCODER_FILE} lies beside it "
                         f"(a Stage B checkpoint keeps the Stage A encoder: pass the Stage A run folder)")


def _config_from_shapes(found: dict[str, torch.Tensor], seed: int) -> KVEncoderConfig:
    """d_ctx, d_k, d_v, d_tau and hidden from the MLP weight shapes (for files without encoder metadata)."""
    d_k, two_ctx = found["kb_key_mlp.base.weight"].shape
    d_v, value_in = found["kb_value_mlp.base.weight"].shape
    hidden = found["kb_key_mlp.net.0.weight"].shape[0]
    return KVEncoderConfig(two_ctx // 2, d_k, d_v, value_in - two_ctx, hidden, seed)


def load_kv_encoder(path: str | Path, config: KVEncoderConfig | None = None) -> KVEncoder:
    """Load a saved encoder, or the K/V MLPs of a training checkpoint or run folder (see `encoder_source`).

    The config comes from the encoder file's metadata, else `config`, else the tensor shapes.
    Every encoder tensor must be found with the right shape; the error names the first that is not."""
    path, _ = encoder_source(path)
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    found = _strip_to_encoder_names(tensors)
    if meta.get("format") == ENCODER_FORMAT and "config" in meta:
        config = KVEncoderConfig(**json.loads(meta["config"]))
    elif config is None:
        needed = ("kb_key_mlp.base.weight", "kb_value_mlp.base.weight", "kb_key_mlp.net.0.weight")
        missing = [n for n in needed if n not in found]
        if missing:
            raise KVEncoderError(f"{path}: K/V encoder tensor {missing[0]!r} missing")
        config = _config_from_shapes(found, seed=0)
    encoder = KVEncoder(**asdict(config))
    for name, ref in encoder.state_dict().items():
        if name not in found:
            raise KVEncoderError(f"{path}: K/V encoder tensor {name!r} missing")
        if tuple(found[name].shape) != tuple(ref.shape):
            raise KVEncoderError(f"{path}: {name}: shape {tuple(found[name].shape)} != expected {tuple(ref.shape)}")
    encoder.load_state_dict({k: found[k] for k in encoder.state_dict()})
    return encoder.eval()


def adopt_training_settings(cfg, trained: dict | None, source: str | Path, explicit_config: bool):
    """The config to encode with, given the training config that came with the encoder.

    Without an explicit --config the encoder's own settings (embedding model, dims) are used; with one,
    any disagreement is an error, since keys from another embedding model would not match its queries."""
    if not trained:
        return cfg
    import dataclasses

    if not explicit_config:
        return dataclasses.replace(cfg, **{k: trained[k] for k in MODEL_FIELDS if k in trained})
    for key in MODEL_FIELDS:
        want, have = trained.get(key), getattr(cfg, key)
        if want is not None and have is not None and want != have:
            raise KVEncoderError(f"{source}: the encoder was trained with {key}={want!r}, the config says {have!r}")
    return cfg
