"""Eviction policies: which of the candidate slots (unpinned, not in flight, not protected by the
current prefetch plan) to reuse. Each policy sees every access (`touch`).

- `LRU` — least recently used: the mixtral-offloading baseline ("on-demand"), and the tie-breaker of
  the prefetching policies, whose plan protects the experts predicted within the horizon, so what
  they evict is what is least likely to be needed soon.
- `LFU` — least frequently used over the run, ties by LRU.
- `Belady` — evicts the expert whose next use lies farthest in the future, given the true future
  routing (the `oracle` policy's bound).
"""

from __future__ import annotations

import itertools
from collections import Counter

from scheduler.slot_table import ExpertKey, SlotTable


class LRU:
    def __init__(self):
        self._clock = itertools.count()
        self.last_use: dict[ExpertKey, int] = {}

    def touch(self, key: ExpertKey) -> None:
        self.last_use[key] = next(self._clock)

    def victim(self, table: SlotTable, candidates: list[int] | None = None) -> int:
        candidates = table.evictable_slots() if candidates is None else candidates
        if not candidates:
            raise RuntimeError("no evictable slot: every slot is pinned")
        return min(candidates, key=lambda s: self.last_use.get(table.key_in_slot[s], -1))


class LFU(LRU):
    def __init__(self):
        super().__init__()
        self.uses: Counter = Counter()

    def touch(self, key: ExpertKey) -> None:
        super().touch(key)
        self.uses[key] += 1

    def victim(self, table: SlotTable, candidates: list[int] | None = None) -> int:
        candidates = table.evictable_slots() if candidates is None else candidates
        if not candidates:
            raise RuntimeError("no evictable slot: every slot is pinned")
        return min(candidates, key=lambda s: (self.uses[table.key_in_slot[s]], self.last_use.get(table.key_in_slot[s], -1)))


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

    def victim(self, table: SlotTable, candidates: list[int] | None = None) -> int:
        candidates = table.evictable_slots() if candidates is None else candidates
        if not candidates:
            raise RuntimeError("no evictable slot: every slot is pinned")
        upcoming = self.next_use[self.step]
        never = len(self.next_use) + 1
        return max(candidates, key=lambda s: (upcoming.get(table.key_in_slot[s], never), -self.last_use.get(table.key_in_slot[s], -1)))


EVICTION_POLICIES = {"on-demand": LRU, "lfu": LFU}
