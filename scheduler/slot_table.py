"""`SlotTable`: the mapping between expert keys and a fixed pool of device slots.

A key is `(layer, expert)`. Each slot is free or holds one key; a slot can be pinned (the running
layer needs it, so it must not be evicted). Pure bookkeeping: no JAX, no timing.
"""

from __future__ import annotations

import heapq

import numpy as np

ExpertKey = tuple[int, int]


def shape_for(layers, experts: np.ndarray) -> tuple[int, int]:
    """The [layers, experts] shape a non-empty batch of keys needs (layers: one int or int[n])."""
    top_layer = layers if isinstance(layers, (int, np.integer)) else int(layers.max())
    return int(top_layer) + 1, int(experts.max()) + 1


def grown_to(table: np.ndarray, shape: tuple[int, int], fill) -> np.ndarray:
    """`table` [layers, experts], enlarged with `fill` to at least `shape` (itself if already that big)."""
    shape = (max(table.shape[0], shape[0]), max(table.shape[1], shape[1]))
    if shape == table.shape:
        return table
    grown = np.full(shape, fill, table.dtype)
    grown[: table.shape[0], : table.shape[1]] = table
    return grown


def lookup_or(table: np.ndarray, layers, experts: np.ndarray, fill) -> np.ndarray:
    """table[layers, experts] where in range, else `fill` (keys beyond every key seen); layers: int or int[n]."""
    layers = np.broadcast_to(layers, experts.shape)
    inside = (layers < table.shape[0]) & (experts < table.shape[1])
    out = np.full(len(experts), fill, table.dtype)
    out[inside] = table[layers[inside], experts[inside]]
    return out


class SlotTable:
    """key_shape: (layers, experts) bounds of the keys, if known (the index grows to fit any key)."""

    def __init__(self, num_slots: int, key_shape: tuple[int, int] | None = None):
        if num_slots < 1:
            raise ValueError("num_slots must be >= 1")
        self.num_slots = num_slots
        self.key_in_slot: list[ExpertKey | None] = [None] * num_slots
        self.slot_of: dict[ExpertKey, int] = {}
        # slot_of as an int64[layers, experts] array (-1: no slot): a layer's k lookups are one numpy op
        self.slot_index = np.full(key_shape or (0, 0), -1, np.int64)
        # the same facts as arrays over slots, so choosing among hundreds of slots is a few numpy ops
        self.slot_layer = np.full(num_slots, -1, np.int64)  # -1: free
        self.slot_expert = np.full(num_slots, -1, np.int64)
        self.pinned_mask = np.zeros(num_slots, bool)  # the running layer needs it: not evictable
        self._free_heap = list(range(num_slots))  # may hold stale (occupied) entries, skipped on read

    @property
    def pinned(self) -> set[int]:
        """The pinned slots."""
        return set(np.flatnonzero(self.pinned_mask).tolist())

    @property
    def resident(self) -> np.ndarray:
        """bool[layers, experts]: the keys that hold a slot (what a planner reads without building sets)."""
        return self.slot_index >= 0

    def lookup(self, key: ExpertKey) -> int | None:
        return self.slot_of.get(key)

    def slots_of(self, layers, experts: np.ndarray) -> np.ndarray:
        """layers: one layer (int) or int[n]; experts: int[n] -> int64[n], each key's slot (-1: none)."""
        try:
            return self.slot_index[layers, experts]
        except IndexError:  # a key beyond every key seen so far
            return lookup_or(self.slot_index, layers, experts, -1)

    def free_slots(self) -> list[int]:
        return np.flatnonzero(self.slot_layer < 0).tolist()

    def first_free(self) -> int | None:
        """The lowest free slot, or None."""
        heap = self._free_heap
        while heap and self.slot_layer[heap[0]] >= 0:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def evictable_slots(self) -> list[int]:
        """Occupied slots that are not pinned."""
        return self.candidates().tolist()

    def candidates(self, protect=(), busy=()) -> np.ndarray:
        """int[C] ascending: occupied, unpinned slots, except those in `busy` (e.g. a transfer in flight) and
        those holding a key in `protect` -- the slots an eviction may choose from."""
        mask = (self.slot_layer >= 0) & ~self.pinned_mask
        if busy:
            mask[list(busy)] = False
        for key in protect:
            slot = self.slot_of.get(key)
            if slot is not None:
                mask[slot] = False
        return np.flatnonzero(mask)

    def assign(self, key: ExpertKey, slot: int) -> ExpertKey | None:
        """Puts `key` in `slot`, returning the key it evicted (or None). Refuses pinned slots."""
        if self.pinned_mask[slot]:
            raise ValueError(f"slot {slot} is pinned")
        if key in self.slot_of:
            raise ValueError(f"{key} already in slot {self.slot_of[key]}")
        evicted = self.key_in_slot[slot]
        if evicted is not None:
            del self.slot_of[evicted]
            self._mark(evicted, False)
        self.key_in_slot[slot] = key
        self.slot_of[key] = slot
        self.slot_layer[slot], self.slot_expert[slot] = key
        self._mark(key, True)
        return evicted

    def release(self, slot: int) -> None:
        """Empties `slot` (e.g. a cancelled transfer)."""
        key = self.key_in_slot[slot]
        if key is not None:
            del self.slot_of[key]
            self._mark(key, False)
        self.key_in_slot[slot] = None
        self.slot_layer[slot] = self.slot_expert[slot] = -1
        heapq.heappush(self._free_heap, slot)
        self.pinned_mask[slot] = False

    def _mark(self, key: ExpertKey, present: bool) -> None:
        """Records in `slot_index` that `key` now holds its slot (`slot_of`) or none."""
        layer, expert = key
        if layer >= self.slot_index.shape[0] or expert >= self.slot_index.shape[1]:
            self.slot_index = grown_to(self.slot_index, (layer + 1, expert + 1), -1)
        self.slot_index[layer, expert] = self.slot_of[key] if present else -1

    def pin(self, slot: int) -> None:
        self.pinned_mask[slot] = True

    def unpin_all(self) -> None:
        self.pinned_mask[:] = False

    def check(self) -> None:
        """Asserts internal consistency (used by tests and fuzzers)."""
        assert len(self.slot_of) == sum(k is not None for k in self.key_in_slot)
        for key, slot in self.slot_of.items():
            assert self.key_in_slot[slot] == key
        assert int(self.resident.sum()) == len(self.slot_of) and all(self.slot_index[k] == s for k, s in self.slot_of.items())
        for slot, key in enumerate(self.key_in_slot):
            assert (self.slot_layer[slot], self.slot_expert[slot]) == (key if key is not None else (-1, -1))
