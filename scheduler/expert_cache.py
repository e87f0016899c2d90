"""`ExpertCache`: makes the experts a layer needs resident in device slots, on demand.

The runtime calls `ensure(keys)` with the (layer, expert) keys the running layer routes to; hits
are pinned in place, misses take a free slot or the eviction policy's victim (never a slot the same
call pinned) and are loaded through the `load(key, slot)` callback the runtime supplies (which
blocks until the copy has landed). Counts hits, misses, bytes moved and the time spent waiting.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

from scheduler.slot_table import ExpertKey, SlotTable


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    h2d_bytes: int = 0
    stall_s: float = 0.0  # wall time spent waiting for expert copies inside ensure()
    hits_per_layer: Counter = field(default_factory=Counter)
    misses_per_layer: Counter = field(default_factory=Counter)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 1.0

    def as_dict(self) -> dict:
        return {
            "hits": self.hits, "misses": self.misses, "hit_rate": self.hit_rate, "h2d_bytes": self.h2d_bytes,
            "stall_s": self.stall_s,
            "hits_per_layer": {str(k): v for k, v in sorted(self.hits_per_layer.items())},
            "misses_per_layer": {str(k): v for k, v in sorted(self.misses_per_layer.items())},
        }


class ExpertCache:
    def __init__(self, num_slots: int, policy, load: Callable[[ExpertKey, int], None], expert_bytes: int):
        self.table = SlotTable(num_slots)
        self.policy = policy
        self.load = load
        self.expert_bytes = expert_bytes
        self.stats = CacheStats()

    @property
    def num_slots(self) -> int:
        return self.table.num_slots

    def ensure(self, keys: Sequence[ExpertKey]) -> dict[ExpertKey, int]:
        """Loads every key (distinct, at most num_slots of them) into a slot -> {key: slot}."""
        if len(keys) > self.table.num_slots:
            raise ValueError(f"{len(keys)} experts requested at once but only {self.table.num_slots} slots")
        self.table.unpin_all()
        slots: dict[ExpertKey, int] = {}
        missing = []
        for key in keys:
            slot = self.table.lookup(key)
            if slot is None:
                missing.append(key)
                continue
            slots[key] = slot
            self.table.pin(slot)
            self.stats.hits += 1
            self.stats.hits_per_layer[key[0]] += 1
        for key in missing:
            free = self.table.free_slots()
            slot = free[0] if free else self.policy.victim(self.table)
            self.table.assign(key, slot)
            self.table.pin(slot)
            t0 = time.perf_counter()
            self.load(key, slot)
            self.stats.stall_s += time.perf_counter() - t0
            self.stats.misses += 1
            self.stats.misses_per_layer[key[0]] += 1
            self.stats.h2d_bytes += self.expert_bytes
            slots[key] = slot
        for key in keys:
            self.policy.touch(key)
        return slots
