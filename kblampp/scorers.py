"""phi (context match) and g_time (time match) of the selector score s = sem + gamma*phi + eta*g_time.

Both are small, learnable and start from sensible priors: phi starts as the cosine of the question
embedding and the fact's evidence-sentence vector. g_time reads the question's typed time constraint
(window `tau` plus its kind, `kblampp.question_time.TIME_KINDS`) and weighs features of each fact with
one learnable weight row per kind:

  window match  overlap, coverage, contains, log gap (the "in 1995" / "between" / "now" cases);
  distances     signed log-years between the fact window's ends and the constraint's ends;
  order         where the fact stands among the candidates sharing its (head, relation):
                started by the constraint's end and the latest started ("before", "just before"),
                still valid at the constraint's start and the earliest ending ("after", "right after"),
                the earliest / latest of its siblings ("first", "last");
  closeness     -log(1 + years between the fact's start and the constraint's start).

Why order features: a window alone cannot say "the latest one before 2011" — every earlier CEO
overlaps (-inf, 2010); the rank among siblings can. At initialisation each kind's row picks its answer
by a margin of about 3 (hand-set below); training refines the rows.

Why closeness: windows inferred from text are often open-ended ("in 1995 he joined X" gives
[1995, +inf)), so every earlier holder overlaps a later question as much as the right one does; the
one that began nearest the question's start is the holder then, and a "from A to B" question usually
names its fact's own tenure. On the TimeQA training pages that rule picks the right sibling more often
than the largest overlap (`lookup` uses it too). Its column is the last, so a checkpoint written before
it loads with a zero weight there and scores exactly as it did (`upgrade_legacy_weight`).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from kblampp.question_time import TIME_KINDS

DAYS_PER_YEAR = 365.25
TIME_CLAMP_DAYS = 1.0e6  # +-2700 years around 1970: open ends (+-inf) become finite but far away
WINDOW_FEATURES = ("overlap", "coverage", "contains", "log_gap_years")
DISTANCE_FEATURES = ("start_minus_start", "start_minus_end", "end_minus_start", "end_minus_end")
ORDER_FEATURES = ("started_by_end", "running_at_start", "latest_started", "earliest_ending_running",
                  "earliest", "latest")
CLOSENESS_FEATURES = ("start_closeness",)
TIME_FEATURES = WINDOW_FEATURES + DISTANCE_FEATURES + ORDER_FEATURES + CLOSENESS_FEATURES
DATELESS_KINDS = ("first", "last")  # active without a window (tau NaN is read as fully open)
ORDER_MARGIN = 6.0  # initial weight of a kind's order feature: rank 0 scores 6, rank 1 scores 3


def kind_index(kind: str) -> int:
    """Index of `kind` in TIME_KINDS, with a clear error for an unknown kind."""
    try:
        return TIME_KINDS.index(kind)
    except ValueError:
        raise ValueError(f"time kind {kind!r} is not one of {', '.join(TIME_KINDS)}") from None


def initial_kind_weights() -> torch.Tensor:
    """(len(TIME_KINDS), len(TIME_FEATURES)) hand-set prior: window kinds use the window match
    (+1 overlap, +1 coverage, +1 contains, -1 log gap), "at" and "between" add +1 start closeness;
    order kinds add their order feature."""
    w = torch.zeros(len(TIME_KINDS), len(TIME_FEATURES))
    col = {name: i for i, name in enumerate(TIME_FEATURES)}
    window = torch.tensor([1.0, 1.0, 1.0, -1.0])
    for kind in TIME_KINDS:
        row = w[kind_index(kind)]
        if kind == "none":
            continue
        if kind in ("before", "just_before"):
            row[col["overlap"]], row[col["log_gap_years"]] = 1.0, -1.0
            row[col["latest_started"]] = ORDER_MARGIN
        elif kind in ("after", "right_after"):
            row[col["overlap"]], row[col["log_gap_years"]] = 1.0, -1.0
            row[col["earliest_ending_running"]] = ORDER_MARGIN
        elif kind == "first":
            row[col["earliest"]] = ORDER_MARGIN
        elif kind == "last":
            row[col["latest"]] = ORDER_MARGIN
        else:  # at, between, current, relative (the anchor fact's window once resolved)
            row[:len(WINDOW_FEATURES)] = window
            if kind in ("at", "between"):
                row[col["start_closeness"]] = 1.0
    return w


def kinds_from_windows(q_tau: torch.Tensor) -> torch.Tensor:
    """(B,) kind ids for callers that pass a bare window: open start = before, open end = after,
    otherwise at; NaN rows = none (the behaviour of a window-only question time)."""
    lo, hi = q_tau[:, 0], q_tau[:, 1]
    kind = torch.full(lo.shape, kind_index("at"), dtype=torch.long, device=q_tau.device)
    kind = torch.where(torch.isinf(lo) & torch.isfinite(hi), kind_index("before"), kind)
    kind = torch.where(torch.isfinite(lo) & torch.isinf(hi), kind_index("after"), kind)
    return torch.where(torch.isnan(q_tau).any(dim=-1), kind_index("none"), kind)


def time_active(q_tau: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
    """(B,) bool: rows whose g_time is not 0 — a kind other than none, with a window or a dateless kind."""
    dateless = torch.zeros_like(kind, dtype=torch.bool)
    for name in DATELESS_KINDS:
        dateless |= kind == kind_index(name)
    has_window = ~torch.isnan(q_tau).any(dim=-1)
    return (kind != kind_index("none")) & (has_window | dateless)


def _signed_log_years(days: torch.Tensor) -> torch.Tensor:
    return torch.sign(days) * torch.log1p(days.abs() / DAYS_PER_YEAR)


def window_features(q_lo: torch.Tensor, q_hi: torch.Tensor, f_lo: torch.Tensor, f_hi: torch.Tensor) -> torch.Tensor:
    """overlap, coverage, contains, log gap (..., 4) of clamped windows (q broadcast against f)."""
    inter = torch.minimum(q_hi, f_hi) - torch.maximum(q_lo, f_lo)  # < 0: gap between windows
    overlap = (inter >= 0).float()
    coverage = (inter.clamp_min(0) / (q_hi - q_lo).clamp_min(1.0)).clamp(0.0, 1.0)
    contains = ((f_lo <= q_lo) & (f_hi >= q_hi)).float()
    log_gap = torch.log1p((-inter).clamp_min(0) / DAYS_PER_YEAR)
    return torch.stack([overlap, coverage, contains, log_gap.expand_as(overlap)], dim=-1)


def order_features(q_lo: torch.Tensor, q_hi: torch.Tensor, f_lo: torch.Tensor, f_hi: torch.Tensor,
                   s_lo: torch.Tensor, s_hi: torch.Tensor, s_mask: torch.Tensor) -> torch.Tensor:
    """The six ORDER_FEATURES (..., 6) of each fact against its siblings.

    q_lo, q_hi broadcast to f_lo (..., M); siblings s_lo, s_hi, s_mask (..., M, L): the windows of the
    facts sharing each fact's (head, relation) (the fact itself may be among them). A rank counts
    siblings strictly ahead, so ties share rank 0; order features are 1 / (1 + rank) where the fact is
    eligible, else 0."""
    started = f_lo <= q_hi  # began by the constraint's end: a "before" candidate
    running = f_hi >= q_lo  # still running at the constraint's start: an "after" candidate
    s_started = s_mask & (s_lo <= q_hi.unsqueeze(-1))
    s_running = s_mask & (s_hi >= q_lo.unsqueeze(-1))
    later = s_lo > f_lo.unsqueeze(-1)  # (..., M, L) sibling began after this fact
    earlier = s_lo < f_lo.unsqueeze(-1)
    rank_before = (s_started & later).sum(-1)  # eligible siblings that began later
    rank_after = (s_running & (s_hi < f_hi.unsqueeze(-1))).sum(-1)  # eligible siblings that end earlier
    rank_first, rank_last = (s_mask & earlier).sum(-1), (s_mask & later).sum(-1)

    def closeness(rank: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
        return eligible.float() / (1.0 + rank.float())

    ones = torch.ones_like(started)
    return torch.stack([started.float(), running.float(), closeness(rank_before, started),
                        closeness(rank_after, running), closeness(rank_first, ones),
                        closeness(rank_last, ones)], dim=-1)


def time_features(q_tau: torch.Tensor, f_min: torch.Tensor, f_max: torch.Tensor,
                  siblings: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Features (B, T, K, len(TIME_FEATURES)) of question windows q_tau (B, 2) against fact windows
    (B, T, K), in days. An open end (+-inf) contains everything on its side.

    `siblings` = (s_min, s_max, s_mask), each (B or 1, T or 1, K, L): the windows of the facts that share
    each fact's (head, relation). None: every fact is its own only sibling (order features then say
    only whether the fact is eligible)."""
    lim = TIME_CLAMP_DAYS
    q_lo = q_tau[:, 0].float().clamp(-lim, lim)[:, None, None]  # (B, 1, 1)
    q_hi = q_tau[:, 1].float().clamp(-lim, lim)[:, None, None]
    f_lo, f_hi = f_min.float().clamp(-lim, lim), f_max.float().clamp(-lim, lim)  # (B, T, K)
    if siblings is None:
        s_lo, s_hi, s_mask = f_lo.unsqueeze(-1), f_hi.unsqueeze(-1), torch.ones_like(f_lo, dtype=torch.bool).unsqueeze(-1)
    else:
        s_lo, s_hi = siblings[0].float().clamp(-lim, lim), siblings[1].float().clamp(-lim, lim)
        s_mask = siblings[2]
    window = window_features(q_lo, q_hi, f_lo, f_hi)  # (B, T, K, 4)
    dist = torch.stack([_signed_log_years(f_lo - q_lo), _signed_log_years(f_lo - q_hi),
                        _signed_log_years(f_hi - q_lo), _signed_log_years(f_hi - q_hi)], dim=-1)
    order = order_features(q_lo.expand_as(f_lo), q_hi.expand_as(f_lo), f_lo, f_hi, s_lo, s_hi, s_mask)
    closeness = -dist[..., :1].abs()  # (B, T, K, 1): -log(1 + |start - start| in years)
    return torch.cat([window, dist, order, closeness], dim=-1)


