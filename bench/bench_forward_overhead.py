"""Forward-pass overhead of the KB-patched model versus the plain backbone, same inputs, as a ratio.

Plain and patched runs alternate on one model (unpatch / patch), so both see the same weights, inputs
and machine state. Examples:
    python bench/bench_forward_overhead.py                      # tiny random Llama, N = 10,000
    python bench/bench_forward_overhead.py --backbone embedded:smollm2-135m-instruct --n_facts 10000,100000
    python bench/bench_forward_overhead.py --shape llama1b --device cuda --n_facts 10000,100000,1000000
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from kblampp.config import KBConfig
from kblampp.kb_context import KBContext
from kblampp.model import KBLaMPP
from kblampp.retrieval import IndexedKB, random_tensor_kb

# Random-weight models at real shapes (speed only): hidden, layers, heads, kv heads, intermediate, vocab.
SHAPES = {
    "tiny": (LlamaConfig, 64, 2, 4, 2, 128, 300),
    "smollm2": (LlamaConfig, 576, 30, 9, 3, 1536, 49152),
    "llama1b": (LlamaConfig, 2048, 16, 32, 8, 8192, 128256),
    "qwen3b": (Qwen2Config, 2048, 36, 16, 2, 11008, 151936),
}


def random_backbone(shape: str, dtype: torch.dtype) -> torch.nn.Module:
    cls, hidden, layers, heads, kv, inter, vocab = SHAPES[shape]
    config = cls(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                 intermediate_size=inter, vocab_size=vocab, tie_word_embeddings=False)
    torch.manual_seed(0)
    model_cls = LlamaForCausalLM if cls is LlamaConfig else Qwen2ForCausalLM
    return model_cls(config).to(dtype).eval()


def time_forward(model: KBLaMPP, ctx: KBContext | None, input_ids: torch.Tensor) -> float:
    """Seconds for one forward pass (synchronised on CUDA)."""
    sync = torch.cuda.synchronize if input_ids.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        if ctx is None:
            model(input_ids=input_ids)
        else:
            with model.kb_request(ctx):
                model(input_ids=input_ids)
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=None, help="load a real backbone through kblampp.backbone "
                        "(e.g. embedded:smollm2-135m-instruct); default: a random model of --shape")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="random-weight model shape")
    parser.add_argument("--n_facts", default="10000", help="comma-separated KB sizes, e.g. 10000,100000")
    parser.add_argument("--retrieval", choices=["exact", "faiss"], default="exact",
                        help="exact on-device top-k (TensorKB) or a faiss KnowledgeIndex (IndexedKB)")
    parser.add_argument("--index_method", choices=["flat", "hnsw", "ivfpq"], default="hnsw")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--inject_layers", default=None, help="comma-separated; default: the middle layer")
    parser.add_argument("--k_top", type=int, default=8)
    parser.add_argument("--d_k", type=int, default=384)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    if args.backbone:
        from kblampp.backbone import load_backbone  # another engineer's loader (embedded SmolLM2, hub ids)
        backbone, _ = load_backbone(KBConfig(backbone=args.backbone, device=args.device, dtype=args.dtype))
        label = args.backbone
    else:
        backbone, label = random_backbone(args.shape, dtype).to(args.device), f"random:{args.shape}"
    n_layers = backbone.config.num_hidden_layers
    layers = [int(x) for x in args.inject_layers.split(",")] if args.inject_layers else [n_layers // 2]
    cfg = KBConfig(inject_layers=layers, K_top=args.k_top, d_k=args.d_k, d_v=args.d_k)
    model = KBLaMPP(backbone, cfg, d_ctx=384).to(args.device)
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(10, backbone.config.vocab_size, (args.batch, args.seq), generator=gen).to(args.device)
    e_q = torch.randn(args.batch, 384, generator=gen).to(args.device)
    tau = torch.full((args.batch, 2), 18000.0, device=args.device)

    for n in (int(x) for x in args.n_facts.split(",")):
        kb = random_tensor_kb(n, args.d_k, args.d_k, 384, seed=1, device=args.device)
        source = kb
        if args.retrieval == "faiss":
            from kblampp.knowledge_index import KnowledgeIndex
            source = IndexedKB(KnowledgeIndex.build(kb.K.cpu().numpy(), args.index_method, "ip"), kb)
        ctx = KBContext(source=source, e_q=e_q, tau=tau)
        plain, patched = [], []
        time_forward(model, ctx, input_ids)  # warm-up of both paths
        model.unpatch()
        time_forward(model, None, input_ids)
        for _ in tqdm(range(args.repeats), desc=f"N={n}", leave=False):
            plain.append(time_forward(model, None, input_ids))
            model.patch()
            patched.append(time_forward(model, ctx, input_ids))
            model.unpatch()
        model.patch()
        p, q = statistics.median(plain), statistics.median(patched)
        tokens = args.batch * args.seq
        print(json.dumps({"backbone": label, "device": args.device, "dtype": args.dtype, "n_facts": n,
                          "retrieval": args.retrieval if args.retrieval == "exact" else f"faiss-{args.index_method}",
                          "inject_layers": layers, "k_top": args.k_top, "batch": args.batch, "seq": args.seq,
                          "plain_s": round(p, 4), "patched_s": round(q, 4), "ratio": round(q / p, 3),
                          "plain_tok_s": round(tokens / p, 1), "patched_tok_s": round(tokens / q, 1)}))


if __name__ == "__main__":
    main()
