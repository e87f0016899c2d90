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
    resident: np.ndarray  # bool[H, E]: at positions pos+1 .. pos+H, in (or in flight to) the cache
    transfer_s: float  # seconds to move one expert (measured)
    layer_compute_s: float  # seconds of compute per MoE layer (measured)

    @staticmethod
    def ahead(pos: int, num_positions: int, horizon: int) -> list[int]:
        """The MoE positions pos + 1 .. pos + horizon (wrapping): the rows of `scores` and `resident`."""
        return [(pos + j) % num_positions for j in range(1, horizon + 1)]

    def key(self, j: int, expert: int) -> ExpertKey:
        """Key of `expert` at MoE position pos + j (j >= 1)."""
        return (self.layer_of_pos[(self.pos + j) % self.num_positions], int(expert))


def fit_to_link(horizons: list[int], num_horizons: int, transfer_s: float, compute_s: float, min_benefit: float,
                limit: int) -> list[int]:
    """Greedy link admission: candidates in priority order, each due at 0-based horizon `horizons[i]` (layer
    pos + 1 + horizons[i] starts at (horizons[i] + 1) * T_c) -> the indices admitted, at most `limit`.

    The link serves admitted transfers in earliest-deadline order, the n-th landing at n * T_x; one due at
    horizon j saves min(T_x, (j + 1) * T_c + T_x - n * T_x) of demand stall, and is worth its link time if that
    is at least `min_benefit` * T_x, i.e. n <= (j + 1) * T_c / T_x + 1 - min_benefit. So a set is feasible iff
    for every horizon J the transfers due by J are at most that bound: a count per deadline, no simulation."""
    t_x, t_c = max(transfer_s, 1e-9), max(compute_s, 1e-9)
    cap = [math.floor((j + 1) * t_c / t_x + 1 - min_benefit) for j in range(num_horizons)]
    due = [0] * num_horizons
    admitted = []
    for i, j in enumerate(horizons):
        if len(admitted) >= limit:
            break
        if all(due[J] < cap[J] for J in range(j, num_horizons)):
            for J in range(j, num_horizons):
                due[J] += 1
            admitted.append(i)
    return admitted


def link_reach(probs_absent: np.ndarray, absent: np.ndarray, transfer_s: float, compute_s: float) -> int:
    """How many layers ahead the link has time for: probs_absent, absent: float32/bool[H, E] by rank ->
    the largest h such that for every j < h the transfers layers 1..j are expected to need (absent experts
    times their calibrated P(used)) take less than those j layers' compute. A prefetch for a farther layer
    would still be in flight when a nearer layer's misses need the link."""
    if len(probs_absent) <= 1:
        return 1
    ratio = max(transfer_s, 1e-9) / max(compute_s, 1e-9)
    needs = np.cumsum((probs_absent * absent).sum(axis=1)) * ratio
    h = 1
    while h < len(needs) and needs[h - 1] < h:
        h += 1
    return h


