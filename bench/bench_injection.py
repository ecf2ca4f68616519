"""Injection overhead: tokens/s of the plain backbone vs the KBLaMPP-patched one (SPEC section 9).

Same inputs, interleaved runs (plain, patched, plain, patched, ...), reported as ratios, for stores of
N random facts (synthetic keys are fine for speed), exact top-k (matmul) and faiss HNSW, several K_top
and inject-layer sets. Prefill = one forward over B x T prompt tokens; decode = greedy single-token steps
with the KV cache after an untimed prefill (generate()'s loop), every new token retrieving. Peak memory: the process' max RSS (CPU) or the CUDA peak of
the row. `--profile` splits the knowledge branch of one patched prefill into query / search / fetch /
scoring / selector / fusion; `--train_step B T` times one Stage A end-to-end step (frozen backbone,
CE on the last answer tokens, gradients into the kb_ modules only, AdamW).

HNSW indexes are cached under ~/.cache/kblampp/bench (bench_retrieval.py builds the same ones).

    python bench/bench_injection.py --sizes 10000 100000 1000000 --retrieval exact hnsw
    python bench/bench_injection.py --backbone llama1b-shape --device cuda --dtype bfloat16   # random weights
    python bench/bench_injection.py --backbone tiny-shape --sizes 2000 --repeats 1 --train_step 2 32   # smoke test
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_retrieval import IVFSource, TorchIVF, cached_index, synthetic_keys  # noqa: E402
from kblampp.config import KBConfig  # noqa: E402
from kblampp.kb_context import KBContext  # noqa: E402
from kblampp.model import KBLaMPP  # noqa: E402
from kblampp.retrieval import IndexedKB, TensorKB  # noqa: E402

# Random-weight models at the real sizes (no hub needed): name -> (architecture, config kwargs).
# Llama-3.2-1B-Instruct and Qwen2.5-3B-Instruct as published (hidden, layers, heads, KV heads, MLP, vocab).
SHAPES = {
    "llama1b-shape": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                                    max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
                                    rms_norm_eps=1e-5, rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                                     "original_max_position_embeddings": 8192})),
    "qwen3b-shape": ("qwen2", dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                   num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                                   max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True,
                                   rms_norm_eps=1e-6)),
    "smollm2-shape": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                    max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True)),
    "tiny-shape": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024)),
}
# The plan's inject layers per backbone (configs/backbone_*.yaml, configs/embedded_default.yaml).
PLAN_LAYERS = {"llama1b-shape": "8", "qwen3b-shape": "12,20", "smollm2-shape": "8", "tiny-shape": "1"}


def random_model(name: str, device: str, dtype: torch.dtype, quant4: bool) -> torch.nn.Module:
    """A random-weight model of a real shape; 4-bit NF4 goes through a saved folder and from_pretrained
    with a BitsAndBytesConfig, the path kblampp.backbone.load_backbone takes for hub models."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config
    from transformers import Qwen2ForCausalLM

    arch, kwargs = SHAPES[name]
    cfg_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    torch.manual_seed(0)
    with torch.device(device):  # random init on the device is fast; 4-bit reloads from a saved copy
        model = model_cls(cfg_cls(**kwargs)).to(dtype)
    if not quant4:
        return model.eval()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    with tempfile.TemporaryDirectory(prefix="kblampp_bench_") as tmp:
        model.save_pretrained(tmp)
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quant, dtype=dtype,
                                                     device_map={"": device})
    n4 = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    if n4 == 0:
        raise SystemExit(f"{name}: --quant4 asked, but no Linear4bit module was loaded")
    print(f"  {name}: {n4} Linear4bit (NF4) modules", flush=True)
    return model.eval()


def load_model(name: str, device: str, dtype: torch.dtype, quant4: bool) -> torch.nn.Module:
    """The embedded/hub backbone through kblampp.backbone, or a random model with a real shape."""
    if name in SHAPES:
        return random_model(name, device, dtype, quant4)
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


