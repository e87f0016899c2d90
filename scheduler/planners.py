"""Prefetch planners: after each MoE layer is routed, decide which experts to fetch next, in what order.

A planner sees a `PlanContext` (the predictor's scores for the next MoE positions, what is resident,
the measured transfer and compute times) and returns the keys to prefetch, most urgent first, plus the
keys to protect from eviction. Layers are addressed by MoE position p; position p + j wraps to the
next token's MoE layers. Planners never see the model, only keys, scores and times.

- `NoPrefetch`     on-demand and lfu: react to misses only.
- `TopKPrefetch`   prefetch: the predictor's top-k for each of the next `horizon` layers.
- `PreSched`       PreScope's cross-layer plan under a cost model (see its docstring).
- `Adaptive`       ExpertFlow: horizon and width from the measured bandwidth/compute ratio and the
                   predictor's running accuracy.
- `OraclePlanner`  the true future routing (bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from scheduler.slot_table import ExpertKey

MAX_HORIZON = 4


@dataclass
class PlanContext:
    step: int  # index of the ensure() call just made (global over the run)
    pos: int  # MoE position just routed
    num_positions: int  # MoE layers per token
    layer_of_pos: tuple[int, ...]  # model layer index of each MoE position
    top_k: int
    num_slots: int
    scores: np.ndarray | None  # float32[H, E]: predictor scores for positions pos+1 .. pos+H
    resident: set  # keys currently in (or in flight to) the cache
    transfer_s: float  # seconds to move one expert (measured)
    layer_compute_s: float  # seconds of compute per MoE layer (measured)

    def key(self, j: int, expert: int) -> ExpertKey:
        """Key of `expert` at MoE position pos + j (j >= 1)."""
        return (self.layer_of_pos[(self.pos + j) % self.num_positions], int(expert))


class NoPrefetch:
    name = "none"
    horizon = 0

    def plan(self, ctx: PlanContext):
        return [], set()

    def feedback(self, pos: int, experts) -> None:
        pass


class _Feedback:
    """Calibration shared by the predictor-driven planners, learned online from what layers really route to.

    - `recall`: running recall of the horizon-1 top-k.
    - `rank_probabilities()`: P(the expert the predictor ranks `rank` at horizon j is used), float32[H, E],
      from counts over every rank with a prior of 2 pseudo-counts; with `absent=True`, counted only over
      experts that were not resident when ranked — what a prefetch decision needs: hot experts are
      resident, so an absent expert at a given rank is used less often than the average one there
      (about 0.34 against 0.65 at horizon 2, rank 0, on the default model).
    - `use_probability`: after each plan, {layer: float32[E]} — every expert's calibrated probability of
      being used at the next occurrence of each MoE layer inside the horizon (for
      `scheduler.eviction.ExpectedReuse`).
    """

    def __init__(self):
        self.predicted: dict[int, set] = {}
        self.recall = 0.8  # prior until measured
        self.used = self.seen = None  # float64[H, E]: rank counts, allocated on the first plan
        self.used_absent = self.seen_absent = None  # the same over experts not resident when ranked
        self.ranked_at: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}
        self.use_probability: dict[int, np.ndarray] = {}

    def remember(self, ctx: PlanContext) -> tuple[np.ndarray, np.ndarray]:
        """Records this plan's full ranking per horizon -> (orders int[H, E] best first,
        `rank_probabilities(top_k)` float32[H, E])."""
        horizon, num_experts = ctx.scores.shape
        if self.used is None or self.used.shape[1] != num_experts:
            self.used, self.seen = np.zeros((MAX_HORIZON, num_experts)), np.zeros((MAX_HORIZON, num_experts))
            self.used_absent, self.seen_absent = np.zeros_like(self.used), np.zeros_like(self.seen)
        orders = np.argsort(-ctx.scores, axis=1, kind="stable")
        probs = self.rank_probabilities(ctx.top_k)
        use = {}
        for j in range(1, horizon + 1):
            target = (ctx.pos + j) % ctx.num_positions
            layer = ctx.layer_of_pos[target]
            absent = np.array([(layer, e) not in ctx.resident for e in orders[j - 1].tolist()])
            self.ranked_at.setdefault(target, []).append((j, orders[j - 1], absent))
            if j == 1:
                self.predicted[target] = set(orders[0, : ctx.top_k].tolist())
            if j < ctx.num_positions:  # a layer further than one token ahead is not its next occurrence
                p = np.empty(num_experts, np.float32)
                p[orders[j - 1]] = probs[j - 1]
                use[ctx.layer_of_pos[target]] = p
        self.use_probability = use  # replaced whole: the transfer thread reads it without a lock
        return orders, probs

    def feedback(self, pos: int, experts) -> None:
        used = {int(e) for e in experts}
        if pos in self.predicted and used:
            hit = len(self.predicted.pop(pos) & used) / len(used)
            self.recall = 0.9 * self.recall + 0.1 * hit
        if self.used is None:
            return
        entries = self.ranked_at.pop(pos, [])
        if not entries:
            return
        mask = np.zeros(self.used.shape[1], bool)
        mask[list(used)] = True
        rows = np.array([j - 1 for j, _, _ in entries])
        orders = np.stack([order for _, order, _ in entries])  # [n, E]
        absent = np.stack([a for _, _, a in entries])
        hit = mask[orders]
        np.add.at(self.used, rows, hit)
        np.add.at(self.seen, rows, 1)
        np.add.at(self.used_absent, rows, hit & absent)
        np.add.at(self.seen_absent, rows, absent)

    def rank_probabilities(self, top_k: int, absent: bool = False) -> np.ndarray:
        """float32[H, E]: calibrated P(used) of the expert at each rank, per horizon (absent: of one that
        is not resident)."""
        used, seen = (self.used_absent, self.seen_absent) if absent else (self.used, self.seen)
        return ((used + self._prior(top_k)) / (seen + 2)).astype(np.float32)

    def _prior(self, top_k: int) -> np.ndarray:
        """float64[H, E]: the prior P(used) by rank: 0.85 in the top-k, 0.25 up to 2k, top_k/E * 0.25 beyond,
        times 0.9 per horizon step."""
        if getattr(self, "_prior_cache", (None,))[0] != top_k:
            num_experts = self.used.shape[1]
            ranks = np.arange(num_experts)
            prior = np.select([ranks < top_k, ranks < 2 * top_k], [0.85, 0.25], 0.25 * top_k / num_experts)
            self._prior_cache = (top_k, 2 * prior[None, :] * (0.9 ** np.arange(MAX_HORIZON))[:, None])
        return self._prior_cache[1]


class TopKPrefetch(_Feedback):
    """The predictor's top-`width` experts for each of the next `horizon` MoE layers, nearest first."""

    name = "prefetch"

    def __init__(self, horizon: int = 2, width: int | None = None):
        super().__init__()
        self.horizon, self.width = horizon, width

    def plan(self, ctx: PlanContext):
        width = self.width or ctx.top_k
        orders, _ = self.remember(ctx)
        keys = [ctx.key(j, e) for j in range(1, ctx.scores.shape[0] + 1) for e in orders[j - 1, :width].tolist()]
        keys = keys[: ctx.num_slots - ctx.top_k]  # never plan more than the cache can hold beside the running layer
        return keys, set(keys)


