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
                                           "format": "kblampp-kv-encoder"})
    os.replace(tmp, path)
    return weights_hash(encoder)


def _strip_to_encoder_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept a bigger KB checkpoint: keep keys containing kb_key_mlp/kb_value_mlp/kb_time_mlp."""
    out = {}
    for key, value in tensors.items():
        for part in ("kb_key_mlp.", "kb_value_mlp.", "kb_time_mlp."):
            if part in key:
                short = key[key.index(part):]
                if short in out:
                    raise ValueError(f"ambiguous checkpoint: two tensors end with {short!r}")
                out[short] = value
    return out


def load_kv_encoder(path: str | Path, config: KVEncoderConfig | None = None) -> KVEncoder:
    """Load a saved encoder (or the K/V MLPs out of a training checkpoint, given `config`).

    Every encoder tensor must be found with the right shape; the error names the first that is not."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: K/V encoder weights not found")
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    if "config" in meta:
        config = KVEncoderConfig(**json.loads(meta["config"]))
    if config is None:
        raise ValueError(f"{path}: no encoder config in the file's metadata; pass one")
    encoder = KVEncoder(**asdict(config))
    found = _strip_to_encoder_names(tensors)
    for name, ref in encoder.state_dict().items():
        if name not in found:
            raise ValueError(f"{path}: K/V encoder tensor {name!r} missing")
        if tuple(found[name].shape) != tuple(ref.shape):
            raise ValueError(f"{path}: {name}: shape {tuple(found[name].shape)} != expected {tuple(ref.shape)}")
    encoder.load_state_dict({k: found[k] for k in encoder.state_dict()})
    return encoder.eval()

