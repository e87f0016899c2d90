"""Eviction policies: which of the candidate slots (unpinned, not in flight, not protected by the
current prefetch plan) to reuse. Each policy sees every access (`touch`); the runtime also tells it
where the run is (`at_step`, before each layer's experts are requested), what each layer routed to
(`observe`) and the planner's calibrated probabilities (`set_predictions`); policies that do not need
these ignore them.

- `LRU` — least recently used: the mixtral-offloading baseline ("on-demand"), and the tie-breaker of
  the prefetching policies, whose plan protects the experts predicted within the horizon, so what
  they evict is what is least likely to be needed soon.
- `LFU` — least frequently used over the run, ties by LRU.
- `ExpectedReuse` — the prefetching policies: evicts the expert whose expected next use lies farthest
  ahead, estimated from decayed usage frequency and the predictor's calibrated probabilities within
  the horizon (a realizable approximation of Belady).
- `Belady` — evicts the expert whose next use lies farthest in the future, given the true future
  routing (the `oracle` policy's bound).
"""

from __future__ import annotations

import numpy as np

from scheduler.slot_table import ExpertKey, SlotTable, grown_to, lookup_or, shape_for


class LRU:
    """Least recently used. Each key's last use is kept in an array by (layer, expert), so victims among
    hundreds of slots are chosen in a few numpy ops."""

    def __init__(self):
        self._clock = 0  # uses so far
        self._stamp = np.full((0, 0), -1, np.int64)

    def touch(self, key: ExpertKey) -> None:
        self.touch_many(key[0], np.array([key[1]]))

    def touch_many(self, layers, experts: np.ndarray) -> None:
        """Uses of distinct keys, in this order: layers one layer (int) or int[n]; experts int[n]."""
        stamps = np.arange(self._clock, self._clock + len(experts))
        try:
            self._stamp[layers, experts] = stamps
        except IndexError:  # a key beyond every key seen so far
            self._stamp = grown_to(self._stamp, shape_for(layers, experts), -1)
            self._stamp[layers, experts] = stamps
        self._clock += len(experts)

    def last_use(self, key: ExpertKey) -> int:
        """When `key` was last used (a clock tick; -1: never)."""
        inside = key[0] < self._stamp.shape[0] and key[1] < self._stamp.shape[1]
        return int(self._stamp[key]) if inside else -1

    def stamps(self, table: SlotTable, candidates: np.ndarray) -> np.ndarray:
        """int64[C]: the last use of the key in each candidate slot (-1: never used)."""
        layers, experts = table.slot_layer[candidates], table.slot_expert[candidates]
        try:
            return self._stamp[layers, experts]
        except IndexError:  # a key never touched and beyond every key touched so far
            return lookup_or(self._stamp, layers, experts, -1)

    def at_step(self, pos: int, step: int) -> None:
        """The `step`-th expert request of the run (0-based, over the whole run), for MoE position `pos`,
        comes next; victims chosen from now on serve it and what follows."""

    def observe(self, pos: int, usage: np.ndarray, tokens: int = 1) -> None:
        """usage: float[E] — the fraction of `tokens` tokens that chose each expert at MoE position `pos`."""

    def observe_rows(self, usage: np.ndarray) -> None:
        """usage: float[m, E] — one token's choices at MoE positions 0..m-1: `observe` for each."""
        for pos, row in enumerate(usage):
            self.observe(pos, row)

    def set_predictions(self, probabilities: dict[int, np.ndarray]) -> None:
        """{layer: float32[E]}: calibrated P(used) at the next occurrence of each layer within the horizon."""

    def victim(self, table: SlotTable, candidates=None) -> int:
        """candidates: slot indices (int array or list; default every evictable slot) -> the slot to reuse:
        `ranked(...)[0]` (ties go to the first candidate)."""
        return int(self.ranked(table, _candidates(table, candidates))[0])

    def ranked(self, table: SlotTable, candidates: np.ndarray) -> np.ndarray:
        """candidates int[C] -> the same slots, the one to reuse first first (ties: candidate order). Taking
        the first n equals n successive `victim` calls that each take the chosen slot out: a layer's
        misses get their slots from one ranking."""
        return candidates[np.argsort(self.stamps(table, candidates), kind="stable")]


def _candidates(table: SlotTable, candidates) -> np.ndarray:
    candidates = table.candidates() if candidates is None else np.asarray(candidates, np.int64)
    if not len(candidates):
        raise RuntimeError("no evictable slot: every slot is pinned")
    return candidates


class LFU(LRU):
    def __init__(self):
        super().__init__()
        self._count = np.zeros((0, 0), np.int64)

    def touch_many(self, layers, experts: np.ndarray) -> None:
        super().touch_many(layers, experts)
        if self._count.shape != self._stamp.shape:
            self._count = grown_to(self._count, self._stamp.shape, 0)
        self._count[layers, experts] += 1  # distinct keys: no repeated index

    def ranked(self, table: SlotTable, candidates: np.ndarray) -> np.ndarray:
        uses = lookup_or(self._count, table.slot_layer[candidates], table.slot_expert[candidates], 0)
        return candidates[np.lexsort((self.stamps(table, candidates), uses))]  # fewest uses, then oldest


