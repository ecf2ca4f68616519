"""Stage A, the hop phase (issue 11): retrieval per hop on cached last-token states.

For inject layers l_1 < l_2 < ... (consecutive), the phase steps each training question's last-token
residual stream from one inject layer to the next (`kblampp.hops.next_inject_input`): the layer's own
retrieval (top-K_top by sem, alpha = softmax(s / T), V~), its fused value beta * kb_linear_v(V~) added
to the cached attention output, then the frozen MLP. At the first inject layer this is exactly what
the model computes; at later ones the cached attention output is the plain backbone's (the other
prompt positions' injections are left out), which evaluation then measures for real.

Losses: hop j's query must find the chain's j-th fact (hop 1 at the first layer, hop 2 at the next;
a chain shorter than the layers repeats its last fact, so a single-hop question keeps its answer at
every layer); the hop choice (cross-entropy) learns which layer holds the answering fact. Trained:
later layers' query side, every earlier layer's fusion (kb_linear_v, kb_gate: the value that must carry
the bridge entity), and `kb_hop_choice`. Keys and values stay fixed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from kblampp import hf_arch
from kblampp.config import KBConfig
from kblampp.data import answer_fact_of, batch_schedule
from kblampp.hops import is_entity_chain, next_inject_input
from kblampp.kv_encoder import _semi_orthogonal
from kblampp.training.losses import info_nce, positive_mask
from kblampp.training.loop import Phase
from kblampp.training.retrieval_phase import QUERY_PARTS, RetrievalData, full_scores, train_dev_eval

def chain_targets(supporting: Sequence[Sequence[int]], answers: Sequence[int], chains: Sequence[bool],
                  n_hops: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets (n, H) fact per hop layer, hop label (n,) index of the answering layer).

    A chain question's supporting facts (`kblampp.hops.is_entity_chain`) are its hops in order; any
    other question answers from its first hop (its answer fact at every layer). Chains longer than the
    layers keep their first H facts with the answer at the last layer."""
    targets, labels = [], []
    for sup, ans, chain_q in zip(supporting, answers, chains):
        chain = [int(f) for f in sup if int(f) >= 0] if chain_q else []
        if not chain or chain[-1] != int(ans):
            chain = [int(ans)] if not chain else chain[:-1] + [int(ans)]
        if len(chain) > n_hops:
            chain = chain[:n_hops - 1] + [chain[-1]]
        labels.append(len(chain) - 1)
        targets.append(chain + [chain[-1]] * (n_hops - len(chain)))
    return torch.tensor(targets, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


@dataclass
class HopData:
    """Cached per question: residual[l] / attn[l] (n, d_model) at the last prompt token for every inject
    layer, the retrieval inputs (e_q, tau, kinds), chain targets (n, H) and the answering hop (n,)."""

    residual: dict[int, torch.Tensor]
    attn: dict[int, torch.Tensor]
    base: RetrievalData
    targets: torch.Tensor
    hop_label: torch.Tensor

    def __len__(self) -> int:
        return len(self.base)


def hop_data(cached: dict[str, torch.Tensor], base: RetrievalData, records: Sequence[Any], layers: Sequence[int],
             facts: Sequence[Any]) -> HopData:
    """HopData from `cached_question_states(..., hop_layers=layers)` tensors, the QA records and facts."""
    head_of, tail_of = (lambda i: facts[i].head_name), (lambda i: facts[i].tail_name)
    chains = [is_entity_chain(r.supporting_facts, r.type, head_of, tail_of) for r in records]
    targets, labels = chain_targets([r.supporting_facts for r in records], [answer_fact_of(r) for r in records],
                                    chains, len(layers))
    dev = base.e_q.device
    return HopData({l: cached[f"residual_{l}"].to(dev) for l in layers}, {l: cached[f"attn_{l}"].to(dev) for l in layers},
                   base, targets.to(dev), labels.to(dev))


class HopTrainer:
    """`step(micro)` is the Phase step; `evaluate` gives per-hop recall and the hop choice's accuracy."""

    def __init__(self, cfg: KBConfig, model: Any, table: Any, keys: torch.Tensor, values: torch.Tensor,
                 train: HopData, dev: HopData | None = None, columns: torch.Tensor | None = None,
                 rank: int = 0, world: int = 1):
        self.cfg, self.sa, self.model, self.table = cfg, cfg.stage_a, model, table
        self.layers = [int(x) for x in model.inject_layers]
        if any(b != a + 1 for a, b in zip(self.layers, self.layers[1:])):
            raise ValueError(f"hop phase: inject_layers {self.layers} must be consecutive (the cached last-token "
                             "state is stepped one decoder layer at a time)")
        self.keys, self.values = keys.detach(), values.detach()
        self.train, self.dev, self.columns, self.rank, self.world = train, dev, columns, rank, world
        self.siblings = table.sibling_index().to(keys.device)

    def hops(self, data: HopData, rows: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Per inject layer: sem, s (B, N) over all facts, cand (B, K), alpha (B, K) and its input h (B, d)."""
        backbone, t, base = self.model.backbone, self.table, data.base
        kind = None if base.time_kind is None else base.time_kind[rows]
        k = min(self.cfg.K_top, t.num_facts)
        x = data.residual[self.layers[0]][rows]
        out: list[dict[str, torch.Tensor]] = []
        for j, layer in enumerate(self.layers):
            kb = self.model.kb_layers[str(layer)]
            h = hf_arch.input_norm(backbone, layer)(x)  # (B, d_model) what this layer's attention and KB branch read
            sem, s = full_scores(kb, h, base.e_q[rows], base.tau[rows], self.keys, t.ctx_vec, t.tau_min, t.tau_max,
                                 kind, self.siblings)  # (B, N)
            cand = sem.detach().topk(k, dim=1).indices  # (B, K) what the search returns
            alpha = torch.softmax(s.gather(1, cand) / self.cfg.temperature, dim=1)  # (B, K)
            v_tilde = torch.einsum("bk,bkd->bd", alpha, self.values[cand])  # (B, d_v)
            delta, _ = kb.kb_fusion(h, v_tilde)  # (B, d_model) beta * kb_linear_v(V~)
            out.append({"sem": sem, "s": s, "cand": cand, "alpha": alpha, "h": h})
            if j + 1 < len(self.layers):
                x = next_inject_input(backbone, layer, x, data.attn[layer][rows], delta)
        return out

    def hop_logits(self, hops: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        max_alpha = torch.stack([h["alpha"].max(-1).values for h in hops], dim=1)  # (B, H)
        return self.model.kb_hop_choice(hops[-1]["h"], max_alpha)  # (B, H)

    def step(self, micro: int) -> tuple[torch.Tensor, dict[str, float], int]:
        d = self.train
        rows = torch.tensor(batch_schedule(len(d), self.sa.hop_batch, micro, self.cfg.seed + 17, self.rank,
                                           self.world), dtype=torch.long, device=d.targets.device)
        hops = self.hops(d, rows)
        n = self.table.num_facts
        total: torch.Tensor = torch.zeros((), device=rows.device)
        hits = 0.0
        for j in range(1, len(hops)):
            target = d.targets[rows, j]
            pos = positive_mask(n, target.unsqueeze(1))
            logits, sem_logits = hops[j]["s"] / self.cfg.temperature, hops[j]["sem"] / self.cfg.temperature
            if self.columns is not None:
                logits = logits.masked_fill(~self.columns, float("-inf"))
                sem_logits = sem_logits.masked_fill(~self.columns, float("-inf"))
            same_hr = self.table.same_head_relation(target)  # (B, N)
            total = total + info_nce(logits, pos) + self.sa.sem_weight * info_nce(sem_logits, same_hr | pos)
            hits += float((hops[j]["cand"] == target.unsqueeze(1)).any(1).float().mean())
        choice = F.cross_entropy(self.hop_logits(hops), d.hop_label[rows])
        total = total + self.sa.hop_choice_weight * choice
        return total, {"hop_recall": hits / max(len(hops) - 1, 1), "hop_choice_loss": float(choice.detach())}, len(rows)

    @torch.no_grad()
    def evaluate(self, data: HopData, max_rows: int = 0, chunk: int = 256) -> dict[str, float]:
        """recall@K_top of each hop's target at its layer (over questions whose chain reaches that hop,
        and over 2-hop / 3-hop questions), hop-choice accuracy, and answer@1 of the chosen hop."""
        n = len(data) if max_rows <= 0 else min(max_rows, len(data))
        cols: list[torch.Tensor] = []
        for start in range(0, n, chunk):
            rows = torch.arange(start, min(n, start + chunk), device=data.targets.device)
            hops = self.hops(data, rows)
            hit = torch.stack([(h["cand"] == data.targets[rows, j].unsqueeze(1)).any(1)
                               for j, h in enumerate(hops)], dim=1)  # (B, H)
            chosen = self.hop_logits(hops).argmax(-1)  # (B,)
            top = torch.stack([h["cand"].gather(1, h["alpha"].argmax(1, keepdim=True)).squeeze(1) for h in hops], 1)
            answer = data.targets[rows, -1]
            cols.append(torch.cat([hit.float(), (chosen == data.hop_label[rows]).float().unsqueeze(1),
                                   (top.gather(1, chosen.unsqueeze(1)).squeeze(1) == answer).float().unsqueeze(1)], 1))
        table = torch.cat(cols).cpu()
        label = data.hop_label[:n].cpu()
        out: dict[str, float] = {"n": float(n), "hop_choice_acc": float(table[:, -2].mean()),
                                 "answer_top1_chosen": float(table[:, -1].mean())}
        for j, layer in enumerate(self.layers):
            reach = label >= j
            if j and bool(reach.any()):
                out[f"hop{j + 1}_recall@{self.cfg.K_top}"] = float(table[reach, j].mean())
        for hops_n in range(2, len(self.layers) + 1):
            sel = label == hops_n - 1
            if bool(sel.any()):
                out[f"{hops_n}hop/n"] = float(sel.sum())
                out[f"{hops_n}hop/final_recall@{self.cfg.K_top}"] = float(table[sel, hops_n - 1].mean())
                out[f"{hops_n}hop/answer_top1_chosen"] = float(table[sel, -1].mean())
        single = label == 0
        if bool(single.any()):
            out["1hop/hop_choice_acc"] = float(table[single, -2].mean())
        return out

    def eval_fn(self, step: int) -> dict[str, Any]:
        return train_dev_eval(self.evaluate, self.train, self.dev, self.sa.dev_max_questions)

    def phase(self, layer_names: dict[int, str]) -> Phase:
        """Later layers' query side, earlier layers' fusion, the hop choice."""
        params: dict[str, torch.nn.Parameter] = {}
        for j, layer in enumerate(self.layers):
            kb = self.model.kb_layers[str(layer)]
            for name, p in kb.named_parameters():
                part = name.split(".")[0]
                if (j > 0 and part in QUERY_PARTS) or (j + 1 < len(self.layers) and part == "kb_fusion"):
                    params[f"{layer_names[layer]}.{name}"] = p
        params.update({f"model.kb_hop_choice.{n}": p for n, p in self.model.kb_hop_choice.named_parameters()})
        return Phase(name="hops", params=params, step_fn=self.step, steps=self.sa.hop_steps, lr=self.sa.hop_lr,
                     grad_accum=1, eval_fn=self.eval_fn, eval_interval=self.sa.hop_eval_interval, unit="q")


@torch.no_grad()
def init_bridge(model: Any, kv: Any, residual: dict[int, torch.Tensor], cfg: KBConfig) -> dict[str, float]:
    """Start the hop path where a bridge can travel (measured: from the trained one-layer values and
    a copied query, held-out hop-2 recall@8 is 0.02 and a least-squares read-out does not generalise).

    - Values carry the tail's own embedding: the value MLP is reset to V = P e_t (a semi-orthogonal
      tail block, the identity when d_v = d_ctx; the evidence / time blocks and the GELU branch zeroed). The one-layer
      phases had trained it for the LM path, where it changed no answer (pure injection 0 EM), and
      its trained values no longer point at the tail (cosine 0.42 with e_t).
    - Each non-last inject layer writes V~ into the directions where the plain last-token residual
      entering the next layer varies least (eigenvectors of its covariance over the training
      questions): kb_linear_v = c * U, beta = 0.5, so the bridge is not drowned by the residual.
    - The next layer's query reads it back: kb_linear_q = s * B_h C_t^+ U^T diag(rms / g) / (c beta)
      (g its input norm's weight, rms the mean residual RMS) with the bias removing the mean residual,
      and kb_query_ctx = `hop_query_ctx_share` of the first layer's, so Q ~ s (B_h e_t(bridge) + a
      share of the question): the key of (bridge, next relation)."""
    layers = [int(x) for x in model.inject_layers]
    sa = cfg.stage_a
    d_ctx = kv.config.d_ctx
    net_out = kv.kb_value_mlp.net[-1]
    net_out.weight.zero_()
    net_out.bias.zero_()
    base = kv.kb_value_mlp.base.weight
    tail = _semi_orthogonal(base.shape[0], d_ctx, torch.Generator().manual_seed(kv.config.seed))
    base.zero_()
    base[:, :d_ctx] = tail.to(base.dtype)
    key_head = kv.kb_key_mlp.base.weight[:, :d_ctx]  # (d_k, d_ctx) B_h
    tail_pinv = tail.T.to(base.dtype)  # (d_ctx, d_v) C_t^+ of a semi-orthogonal block
    c, s = sa.hop_value_scale, sa.query_init_scale
    first_ctx = model.kb_layers[str(layers[0])].kb_query_ctx.weight.clone()
    report: dict[str, float] = {}
    for prev, layer in zip(layers, layers[1:]):
        x = residual[layer].float()  # (n, d_model) plain residual entering `layer`
        mean = x.mean(0)
        evals, evecs = torch.linalg.eigh(torch.cov(x.T))  # ascending variance
        d_v = model.kb_layers[str(prev)].kb_fusion.kb_linear_v.weight.shape[1]
        U = evecs[:, :d_v].to(first_ctx.dtype)  # (d_model, d_v)
        fusion = model.kb_layers[str(prev)].kb_fusion
        fusion.kb_linear_v.weight.copy_(c * U)
        fusion.kb_linear_v.bias.zero_()
        fusion.kb_gate.weight.zero_()
        fusion.kb_gate.bias.zero_()  # beta = 0.5
        beta = 0.5
        g = hf_arch.input_norm(model.backbone, layer).weight.float()
        rms = x.pow(2).mean(1).sqrt().mean()
        read = U.T * (rms / g).unsqueeze(0) / (c * beta)  # (d_v, d_model): h -> V~ estimate
        kb = model.kb_layers[str(layer)]
        kb.kb_linear_q.weight.copy_(s * key_head @ tail_pinv @ read)
        kb.kb_linear_q.bias.copy_(-s * key_head @ tail_pinv @ (U.T @ mean) / (c * beta))
        kb.kb_query_ctx.weight.copy_(sa.hop_query_ctx_share * first_ctx)
        report[f"layer{layer}_bridge_variance_share"] = float(evals[:d_v].sum() / evals.sum())
    return report


def copy_query_side(model: Any) -> None:
    """Start every later inject layer's query side as the first layer's (trained) one: before the hop
    phase a later layer then retrieves what the first does (a single-hop answer stays where it was)."""
    layers = [int(x) for x in model.inject_layers]
    first = model.kb_layers[str(layers[0])]
    for layer in layers[1:]:
        kb = model.kb_layers[str(layer)]
        for part in QUERY_PARTS:
            getattr(kb, part).load_state_dict(getattr(first, part).state_dict())