class TimedSource:
    """Wraps a KB source and adds the wall time of each search / fetch to `timer` (for --profile)."""

    def __init__(self, source: Any, timer: "SpanTimer"):
        self.source, self.timer = source, timer

    @property
    def num_facts(self) -> int:
        return self.source.num_facts

    def search(self, q: torch.Tensor, k: int) -> torch.Tensor:
        with self.timer.span("search"):
            return self.source.search(q, k)

    def fetch(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        with self.timer.span("fetch"):
            return self.source.fetch(ids)


class SpanTimer:
    """Named wall-time spans; module spans via forward pre/post hooks (synchronised on CUDA)."""

    def __init__(self, device: str):
        self.device, self.total = device, {}
        self._start: dict[int, float] = {}

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        sync(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.total[name] = self.total.get(name, 0.0) + time.perf_counter() - t0

    def hook(self, module: torch.nn.Module, name: str) -> list[Any]:
        def pre(mod: torch.nn.Module, _args: Any) -> None:
            sync(self.device)
            self._start[id(mod)] = time.perf_counter()

        def post(mod: torch.nn.Module, _args: Any, _out: Any) -> None:
            sync(self.device)
            self.total[name] = self.total.get(name, 0.0) + time.perf_counter() - self._start.pop(id(mod))

        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def timed(fn: Callable[[], Any], device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def decode_steps(model: torch.nn.Module, input_ids: torch.Tensor, attn: torch.Tensor, steps: int, device: str) -> float:
    """Seconds of `steps` greedy single-token forwards with the KV cache after an (untimed) prefill:
    the loop generate() runs, without its prefill (which the prefill columns already measure)."""
    out = model(input_ids=input_ids, attention_mask=attn, use_cache=True)
    past, nxt, mask = out.past_key_values, out.logits[:, -1:].argmax(-1), attn
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(input_ids=nxt, attention_mask=mask, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    sync(device)
    return time.perf_counter() - t0


def memory_mb(device: str) -> float:
    """CUDA: peak allocated since the last reset; CPU: the process' max RSS so far."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def make_kb(kbm: KBLaMPP, device: str, dtype: torch.dtype) -> KBLaMPP:
    """Move only the kb_ modules (a 4-bit backbone must not be cast)."""
    for mod in kbm.kb_layers.values():
        mod.to(device=device, dtype=dtype)
    return kbm


def profile_prefill(kbm: KBLaMPP, source: Any, e_q: torch.Tensor, tau: torch.Tensor, run: Callable[[], Any],
                    device: str, repeats: int) -> dict[str, float]:
    """Seconds per patched prefill spent in each part of the knowledge branch (summed over inject layers)."""
    timer = SpanTimer(device)
    handles = []
    for kb in kbm.kb_layers.values():
        handles += timer.hook(kb, "branch")
        handles += timer.hook(kb.kb_linear_q, "query")
        handles += timer.hook(kb.kb_query_ctx, "query")
        handles += timer.hook(kb.kb_context_scorer, "phi")
        handles += timer.hook(kb.kb_time_scorer, "g_time")
        handles += timer.hook(kb.kb_selector, "selector")
        handles += timer.hook(kb.kb_fusion, "fusion")
    ctx = KBContext(source=TimedSource(source, timer), e_q=e_q, tau=tau)
    try:
        for _ in range(repeats):
            with kbm.kb_request(ctx), timer.span("prefill"):
                run()
    finally:
        for h in handles:
            h.remove()
    out = {k: v / repeats for k, v in timer.total.items()}
    parts = ("query", "search", "fetch", "phi", "g_time", "selector", "fusion")
    out["other"] = out.get("branch", 0.0) - sum(out.get(p, 0.0) for p in parts)  # sem einsum, casts, masks
    return out


def train_step_time(kbm: KBLaMPP, source: TensorKB, batch: int, seq: int, vocab: int, device: str,
                    repeats: int) -> dict[str, float]:
    """One Stage A end-to-end step: frozen backbone, KB branch with exact retrieval (gold facts forced),
    CE on the last 16 tokens of each row, backward into kb_ parameters only, one AdamW update."""
    from kblampp.kb_params import freeze_non_kb

    freeze_non_kb(kbm)
    params = [p for p in kbm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(10, min(vocab, 30000), (batch, seq), generator=gen).to(device)
    labels = torch.full_like(ids, -100)
    labels[:, -16:] = ids[:, -16:]
    e_q = torch.randn(batch, kbm.d_ctx, generator=gen).to(device)
    forced = torch.randint(0, source.num_facts, (batch, 2), generator=gen).to(device)
    ctx = KBContext(source=source, e_q=e_q, tau=torch.full((batch, 2), float("nan"), device=device),
                    forced_ids=forced)

    def step() -> None:
        with torch.enable_grad(), kbm.kb_request(ctx):
            logits = kbm(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak(device)
    step()  # warm-up (allocates the optimizer state)
    times = [timed(step, device) for _ in range(repeats)]
    for p in kbm.parameters():
        p.requires_grad_(False)
    return {"train_step_s": statistics.median(times), "train_tokens_per_s": batch * seq / statistics.median(times),
            "train_peak_mb": memory_mb(device)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="embedded:smollm2-135m-instruct",
                   help=f"a kblampp backbone spec, or a random real-shape model: {', '.join(SHAPES)}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quant4", action="store_true", help="4-bit NF4 backbone (bitsandbytes)")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--retrieval", nargs="+", default=["exact", "hnsw"], choices=["exact", "hnsw", "ivf"],
                   help="exact = TensorKB matmul on the device; hnsw = faiss on the host; ivf = TorchIVF on the device")
    p.add_argument("--k_top", type=int, nargs="+", default=[8, 16])
    p.add_argument("--layers", nargs="+", default=None,
                   help="inject layer sets, comma-separated (default: the plan's set and the first layer alone)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--gen_tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--d_k", type=int, default=384)
    p.add_argument("--hnsw_m", type=int, default=16)
    p.add_argument("--ef_construction", type=int, default=40)
    p.add_argument("--ef_search", type=int, default=16)
    p.add_argument("--nlist", type=int, default=0, help="ivf lists (0 = 4 sqrt(N))")
    p.add_argument("--nprobe", type=int, default=16, help="ivf lists probed per query")
    p.add_argument("--no_decode", action="store_true", help="prefill only")
    p.add_argument("--profile", action="store_true", help="time the parts of the knowledge branch per row")
    p.add_argument("--train_step", type=int, nargs=2, metavar=("BATCH", "SEQ"), default=None,
                   help="also time one Stage A step at BATCH x SEQ (exact retrieval over the largest N)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = args.device, getattr(torch, args.dtype)
    t0 = time.perf_counter()
    model = load_model(args.backbone, device, dtype, args.quant4)
    load_s = time.perf_counter() - t0
    kdt = dtype  # the kb_ modules run in the compute dtype (also under 4-bit)
    vocab, n_layers = model.config.vocab_size, model.config.num_hidden_layers
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(10, min(vocab, 30000), (args.batch, args.seq), generator=gen).to(device)
    attn = torch.ones_like(input_ids)
    e_q = torch.randn(args.batch, 384, generator=gen).to(device)
    tau = torch.full((args.batch, 2), float("nan"), device=device)
    dev_name = torch.cuda.get_device_name() if device.startswith("cuda") else (platform.processor() or platform.machine())
    print(f"# {args.backbone}{' 4-bit NF4' if args.quant4 else ''} ({args.dtype}) on {device} ({dev_name}, "
          f"{torch.get_num_threads()} threads, load avg {os.getloadavg()[0]:.2f}), loaded in {load_s:.1f} s; "
          f"batch {args.batch} x {args.seq} tokens, decode {args.gen_tokens} tokens; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)

    n_max = max(args.sizes)
    t0 = time.perf_counter()
    keys_np = synthetic_keys(n_max, args.d_k)  # the keys bench_retrieval.py indexes (shared cache)
    keys_all = torch.from_numpy(keys_np)
    values_all = torch.randn(n_max, args.d_k, generator=gen)
    ctx_all = torch.nn.functional.normalize(torch.randn(n_max, 384, generator=gen), dim=-1)
    tmin_all = torch.rand(n_max, generator=gen) * 20000
    tmax_all = tmin_all + torch.rand(n_max, generator=gen) * 3650
    print(f"  random facts: {n_max:,} in {time.perf_counter() - t0:.1f} s", flush=True)

    layer_sets = args.layers or _default_layer_sets(args.backbone, n_layers)
    rows: list[dict] = []
    ivf_cache: dict[int, TorchIVF] = {}
    plain_prefill = lambda: model(input_ids=input_ids, attention_mask=attn)  # noqa: E731
    plain_decode = lambda: decode_steps(model, input_ids, attn, args.gen_tokens, device)  # noqa: E731
    for n, kind, k_top, layer_set in itertools.product(args.sizes, args.retrieval, args.k_top, layer_sets):
        layers = [int(x) for x in layer_set.split(",")]
        if any(not 0 <= x < n_layers for x in layers):
            raise SystemExit(f"--layers: {layer_set} is out of range for {n_layers} layers")
        kb = TensorKB(keys_all[:n].to(device, kdt), values_all[:n].to(device, kdt), ctx_all[:n].to(device, kdt),
                      tmin_all[:n].to(device), tmax_all[:n].to(device))  # days stay float32
        source, build_info = kb, {}
        if kind == "hnsw":
            index, build_info = cached_index(keys_np[:n], "hnsw", "gauss-seed0", hnsw_m=args.hnsw_m,
                                             ef_construction=args.ef_construction, ef_search=args.ef_search)
            source = IndexedKB(index, TensorStore(kb))
        elif kind == "ivf":
            nlist = args.nlist or int(4 * n ** 0.5)
            if n not in ivf_cache:
                t0 = time.perf_counter()
                ivf_cache[n] = TorchIVF(kb.K, nlist=nlist, nprobe=args.nprobe)
                sync(device)
                build_info = {"build_s": round(time.perf_counter() - t0, 2)}
                print(f"  TorchIVF N={n:,} nlist {nlist}: {build_info['build_s']} s, longest list {ivf_cache[n].L}",
                      flush=True)
            source = IVFSource(ivf_cache[n], kb)
        cfg = KBConfig(inject_layers=layers, K_top=k_top, d_k=args.d_k, d_v=args.d_k, d_ctx=384)
        kbm = make_kb(KBLaMPP(model, cfg, d_ctx=384), device, kdt)
        # the branch runs in full (retrieval, scoring, fusion); its term is zero at init, which costs the same
        ctx = KBContext(source=source, e_q=e_q, tau=tau)

        def patched(fn: Callable[[], Any]) -> Callable[[], Any]:
            def run() -> Any:
                with kbm.kb_request(ctx):
                    return fn()
            return run

        reset_peak(device)
        times: dict[str, list[float]] = {"plain_prefill": [], "kb_prefill": [], "plain_decode": [], "kb_decode": []}
        timed(plain_prefill, device)  # warm-up
        timed(patched(plain_prefill), device)
        for _ in range(args.repeats):  # interleaved
            times["plain_prefill"].append(timed(plain_prefill, device))
            times["kb_prefill"].append(timed(patched(plain_prefill), device))
            if not args.no_decode:  # decode_steps times the cached steps only, not their prefill
                with torch.no_grad():
                    times["plain_decode"].append(plain_decode())
                    times["kb_decode"].append(patched(plain_decode)())
        med = {k: statistics.median(v) for k, v in times.items() if v}
        tokens = args.batch * args.seq
        row: dict[str, Any] = {
            "N": n, "retrieval": _retrieval_name(kind, args, n), "K_top": k_top,
            "layers": layers, "plain_prefill_tok_s": tokens / med["plain_prefill"],
            "kb_prefill_tok_s": tokens / med["kb_prefill"], "prefill_ratio": med["plain_prefill"] / med["kb_prefill"],
            "peak_mem_mb": memory_mb(device), "load_avg": os.getloadavg()[0]}
        if build_info:
            row["index_build_s"] = build_info.get("build_s")
        if not args.no_decode:
            gen_tok = args.batch * args.gen_tokens
            row.update(plain_decode_tok_s=gen_tok / med["plain_decode"], kb_decode_tok_s=gen_tok / med["kb_decode"],
                       decode_ratio=med["plain_decode"] / med["kb_decode"])
        if args.profile:
            with torch.no_grad():
                row["profile_s"] = profile_prefill(kbm, source, e_q, tau, plain_prefill, device, args.repeats)
            row["profile_s"]["plain_prefill"] = med["plain_prefill"]
        kbm.unpatch()
        rows.append(row)
        print(json.dumps(_rounded(row)), flush=True)

    extra = {}
    if args.train_step:
        b, t = args.train_step
        cfg = KBConfig(inject_layers=[int(x) for x in layer_sets[0].split(",")], K_top=args.k_top[0], d_k=args.d_k,
                       d_v=args.d_k, d_ctx=384)
        kbm = make_kb(KBLaMPP(model, cfg, d_ctx=384), device, kdt)
        kb = TensorKB(keys_all.to(device, kdt), values_all.to(device, kdt), ctx_all.to(device, kdt),
                      tmin_all.to(device), tmax_all.to(device))
        extra = train_step_time(kbm, kb, b, t, vocab, device, args.repeats)
        extra.update(train_batch=b, train_seq=t, train_N=n_max, train_layers=cfg.inject_layers)
        kbm.unpatch()
        print(json.dumps(_rounded(extra)), flush=True)

    print_tables(rows, extra)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"argv": sys.argv, "device": dev_name, "rows": rows, "train": extra}, indent=1))
        os.replace(tmp, out)
    return 0


def _retrieval_name(kind: str, args: argparse.Namespace, n: int) -> str:
    if kind == "hnsw":
        return f"hnsw M{args.hnsw_m} ef{args.ef_search}"
    if kind == "ivf":
        return f"ivf {args.nlist or int(4 * n ** 0.5)}/{args.nprobe}"
    return "exact"


def _default_layer_sets(backbone: str, n_layers: int) -> list[str]:
    plan = PLAN_LAYERS.get(backbone, "8")
    first = plan.split(",")[0]
    two = plan if "," in plan else f"{first},{min(n_layers - 1, 2 * int(first) + 4)}"
    return [first, two]


def _rounded(obj: Any) -> Any:
    if isinstance(obj, float):
        return round(obj, 4)
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    return obj


def print_tables(rows: list[dict], train: dict) -> None:
    """Markdown tables for docs/BENCHMARKS.md: overhead rows, then the branch profile if measured."""
    print("\n| N | retrieval | K_top | layers | prefill tok/s plain | prefill tok/s KB | ratio | decode tok/s plain "
          "| decode tok/s KB | ratio | peak MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['N']:,} | {r['retrieval']} | {r['K_top']} | {','.join(map(str, r['layers']))} | "
              f"{r['plain_prefill_tok_s']:.0f} | {r['kb_prefill_tok_s']:.0f} | {r['prefill_ratio']:.2f} | "
              f"{r.get('plain_decode_tok_s', float('nan')):.1f} | {r.get('kb_decode_tok_s', float('nan')):.1f} | "
              f"{r.get('decode_ratio', float('nan')):.2f} | {r['peak_mem_mb']:.0f} |")
    prof = [r for r in rows if "profile_s" in r]
    if prof:
        parts = ("query", "search", "fetch", "phi", "g_time", "selector", "fusion", "other")
        print("\n| N | retrieval | K_top | layers | plain prefill ms | branch ms | " + " | ".join(parts) + " |")
        print("|---|---|---|---|---|---|" + "---|" * len(parts))
        for r in prof:
            p = r["profile_s"]
            branch = p.get("branch", 0.0)
            cells = " | ".join(f"{1e3 * p.get(k, 0.0):.1f} ({100 * p.get(k, 0.0) / branch:.0f}%)" if branch else "-"
                              for k in parts)
            print(f"| {r['N']:,} | {r['retrieval']} | {r['K_top']} | {','.join(map(str, r['layers']))} | "
                  f"{1e3 * p['plain_prefill']:.0f} | {1e3 * branch:.1f} | {cells} |")
    if train:
        print(f"\nStage A step, batch {train['train_batch']} x {train['train_seq']}, exact top-{'k'} over "
              f"N={train['train_N']:,}, layers {train['train_layers']}: {train['train_step_s']:.3f} s "
              f"({train['train_tokens_per_s']:.0f} tokens/s), peak {train['train_peak_mb']:.0f} MB")


if __name__ == "__main__":
    from kblampp.cli import run_main
    raise SystemExit(run_main(main))