class ExpectedReuse(LRU):
    """Evicts the candidate whose expected next use is farthest ahead, in MoE positions (Belady's rule
    with expectations in place of the unknown future).

    With P MoE positions per token, the running layer at position c (`at_step`) and a key at position q:
      d = (q - c) mod P (P when q == c): positions until its layer runs next;
      f = how often the expert is chosen per token at its layer, an average decaying by FREQ_DECAY per
          token (`observe`), starting at top_k / E; gap = P / f is then the expected distance between uses;
      p = the predictor's calibrated probability that the next occurrence uses it, when its layer is
          inside the prediction horizon (`set_predictions`), else f;
      expected next use = d + (1 - p) * gap.
    Ties by least recent use. The scores of every key are one float[P, E] array, recomputed only when
    an input changes, so a victim costs a gather over the candidates. On the default model's validation
    trace at 64 of 256 slots this misses 14.7 experts per token where LRU misses 17.9 and Belady 9.3
    (frequency carries nearly all of it).

    Measured limits (replay, LLaPor, 25% cache, T_x = T_c): the decay rate (0.8-0.995), the weight of d,
    dropping d or the predictions, predictions for 4 layers instead of 1 all land within +-0.01 of this
    (or below); history features (recency, windowed counts, prefill, other prompts) do not predict the
    next tokens' routing better than this decayed frequency (AUC 0.78). Even the exact future routing
    of the next 4 MoE positions adds 0.007; what Belady knows and this cannot is which experts the next
    1-8 tokens use.
    """

    FREQ_DECAY = 0.95
    MIN_FREQ = 1e-3

    def __init__(self, layer_positions: dict[int, int], num_experts: int, top_k: int):
        super().__init__()
        self.position = layer_positions  # layer -> MoE position
        self.num_positions = len(layer_positions)
        self.freq = np.full((self.num_positions, num_experts), top_k / num_experts)
        self.current = 0  # MoE position of the running layer
        self.predicted: dict[int, np.ndarray] = {}  # MoE position -> float32[E], replaced whole
        self._score: np.ndarray | None = None  # float[P, E] expected next use; None: stale
        self._pos_of_layer = np.full(max(layer_positions) + 1, -1, np.int64)  # `position` as an array
        self._pos_of_layer[list(layer_positions)] = list(layer_positions.values())

    def at_step(self, pos: int, step: int) -> None:
        if pos != self.current:
            self.current = pos
            self._score = None

    def observe(self, pos: int, usage: np.ndarray, tokens: int = 1) -> None:
        """usage: float[E] — the fraction of `tokens` tokens (1 in decode, a chunk in prefill) that chose
        each expert at MoE position `pos`."""
        decay = self.FREQ_DECAY ** tokens
        self.freq[pos] = decay * self.freq[pos] + (1 - decay) * usage
        self._score = None

    def observe_rows(self, usage: np.ndarray) -> None:
        count = len(usage)
        self.freq[:count] = self.FREQ_DECAY * self.freq[:count] + (1 - self.FREQ_DECAY) * usage
        self._score = None

    def set_predictions(self, probabilities: dict[int, np.ndarray]) -> None:
        self.predicted = {self.position[layer]: p for layer, p in probabilities.items()}
        self._score = None

    def scores(self) -> np.ndarray:
        """float[P, E]: expected MoE positions until each key's next use (larger = evict first)."""
        score = self._score
        if score is None:
            f = np.maximum(self.freq, self.MIN_FREQ)
            p = f.copy()
            for pos, probs in self.predicted.items():
                p[pos] = probs
            d = (np.arange(self.num_positions) - self.current) % self.num_positions
            d[d == 0] = self.num_positions
            score = d[:, None] + (1.0 - p) * self.num_positions / f
            self._score = score  # read by the transfer thread too: replaced whole, never edited
        return score

    def _candidate_scores(self, table: SlotTable, candidates: np.ndarray) -> np.ndarray:
        return self.scores()[self._pos_of_layer[table.slot_layer[candidates]], table.slot_expert[candidates]]

    def ranked(self, table: SlotTable, candidates: np.ndarray) -> np.ndarray:
        score = self._candidate_scores(table, candidates)
        return candidates[np.lexsort((self.stamps(table, candidates), -score))]  # farthest use, then oldest

    def victim(self, table: SlotTable, candidates=None) -> int:
        """`ranked(...)[0]` in a few ops where a ranking sorts them all (the transfer thread claims one slot
        per prefetch, holding the cache's lock: 12 against 42 us at 614 slots): the farthest expected use,
        then the oldest among equals, then the first candidate."""
        candidates = _candidates(table, candidates)
        score = self._candidate_scores(table, candidates)
        farthest = np.flatnonzero(score == score.max())
        if len(farthest) > 1:
            return int(candidates[farthest[np.argmin(self.stamps(table, candidates[farthest]))]])
        return int(candidates[farthest[0]])


class Belady(LRU):
    """Optimal offline eviction over a known request sequence.

    future: list over steps of the sets of keys requested at that step; `advance(step)` tells the
    policy where the run is.
    """

    def __init__(self, future: list[set[ExpertKey]]):
        super().__init__()
        self.step = 0
        self.next_use: list[dict[ExpertKey, int]] = [dict() for _ in range(len(future) + 1)]
        upcoming: dict[ExpertKey, int] = {}
        for t in range(len(future) - 1, -1, -1):
            for key in future[t]:
                upcoming[key] = t
            self.next_use[t] = dict(upcoming)

    def advance(self, step: int) -> None:
        self.step = min(step, len(self.next_use) - 1)

    def at_step(self, pos: int, step: int) -> None:
        self.advance(step)

    def ranked(self, table: SlotTable, candidates: np.ndarray) -> np.ndarray:
        upcoming = self.next_use[self.step]
        never = len(self.next_use) + 1
        order = sorted(candidates.tolist(), key=lambda s: (-upcoming.get(table.key_in_slot[s], never),
                                                           self.last_use(table.key_in_slot[s])))
        return np.asarray(order, np.int64)


EVICTION_POLICIES = {"on-demand": LRU, "lfu": LFU}
