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

    def layer(self, j: int) -> int:
        """Model layer index of MoE position pos + j (j >= 1, wrapping to the next token)."""
        return self.layer_of_pos[(self.pos + j) % self.num_positions]

    def key(self, j: int, expert: int) -> ExpertKey:
        """Key of `expert` at MoE position pos + j (j >= 1)."""
        return (self.layer(j), int(expert))


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
    expected = (probs_absent * absent).sum(axis=1).tolist()  # [H] transfers each layer is expected to need
    h, needs = 1, expected[0] * ratio
    while h < len(expected) and needs < h:  # needs: the link time layers 1..h need, in layers of compute
        needs += expected[h] * ratio
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

    Cost: this runs at every MoE layer of every token, where a numpy call costs a few µs whatever its size
    (128 experts), so the counting is batched: each plan's rankings are kept in a buffer row of the position
    that planned them, `feedback` only queues which ranking an outcome scores, and every FLUSH_EVERY outcomes
    (or before a buffer row still queued is replanned) one vectorized pass updates the counts, the recall and
    the probabilities, which are cached between passes. The calibration lags by at most FLUSH_EVERY outcomes
    (under a token at the real shapes) and converges over thousands. `flush()` applies the queue now.
    """

    FLUSH_EVERY = 32

    def __init__(self):
        self.recall = 0.8  # prior until measured
        self.used = self.seen = None  # float64[H, E] / [H, 1]: rank counts, allocated on the first plan
        self.used_absent = self.seen_absent = None  # the same over experts not resident when ranked
        # the rankings of the last plan made at each MoE position (allocated on the first plan):
        self.ranked = None  # int64[P, H, E] experts best first, per horizon
        self.ranked_absent = None  # bool[P, H, E] whether each was absent from the cache when ranked
        # per target position and horizon, the position whose plan ranked it, awaiting its outcome (or None)
        self.waiting: list[list[int | None]] | None = None
        self.queued: list[tuple[int, int, np.ndarray]] = []  # outcomes: (planning position, horizon j, used)
        self._queued_from: set[int] = set()  # planning positions the queue refers to
        self.use_probability: dict[int, np.ndarray] = {}
        self._probabilities: dict = {}  # (top_k, absent) -> float32[H, E]; ("lists", top_k) -> `_top_rank_lists`

    def _allocate(self, num_positions: int, num_experts: int) -> None:
        self.used, self.seen = np.zeros((MAX_HORIZON, num_experts)), np.zeros((MAX_HORIZON, 1))
        self.used_absent, self.seen_absent = np.zeros_like(self.used), np.zeros_like(self.used)
        self.ranked = np.zeros((num_positions, MAX_HORIZON, num_experts), np.int64)
        self.ranked_absent = np.zeros((num_positions, MAX_HORIZON, num_experts), bool)
        self.waiting = [[None] * MAX_HORIZON for _ in range(num_positions)]
        self.queued, self._queued_from = [], set()
        self._probabilities = {}
        self._rows = np.arange(MAX_HORIZON)[:, None]

    def remember(self, ctx: PlanContext) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Records this plan's full ranking per horizon -> (orders int[H, E] best first,
        `rank_probabilities(top_k)` float32[H, E], absent bool[H, E]: whether each ranked expert is out
        of the cache)."""
        horizon, num_experts = ctx.scores.shape
        if self.waiting is None or len(self.waiting) != ctx.num_positions or self.used.shape[1] != num_experts:
            self._allocate(ctx.num_positions, num_experts)
        self.top_k = ctx.top_k
        pos, num_positions, waiting = ctx.pos, ctx.num_positions, self.waiting
        if pos in self._queued_from:  # the queue still needs this position's last rankings
            self.flush()
        orders = np.argsort(-ctx.scores, axis=1, kind="stable")
        probs = self.rank_probabilities(ctx.top_k, horizon=horizon)
        rows = self._rows[:horizon]
        absent = ~ctx.resident[rows, orders]
        self.ranked[pos, :horizon] = orders
        self.ranked_absent[pos, :horizon] = absent
        by_expert = np.empty_like(probs)
        by_expert[rows, orders] = probs
        use_probability = {}
        for j, target in enumerate(PlanContext.ahead(pos, num_positions, horizon)):
            waiting[target][j] = pos
            if j < num_positions - 1:  # a layer further than one token ahead is not its next occurrence
                use_probability[ctx.layer_of_pos[target]] = by_expert[j]
        self.use_probability = use_probability
        return orders, probs, absent

    def feedback(self, pos: int, experts) -> None:
        """The experts MoE position `pos` really routed to (int[n], distinct): queues the outcome of every
        ranking that targeted it, for the running recall of the horizon-1 top-k and the rank counts."""
        if self.waiting is None:
            return
        waiting = self.waiting[pos]
        for j, source in enumerate(waiting):
            if source is not None:
                self.queued.append((source, j, experts))
                self._queued_from.add(source)
                waiting[j] = None
        if len(self.queued) >= self.FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        """Counts the queued outcomes (a few numpy calls for all of them) and drops the cached probabilities."""
        queued, self.queued = self.queued, []
        self._queued_from = set()
        if not queued:
            return
        sources = np.array([q[0] for q in queued])
        horizons = np.array([q[1] for q in queued])
        orders = self.ranked[sources, horizons]  # [n, E] experts best first
        absent = self.ranked_absent[sources, horizons]  # [n, E] by rank
        counts = np.array([len(q[2]) for q in queued])
        n, num_experts = orders.shape
        offsets = np.arange(0, n * num_experts, num_experts)
        mask = np.zeros(n * num_experts, bool)  # [n * E] by expert: used
        mask[np.concatenate([q[2] for q in queued]) + np.repeat(offsets, counts)] = True
        hit = mask[orders + offsets[:, None]]  # [n, E] by rank: the ranked expert was used
        of_horizon = (self._rows == horizons).astype(np.float64)  # [H, n]: which horizon each outcome scores
        self.used += of_horizon @ hit
        self.seen += of_horizon.sum(axis=1, keepdims=True)  # every rank was seen
        self.used_absent += of_horizon @ (hit & absent)
        self.seen_absent += of_horizon @ absent
        first = np.flatnonzero(horizons == 0)
        if len(first):  # the horizon-1 top-k's share of what was used, as a running mean in order
            recall = self.recall
            for share in (hit[first, : self.top_k].sum(axis=1) / counts[first]).tolist():
                recall = 0.9 * recall + 0.1 * share
            self.recall = recall
        self._probabilities = {}

    def rank_probabilities(self, top_k: int, absent: bool = False, horizon: int = MAX_HORIZON) -> np.ndarray:
        """float32[horizon, E]: calibrated P(used) of the expert at each rank, per horizon 1..horizon
        (absent: of one that is not resident). Read-only: cached until the next `flush`."""
        cached = self._probabilities.get((top_k, absent))
        if cached is None:
            used, seen = (self.used_absent, self.seen_absent) if absent else (self.used, self.seen)
            cached = ((used + self._prior(top_k)) / (seen + 2)).astype(np.float32)
            cached.flags.writeable = False
            self._probabilities[(top_k, absent)] = cached
        return cached[:horizon]

    def _top_rank_lists(self, top_k: int) -> tuple[list, list]:
        """`rank_probabilities` of every and of absent experts over the ranks below 2k, as lists [H][2k]:
        cached with the probabilities (until the next `flush`)."""
        cached = self._probabilities.get(("lists", top_k))
        if cached is None:
            cached = (self.rank_probabilities(top_k)[:, : 2 * top_k].tolist(),
                      self.rank_probabilities(top_k, absent=True)[:, : 2 * top_k].tolist())
            self._probabilities[("lists", top_k)] = cached
        return cached

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
       saving below expected waste) are not fetched. (Replayed in virtual time, a threshold falling to
       0.05 where T_x <= 0.75 T_c scheduled better: 0.743 against 0.685 of stall-free speed at 50% cache,
       T_x = T_c. Live on the 2-core CPU it decoded 8-19% slower relative to on-demand at 25-50% with
       the same hit rates, for a reason not established (host CPU per copy, or live timing the replay
       does not model: prefetches in flight when a miss comes); branch `presched-min-p` holds it for a
       GPU A/B.)
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
        orders, _, absent = self.remember(ctx)
        horizon = len(orders)
        if horizon > 1:
            horizon = link_reach(self.rank_probabilities(k, absent=True, horizon=horizon), absent, ctx.transfer_s,
                                 ctx.layer_compute_s)
        # the top 2k of each horizon as lists: a few dozen entries, cheaper in Python than in numpy calls
        top = orders[:horizon, : 2 * k].tolist()  # [H][2k]
        top_absent = absent[:horizon, : 2 * k].tolist()
        p_used, p_absent = self._top_rank_lists(k)  # [H][2k] each
        protect, candidates = set(), []
        for j in range(horizon):
            layer = ctx.layer(j + 1)
            used_j, absent_j = p_used[j], p_absent[j]
            for r, (expert, out) in enumerate(zip(top[j], top_absent[j])):
                if not out:
                    if used_j[r] >= self.PROTECT_P:
                        protect.add((layer, expert))
                elif absent_j[r] >= self.MIN_P:
                    candidates.append((-absent_j[r], j, r, layer, expert))
        if not candidates:
            return [], protect
        candidates.sort()  # decreasing p, nearer first, then better rank
        capacity = max(0, ctx.num_slots - k - len(protect))
        admitted = fit_to_link([c[1] for c in candidates], horizon, ctx.transfer_s, ctx.layer_compute_s,
                               self.MIN_BENEFIT, capacity)
        accepted = sorted((candidates[a][1], candidates[a][0], candidates[a][4], candidates[a][3]) for a in admitted)
        keys = [(layer, expert) for _, _, expert, layer in accepted]  # earliest deadline first, then likelier
        protect.update(keys)
        return keys, protect


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
        p_absent = self._top_rank_lists(k)[1]
        ratio = max(ctx.transfer_s, 1e-9) / max(ctx.layer_compute_s, 1e-9)
        reach = int(min(len(orders), max(1, math.ceil(k * ratio))))
        if reach > 1:
            reach = min(reach, link_reach(self.rank_probabilities(k, absent=True, horizon=len(orders)), absent,
                                          ctx.transfer_s, ctx.layer_compute_s))
        h = 1
        while h < reach and p_absent[h][0] >= self.LINK_BOUND_MIN_P:
            h += 1
        width = min(2 * k, k + math.ceil(max(0.0, self.TARGET_RECALL - self.recall) * 2 * k))
        self.current_horizon, self.current_width = h, width
        # the top `width` of each horizon as lists: a few dozen entries, cheaper in Python than in numpy calls
        top = orders[:h, :width].tolist()
        top_absent = absent[:h, :width].tolist()
        link_bound = k * ratio >= 1.0  # then only the likely guesses are worth the link time
        protect, rows, chosen = set(), [], []
        for j in range(h):  # nearest layer first, best rank first
            layer = ctx.layer(j + 1)
            for r, (expert, out) in enumerate(zip(top[j], top_absent[j])):
                protect.add((layer, expert))
                if out and (not link_bound or p_absent[j][r] >= self.LINK_BOUND_MIN_P):
                    rows.append(j)
                    chosen.append((layer, expert))
        admitted = fit_to_link(rows, h, ctx.transfer_s, ctx.layer_compute_s, self.MIN_BENEFIT,
                               max(0, ctx.num_slots - k))
        return [chosen[a] for a in admitted], protect


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