def candidate_siblings(f_min: torch.Tensor, f_max: torch.Tensor, same_group: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Siblings within the retrieved set: candidates (B, T, K) whose (head, relation) is shared, as
    given by `same_group` (B, T, K, K) bool (False for missing candidates). None passes through."""
    if same_group is None:
        return None
    K = f_min.shape[-1]
    s_min = f_min.unsqueeze(-2).expand(*f_min.shape[:-1], K, K)  # (B, T, K, K): row i lists every j
    s_max = f_max.unsqueeze(-2).expand(*f_max.shape[:-1], K, K)
    return s_min, s_max, same_group


def group_max(g: torch.Tensor, same_group: torch.Tensor | None, sibling_index: torch.Tensor | None) -> torch.Tensor:
    """Max of g (B, T, K) over each fact's group: the candidates marked in same_group (B, T, K, K), or
    the facts listed in sibling_index (K, L) (-1 padded; the K axis is then every fact). A fact with no
    group (a missing candidate) keeps its own g."""
    if same_group is not None:
        masked = g.unsqueeze(-2).expand(*g.shape, g.shape[-1]).masked_fill(~same_group, float("-inf"))
    else:
        masked = g[..., sibling_index.clamp_min(0)].masked_fill(sibling_index < 0, float("-inf"))  # (B, T, K, L)
    best = masked.max(dim=-1).values
    return torch.where(torch.isfinite(best), best, g)


class TimeScorer(nn.Module):
    """g_time = W[kind] . time_features; W (len(TIME_KINDS), len(TIME_FEATURES)) learnable, one row per
    constraint kind (init: `initial_kind_weights`). Exactly 0 for rows without a time constraint.

    Given the groups (facts sharing a (head, relation)), g is shifted by each group's best when that is
    positive: g_i - max(0, max_{j in group(i)} g_j). The time term then ranks facts within a group (the
    best fitting one gets 0, the others less) and lowers groups with no fitting fact, but never lifts
    one group above another: which head and relation the question asks about is sem's and phi's to
    decide (measured: without the shift, a namesake company's CEO valid at the question time
    outscored the asked company's CEO)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(initial_kind_weights())

    def forward(self, q_tau: torch.Tensor | None, f_min: torch.Tensor, f_max: torch.Tensor,
                time_kind: torch.Tensor | None = None, same_group: torch.Tensor | None = None,
                sibling_index: torch.Tensor | None = None) -> torch.Tensor:
        """q_tau (B, 2) days or None (NaN rows = no time); f_min, f_max (B, T, K) -> g (B, T, K).

        time_kind (B,) long index into TIME_KINDS (None: read from the window, `kinds_from_windows`);
        groups: same_group (B, T, K, K) bool over the candidates, or sibling_index (K, L) long when the
        K axis holds every fact of the KB (scores over all facts in training); neither = no groups
        (each fact alone, no centring)."""
        if q_tau is None and time_kind is None:
            return f_min.new_zeros(f_min.shape, dtype=self.weight.dtype)
        B = f_min.shape[0]
        if q_tau is None:
            q_tau = torch.full((B, 2), float("nan"), device=f_min.device)
        q_tau = q_tau.to(f_min.device).float()
        kind = kinds_from_windows(q_tau) if time_kind is None else time_kind.to(device=f_min.device, dtype=torch.long)
        has_window = ~torch.isnan(q_tau).any(dim=-1)  # (B,)
        active = time_active(q_tau, kind)
        open_window = torch.tensor([-float("inf"), float("inf")], device=f_min.device).expand(B, 2)
        q = torch.where(has_window[:, None], q_tau, open_window)  # (B, 2); dateless rows: fully open
        siblings = None
        if same_group is not None:
            siblings = candidate_siblings(f_min, f_max, same_group)
        elif sibling_index is not None:
            idx = sibling_index.to(f_min.device)
            siblings = (f_min[..., idx.clamp_min(0)], f_max[..., idx.clamp_min(0)], (idx >= 0).expand(*f_min.shape, -1))
        feats = time_features(q, f_min, f_max, siblings).to(self.weight.dtype)  # (B, T, K, F)
        w = self.weight[kind.clamp(0, len(TIME_KINDS) - 1)]  # (B, F)
        g = torch.einsum("btkf,bf->btk", feats, w)  # (B, T, K)
        if siblings is not None:
            best = group_max(g, same_group, None if same_group is not None else sibling_index.to(f_min.device))
            g = g - best.clamp_min(0.0)  # (B, T, K): a group's best fitting fact gets 0, nothing gets more
        return torch.where(active[:, None, None], g, torch.zeros_like(g))


def upgrade_legacy_weight(old: torch.Tensor) -> torch.Tensor:
    """A checkpoint's older time-scorer weight -> today's per-kind matrix, scoring as it did.

    A window-only weight (4,): its four trained numbers become the window columns of the window kinds;
    order kinds and the other columns start from the prior. A per-kind matrix without the last columns
    (the closeness one, added later): those columns are zero, so every score is unchanged."""
    n_kinds, n_feats = len(TIME_KINDS), len(TIME_FEATURES)
    if old.dim() == 2 and old.shape[0] == n_kinds and old.shape[1] < n_feats:
        return torch.cat([old, old.new_zeros(n_kinds, n_feats - old.shape[1])], dim=1)
    if tuple(old.shape) != (len(WINDOW_FEATURES),):
        raise ValueError(f"legacy time-scorer weight must have shape ({len(WINDOW_FEATURES)},) or "
                         f"({n_kinds}, <{n_feats}), got {tuple(old.shape)}")
    w = initial_kind_weights().to(old.dtype)
    w[:, TIME_FEATURES.index("start_closeness")] = 0.0  # the window-only scorer had none
    for kind in ("at", "between", "current", "relative"):
        w[kind_index(kind), :len(WINDOW_FEATURES)] = old
    return w


class ContextScorer(nn.Module):
    """phi_ij = normalize(e_q) W normalize(c_i), with W initialised to the identity (= cosine)."""

    def __init__(self, d_ctx: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(d_ctx))

    def forward(self, e_q: torch.Tensor | None, ctx_vec: torch.Tensor) -> torch.Tensor:
        """e_q (B, d_ctx) or None; ctx_vec (B, T, K, d_ctx) -> phi (B, T, K); zero without e_q."""
        if e_q is None:
            return ctx_vec.new_zeros(ctx_vec.shape[:-1])
        u = F.normalize(e_q.to(self.weight.dtype), dim=-1) @ self.weight  # (B, d_ctx)
        c = F.normalize(ctx_vec.to(self.weight.dtype), dim=-1)  # (B, T, K, d_ctx)
        return torch.einsum("bd,btkd->btk", u, c)