class NoPrefetch:
    name = "none"
    horizon = 0
    use_probability: dict = {}

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
        self.recall = 0.8  # prior until measured
        self.used = self.seen = None  # float64[H, E] / [H, 1]: rank counts, allocated on the first plan
        self.used_absent = self.seen_absent = None  # the same over experts not resident when ranked
        # the rankings awaiting feedback, by target position and horizon (allocated on the first plan):
        self.ranked = None  # int[P, H, E] experts best first
        self.ranked_absent = None  # bool[P, H, E] whether each was absent from the cache when ranked
        self.pending = None  # bool[P, H] a ranking is waiting for its target to run
        self.use_probability: dict[int, np.ndarray] = {}

    def _allocate(self, num_positions: int, num_experts: int) -> None:
        self.used, self.seen = np.zeros((MAX_HORIZON, num_experts)), np.zeros((MAX_HORIZON, 1))
        self.used_absent, self.seen_absent = np.zeros_like(self.used), np.zeros_like(self.used)
        self.ranked = np.zeros((num_positions, MAX_HORIZON, num_experts), np.int64)
        self.ranked_absent = np.zeros((num_positions, MAX_HORIZON, num_experts), bool)
        self.pending = np.zeros((num_positions, MAX_HORIZON), bool)
        self._rows = np.arange(MAX_HORIZON)[:, None]

    def remember(self, ctx: PlanContext) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Records this plan's full ranking per horizon -> (orders int[H, E] best first,
        `rank_probabilities(top_k)` float32[H, E], absent bool[H, E]: whether each ranked expert is out
        of the cache)."""
        horizon, num_experts = ctx.scores.shape
        if self.ranked is None or self.ranked.shape[0] != ctx.num_positions or self.used.shape[1] != num_experts:
            self._allocate(ctx.num_positions, num_experts)
        self.top_k = ctx.top_k
        orders = np.argsort(-ctx.scores, axis=1, kind="stable")
        probs = self.rank_probabilities(ctx.top_k, horizon=horizon)
        targets = PlanContext.ahead(ctx.pos, ctx.num_positions, horizon)
        absent = ~ctx.resident[self._rows[:horizon], orders]
        by_expert = np.empty_like(probs)
        by_expert[self._rows[:horizon], orders] = probs
        use_probability = {}
        for j, target in enumerate(targets):  # a few horizons: basic indexing, no fancy-index setup
            self.ranked[target, j] = orders[j]
            self.ranked_absent[target, j] = absent[j]
            self.pending[target, j] = True
            if j < ctx.num_positions - 1:  # a layer further than one token ahead is not its next occurrence
                use_probability[ctx.layer_of_pos[target]] = by_expert[j]
        self.use_probability = use_probability
        return orders, probs, absent

    def feedback(self, pos: int, experts) -> None:
        """The experts MoE position `pos` really routed to (int[n], distinct): updates the running recall of
        the horizon-1 top-k and the rank counts of every ranking that targeted it."""
        if self.pending is None:
            return
        pending = self.pending[pos]
        rows = [j for j, waiting in enumerate(pending.tolist()) if waiting]
        if not rows:
            return
        pending[:] = False
        mask = np.zeros(self.used.shape[1], bool)
        mask[experts] = True
        for j in rows:  # a few horizons: basic indexing, in place
            hit = mask[self.ranked[pos, j]]
            if j == 0:  # the horizon-1 top-k's share of what was used
                self.recall = 0.9 * self.recall + 0.1 * int(hit[: self.top_k].sum()) / len(experts)
            absent = self.ranked_absent[pos, j]
            self.used[j] += hit
            self.seen[j] += 1  # every rank was seen
            self.used_absent[j] += hit & absent
            self.seen_absent[j] += absent

    def rank_probabilities(self, top_k: int, absent: bool = False, horizon: int = MAX_HORIZON) -> np.ndarray:
        """float32[horizon, E]: calibrated P(used) of the expert at each rank, per horizon 1..horizon
        (absent: of one that is not resident)."""
        used, seen = (self.used_absent, self.seen_absent) if absent else (self.used, self.seen)
        return ((used[:horizon] + self._prior(top_k)[:horizon]) / (seen[:horizon] + 2)).astype(np.float32)

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
        orders, _, _ = self.remember(ctx)
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
       add each to the accepted set, let the link serve the accepted set in earliest-deadline order,
       and keep the candidate if every accepted transfer still saves at least MIN_BENEFIT * T_x and
       the number accepted fits the slots not needed by the running layer. The n-th transfer in that
       order lands at n * T_x, so the test is a count per deadline: at most j * T_c / T_x + 1 -
       MIN_BENEFIT transfers due by horizon j. Output in earliest-deadline order.
    Resident experts predicted with p >= PROTECT_P within the horizon are protected from eviction.
    Horizon: at most `horizon` layers (default 1), and never beyond `link_reach`, where the nearer layers'
    expected transfers fill the link. The default is measured: replaying the default model
    (`python -m bench replay`, LLaPor or gate-lookahead, 10-50% cache, T_x = 0.25-2 T_c), planning one
    layer ahead beat 2 and 4 layers in every setting (25% cache, T_x = T_c: 0.516 of stall-free speed
    against 0.472 and 0.455): guesses two or more layers ahead are right too rarely to pay for the link
    time and the evictions they cost. `PreSched(horizon=4)` plans across layers under the same model.
    """

    name = "presched"
    MIN_BENEFIT = 0.1
    MIN_P = 0.5
    PROTECT_P = 0.3

    def __init__(self, horizon: int = 1):
        super().__init__()
        self.horizon = horizon

    def plan(self, ctx: PlanContext):
        k = ctx.top_k
        orders, probs, absent = self.remember(ctx)
        p_absent_all = self.rank_probabilities(k, absent=True, horizon=len(orders))
        horizon = link_reach(p_absent_all, absent, ctx.transfer_s, ctx.layer_compute_s)
        # the top 2k of each horizon as lists: a few dozen entries, cheaper in Python than in numpy calls
        top = orders[:horizon, : 2 * k].tolist()  # [H][2k]
        top_absent = absent[:horizon, : 2 * k].tolist()
        p_used = probs[:horizon, : 2 * k].tolist()
        p_absent = p_absent_all[:horizon, : 2 * k].tolist()
        protect, candidates = set(), []
        for j in range(horizon):
            for r, expert in enumerate(top[j]):
                if not top_absent[j][r]:
                    if p_used[j][r] >= self.PROTECT_P:
                        protect.add(ctx.key(j + 1, expert))
                elif p_absent[j][r] >= self.MIN_P:
                    candidates.append((-p_absent[j][r], j, r, expert))
        candidates.sort()  # decreasing p, nearer first, then better rank
        capacity = max(0, ctx.num_slots - k - len(protect))
        admitted = fit_to_link([c[1] for c in candidates], horizon, ctx.transfer_s, ctx.layer_compute_s,
                               self.MIN_BENEFIT, capacity)
        accepted = sorted((candidates[a][1], candidates[a][0], candidates[a][3]) for a in admitted)  # earliest deadline first
        keys = [ctx.key(j + 1, e) for j, _, e in accepted]
        return keys, protect | set(keys)