class PreSched(_Feedback):
    """PreScope's prefetch-aware cross-layer scheduling (PreSched) under a cost model.

    Inputs per plan: predictor scores S[j, e] for the next H MoE layers; T_x, the measured time to move
    one expert over the link; T_c, the measured compute time of one MoE layer; the resident set.

    1. Probability: a non-resident expert ranked r at horizon j is used with probability p(j, r),
       calibrated online from feedback (how often a non-resident expert at rank r, horizon j was
       actually routed to), with a prior.
    2. Deadline: layer pos + j starts after about D_j = j * T_c seconds.
    3. Benefit: a transfer that completes at time F saves p * min(T_x, max(0, D_j + T_x - F)) seconds of
       expected stall (all of a demand transfer if early, part of it if late, nothing if it would land
       after the demand transfer would have).
    4. Link cost: transfers are serialized on one link and a prefetch in flight delays any demand
       transfer behind it, so a prefetch with probability p saves p * T_x of stall but costs
       (1 - p) * T_x of link time that misses may need. Candidates with p < MIN_P (0.5: expected
       saving below expected waste) are not fetched.
    5. Greedy selection: candidates (j, r < 2k, not resident, p >= MIN_P) in decreasing p; tentatively
       add each to the accepted set, simulate the link serving the accepted set in earliest-deadline
       order, and keep the candidate if every accepted transfer still saves at least MIN_BENEFIT * T_x
       and the number accepted fits the slots not needed by the running layer. Output in
       earliest-deadline order.
    Resident experts predicted with p >= PROTECT_P within the horizon are protected from eviction.
    """

    name = "presched"
    MIN_BENEFIT = 0.1
    MIN_P = 0.5
    PROTECT_P = 0.3

    def __init__(self, horizon: int = MAX_HORIZON):
        super().__init__()
        self.horizon = horizon

    def plan(self, ctx: PlanContext):
        k = ctx.top_k
        orders, probs = self.remember(ctx)
        probs_absent = self.rank_probabilities(k, absent=True)
        t_x, t_c = max(ctx.transfer_s, 1e-9), max(ctx.layer_compute_s, 1e-9)
        candidates, protect = [], set()
        for j in range(1, ctx.scores.shape[0] + 1):
            for r, e in enumerate(orders[j - 1, : 2 * k].tolist()):
                key = ctx.key(j, e)
                if key in ctx.resident:
                    if probs[j - 1, r] >= self.PROTECT_P:
                        protect.add(key)
                    continue
                p = float(probs_absent[j - 1, r])
                if p >= self.MIN_P:
                    candidates.append((p, j, key))
        candidates.sort(key=lambda c: (-c[0], c[1]))
        capacity = max(0, ctx.num_slots - k - len(protect))
        accepted: list[tuple[float, int, ExpertKey]] = []
        for cand in candidates:
            if len(accepted) >= capacity:
                break
            trial = sorted(accepted + [cand], key=lambda c: (c[1], -c[0]))
            finish, ok = 0.0, True
            for p, j, _ in trial:
                finish += t_x
                if min(t_x, j * t_c + t_x - finish) < self.MIN_BENEFIT * t_x:
                    ok = False
                    break
            if ok:
                accepted = trial
        keys = [key for _, _, key in accepted]
        return keys, protect | set(keys)


