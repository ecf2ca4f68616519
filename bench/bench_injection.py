"""Injection overhead: tokens/s of the plain backbone vs the KBLaMPP-patched one (SPEC section 9).

Same inputs, interleaved runs (plain, patched, plain, patched, ...), reported as ratios, for stores of
N random facts (synthetic keys are fine for speed), exact top-k (matmul) and faiss HNSW, several K_top
and inject-layer sets. Prefill = one forward over B x T prompt tokens; decode = greedy generate() with
the KV cache, every new token retrieving. Peak memory is the process' max RSS (and CUDA peak on a GPU).

    python bench/bench_injection.py --sizes 10000 100000 1000000 --retrieval exact hnsw
    python bench/bench_injection.py --backbone llama1b-shape --device cuda   # random weights, real shape
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kblampp.config import KBConfig
from kblampp.kb_context import KBContext
from kblampp.model import KBLaMPP
from kblampp.retrieval import IndexedKB, TensorKB

# Random-weight models at the real sizes (no hub needed): name -> (architecture, config kwargs).
SHAPES = {
    "llama1b-shape": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                    max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=True)),
    "qwen3b-shape": ("qwen2", dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                   num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                                   max_position_embeddings=4096, rope_theta=1000000.0, tie_word_embeddings=True)),
}


def load_model(name: str, device: str, dtype: torch.dtype, quant4: bool) -> torch.nn.Module:
    """The embedded/hub backbone through kblampp.backbone, or a random model with a real shape."""
    if name in SHAPES:
        from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

        arch, kwargs = SHAPES[name]
        cfg_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
        torch.manual_seed(0)
        with torch.device(device):
            model = model_cls(cfg_cls(**kwargs)).to(dtype)
        if quant4:
            raise SystemExit("--quant4 works with a saved backbone folder (use bench/gpu_check.sh)")
        return model.eval()
    from kblampp.backbone import load_backbone

    cfg = KBConfig(backbone=name, device=device, dtype=str(dtype).replace("torch.", ""),
                   quantization="4bit" if quant4 else None, inject_layers=[0])
    model, _ = load_backbone(cfg)
    return model.eval()


class TensorStore:
    """A value store over tensors for IndexedKB (`fetch(ids)` like KBValueStore.fetch)."""

    def __init__(self, kb: TensorKB):
        self.kb = kb

    def fetch(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.kb.fetch(ids.to(self.kb.K.device))


def make_source(kind: str, keys: torch.Tensor, kb: TensorKB, hnsw_cache: dict, args: argparse.Namespace):
    if kind == "exact":
        return kb
    from kblampp.knowledge_index import KnowledgeIndex

    n = keys.shape[0]
    if n not in hnsw_cache:
        t0 = time.perf_counter()
        hnsw_cache[n] = KnowledgeIndex.build(keys.float().cpu().numpy(), "hnsw", "ip", hnsw_m=args.hnsw_m,
                                             ef_construction=args.ef_construction, ef_search=args.ef_search)
        print(f"  hnsw build N={n}: {time.perf_counter() - t0:.1f} s", flush=True)
    return IndexedKB(hnsw_cache[n], TensorStore(kb))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def peak_mem_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="embedded:smollm2-135m-instruct",
                   help=f"a kblampp backbone spec, or a random real-shape model: {', '.join(SHAPES)}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quant4", action="store_true", help="4-bit NF4 backbone (bitsandbytes)")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--retrieval", nargs="+", default=["exact", "hnsw"], choices=["exact", "hnsw"])
    p.add_argument("--k_top", type=int, nargs="+", default=[8, 16])
    p.add_argument("--layers", nargs="+", default=["8", "8,20"], help="inject layer sets, comma-separated")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--gen_tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--d_k", type=int, default=384)
    p.add_argument("--hnsw_m", type=int, default=32)
    p.add_argument("--ef_construction", type=int, default=80)
    p.add_argument("--ef_search", type=int, default=64)
    p.add_argument("--no_decode", action="store_true", help="prefill only")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args()

    device, dtype = args.device, getattr(torch, args.dtype)
    model = load_model(args.backbone, device, dtype, args.quant4)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(10, min(vocab, 30000), (args.batch, args.seq), generator=gen).to(device)
    attn = torch.ones_like(input_ids)
    e_q = torch.randn(args.batch, 384, generator=gen).to(device)
    tau = torch.full((args.batch, 2), float("nan"), device=device)
    print(f"# {args.backbone} on {device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), batch {args.batch} x {args.seq} tokens, "
          f"decode {args.gen_tokens} tokens", flush=True)

    n_max = max(args.sizes)
    t0 = time.perf_counter()
    keys_all = torch.randn(n_max, args.d_k, generator=gen) / args.d_k ** 0.5
    values_all = torch.randn(n_max, args.d_k, generator=gen)
    ctx_all = torch.nn.functional.normalize(torch.randn(n_max, 384, generator=gen), dim=-1)
    tmin_all = torch.rand(n_max, generator=gen) * 20000
    tmax_all = tmin_all + torch.rand(n_max, generator=gen) * 3650
    print(f"  random facts: {n_max} in {time.perf_counter() - t0:.1f} s", flush=True)

    rows, hnsw_cache = [], {}
    plain_prefill = lambda: model(input_ids=input_ids, attention_mask=attn)  # noqa: E731
    plain_decode = lambda: model.generate(input_ids=input_ids, attention_mask=attn, do_sample=False,  # noqa: E731
                                          max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens,
                                          pad_token_id=0)
    n_layers = model.config.num_hidden_layers
    for n, kind, k_top, layer_set in itertools.product(args.sizes, args.retrieval, args.k_top, args.layers):
        layers = [int(x) for x in layer_set.split(",") if int(x) < n_layers]
        kb = TensorKB(keys_all[:n].to(device), values_all[:n].to(device), ctx_all[:n].to(device),
                      tmin_all[:n].to(device), tmax_all[:n].to(device))
        source = make_source(kind, keys_all[:n], kb, hnsw_cache, args)
        cfg = KBConfig(inject_layers=layers, K_top=k_top, d_k=args.d_k, d_v=args.d_k, d_ctx=384)
        kbm = KBLaMPP(model, cfg, d_ctx=384).to(device=device, dtype=dtype if not args.quant4 else torch.float32)
        # the branch runs in full (retrieval, scoring, fusion); its term is zero at init, which costs the same
        ctx = KBContext(source=source, e_q=e_q, tau=tau)

        def patched(fn):
            def run():
                with kbm.kb_request(ctx):
                    fn()
            return run

        times = {"plain_prefill": [], "kb_prefill": [], "plain_decode": [], "kb_decode": []}
        timed(plain_prefill, device)  # warm-up
        timed(patched(plain_prefill), device)
        for _ in range(args.repeats):  # interleaved
            times["plain_prefill"].append(timed(plain_prefill, device))
            times["kb_prefill"].append(timed(patched(plain_prefill), device))
            if not args.no_decode:
                times["plain_decode"].append(timed(plain_decode, device))
                times["kb_decode"].append(timed(patched(plain_decode), device))
        kbm.unpatch()
        med = {k: statistics.median(v) for k, v in times.items() if v}
        tokens = args.batch * args.seq
        row = {"N": n, "retrieval": kind, "K_top": k_top, "layers": layers,
               "plain_prefill_tok_s": tokens / med["plain_prefill"], "kb_prefill_tok_s": tokens / med["kb_prefill"],
               "prefill_ratio": med["plain_prefill"] / med["kb_prefill"], "peak_mem_mb": peak_mem_mb(device)}
        if not args.no_decode:
            gen_tok = args.batch * args.gen_tokens
            row.update(plain_decode_tok_s=gen_tok / med["plain_decode"], kb_decode_tok_s=gen_tok / med["kb_decode"],
                       decode_ratio=med["plain_decode"] / med["kb_decode"])
        rows.append(row)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    print("\n| N | retrieval | K_top | layers | prefill tok/s plain | prefill tok/s KB | ratio | decode tok/s plain "
          "| decode tok/s KB | ratio | peak MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['N']:,} | {r['retrieval']} | {r['K_top']} | {','.join(map(str, r['layers']))} | "
              f"{r['plain_prefill_tok_s']:.0f} | {r['kb_prefill_tok_s']:.0f} | {r['prefill_ratio']:.2f} | "
              f"{r.get('plain_decode_tok_s', float('nan')):.1f} | {r.get('kb_decode_tok_s', float('nan')):.1f} | "
              f"{r.get('decode_ratio', float('nan')):.2f} | {r['peak_mem_mb']:.0f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"argv": sys.argv, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