class Adaptive(_Feedback):
    """ExpertFlow's adaptive horizon and width, chosen each step from measurements.

    - Reach: R = clip(ceil(k * T_x / T_c), 1, 4) layers — how far ahead a layer's k experts must start
      moving to land in time over the measured link.
    - Horizon from accuracy and link feedback: H grows from 1 towards R only while the calibrated
      precision of the next horizon's best guess among absent experts stays at least LINK_BOUND_MIN_P (a
      guess that is wrong more often than right costs the link more than it saves) and the link has time
      left within the first H layers after the transfers they are expected to need (absent experts times
      their calibrated P(used)): a far prefetch in flight delays the nearer layers' misses. Replaying the
      default model (`python -m bench replay`) one layer ahead beat two and four at every link speed
      and cache size tried, so this keeps H at 1 unless the link is idle.
    - Width from the running recall: the top-k widened up to 2k as the recall falls below TARGET_RECALL;
      when the link is the bottleneck (k * T_x >= T_c) only predictions with calibrated probability at
      least LINK_BOUND_MIN_P are fetched.
    - Link admission as in PreSched (`fit_to_link`), nearest layer and best rank first, within the free
      capacity. Cache-aware: resident predicted experts are protected, not re-fetched."""

    name = "adaptive"
    TARGET_RECALL = 0.9
    LINK_BOUND_MIN_P = 0.5
    MIN_BENEFIT = 0.1

    def __init__(self):
        super().__init__()
        self.horizon = MAX_HORIZON
        self.current_horizon = 1
        self.current_width = 0

    def plan(self, ctx: PlanContext):
        k = ctx.top_k
        orders, _, absent = self.remember(ctx)
        probs = self.rank_probabilities(k, absent=True)
        ratio = max(ctx.transfer_s, 1e-9) / max(ctx.layer_compute_s, 1e-9)
        reach = int(min(len(orders), max(1, math.ceil(k * ratio))))
        reach = min(reach, link_reach(probs[: len(orders)], absent, ctx.transfer_s, ctx.layer_compute_s))
        h = 1
        while h < reach and probs[h, 0] >= self.LINK_BOUND_MIN_P:
            h += 1
        width = min(2 * k, k + math.ceil(max(0.0, self.TARGET_RECALL - self.recall) * 2 * k))
        self.current_horizon, self.current_width = h, width
        top = orders[:h, :width]
        fetch = absent[:h, :width].copy()
        if k * ratio >= 1.0:  # link-bound
            fetch &= probs[:h, :width] >= self.LINK_BOUND_MIN_P
        protect = {ctx.key(j + 1, e) for j, row in enumerate(top.tolist()) for e in row}
        rows, ranks = np.nonzero(fetch)  # nearest layer first, best rank first
        admitted = fit_to_link(rows.tolist(), h, ctx.transfer_s, ctx.layer_compute_s, self.MIN_BENEFIT,
                               max(0, ctx.num_slots - k))
        keys = [ctx.key(rows[a] + 1, top[rows[a], ranks[a]]) for a in admitted]
        return keys, protect


class OraclePlanner:
    """Perfect prefetch: the experts each of the next `horizon` steps will really request."""

    name = "oracle"
    use_probability: dict = {}

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