class Adaptive(_Feedback):
    """ExpertFlow's adaptive horizon: each step, H = clip(ceil(k * T_x / T_c), 1, 4) layers ahead — far
    enough for the link to move a layer's k experts before they are needed. The width follows the
    predictor's measured accuracy: when the link has spare capacity (T_x * k < T_c) the top-k is
    widened up to 2k as the running recall falls below TARGET_RECALL; when the link is the
    bottleneck only predictions whose calibrated hit probability is at least LINK_BOUND_MIN_P are
    fetched (a wrong guess would delay the misses behind it). Capped by what the link can move within
    the horizon (H * T_c / T_x transfers) and by free capacity. Cache-aware: resident predicted
    experts are protected, not re-fetched."""

    name = "adaptive"
    TARGET_RECALL = 0.9
    LINK_BOUND_MIN_P = 0.5

    def __init__(self):
        super().__init__()
        self.horizon = MAX_HORIZON
        self.current_horizon = 1
        self.current_width = 0

    def plan(self, ctx: PlanContext):
        k = ctx.top_k
        orders, _ = self.remember(ctx)
        probs = self.rank_probabilities(k, absent=True)
        ratio = max(ctx.transfer_s, 1e-9) / max(ctx.layer_compute_s, 1e-9)
        h = int(min(ctx.scores.shape[0], max(1, math.ceil(k * ratio))))
        width = min(2 * k, k + math.ceil(max(0.0, self.TARGET_RECALL - self.recall) * 2 * k))
        budget = max(k, int(h / ratio)) if ratio > 0 else h * width
        self.current_horizon, self.current_width = h, width
        link_bound = k * ratio >= 1.0
        keys, protect = [], set()
        for j in range(1, h + 1):
            for r, e in enumerate(orders[j - 1, :width].tolist()):
                key = ctx.key(j, e)
                protect.add(key)
                if key in ctx.resident:
                    continue
                if link_bound and probs[j - 1, r] < self.LINK_BOUND_MIN_P:
                    continue
                keys.append(key)
        keys = keys[: min(budget, max(0, ctx.num_slots - k))]
        return keys, protect


class OraclePlanner:
    """Perfect prefetch: the experts each of the next `horizon` steps will really request."""

    name = "oracle"

    def __init__(self, future: list[set[ExpertKey]], horizon: int = MAX_HORIZON):
        self.future, self.horizon = future, horizon

    def plan(self, ctx: PlanContext):
        keys: list[ExpertKey] = []
        for t in range(ctx.step + 1, min(len(self.future), ctx.step + 1 + self.horizon)):
            keys.extend(sorted(self.future[t]))
        keys = list(dict.fromkeys(keys))[: max(0, ctx.num_slots - ctx.top_k)]
        return keys, set(keys)

    def feedback(self, pos: int, experts) -> None:
        pass
