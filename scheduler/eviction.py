"""Eviction policies over a `SlotTable`: which unpinned slot to reuse when a missing expert must load.

Each policy sees every access (`touch`) and answers `victim(table)`. LRU is the mixtral-offloading
baseline ("on-demand"); LFU counts accesses over the whole run.
"""

from __future__ import annotations

import itertools
from collections import Counter

from scheduler.slot_table import ExpertKey, SlotTable


class LRU:
    name = "on-demand"

    def __init__(self):
        self._clock = itertools.count()
        self.last_use: dict[ExpertKey, int] = {}

    def touch(self, key: ExpertKey) -> None:
        self.last_use[key] = next(self._clock)

    def victim(self, table: SlotTable) -> int:
        candidates = table.evictable_slots()
        if not candidates:
            raise RuntimeError("no evictable slot: every slot is pinned")
        return min(candidates, key=lambda s: self.last_use.get(table.key_in_slot[s], -1))


class LFU(LRU):
    """Least frequently used, ties broken by least recently used."""

    name = "lfu"

    def __init__(self):
        super().__init__()
        self.uses: Counter = Counter()

    def touch(self, key: ExpertKey) -> None:
        super().touch(key)
        self.uses[key] += 1

    def victim(self, table: SlotTable) -> int:
        candidates = table.evictable_slots()
        if not candidates:
            raise RuntimeError("no evictable slot: every slot is pinned")
        return min(candidates, key=lambda s: (self.uses[table.key_in_slot[s]], self.last_use.get(table.key_in_slot[s], -1)))


EVICTION_POLICIES = {"on-demand": LRU, "lfu": LFU}
