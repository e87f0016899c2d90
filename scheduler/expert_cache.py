"""`ExpertCache`: device expert slots filled by one host-side transfer thread (AsyncIO).

The main (decode) thread calls `ensure(keys)` with the (layer, expert) keys the running layer routes
to. Resident keys are pinned; keys already in flight (prefetched, not yet landed) are waited for;
missing keys get a slot (free, or the eviction policy's victim among slots that are neither pinned nor
in flight, outside the current prefetch plan's protected set unless every candidate is in it) and are
queued as *demand* transfers ahead of every prefetch. The main thread then waits for exactly those
transfers; that wait is the stall. `ensure` is `request_slots` (pin, claim, queue) then `wait_for`: the
runtime plans the next prefetches between the two, so they start while it waits.

`prefetch(keys, protect)` replaces the queue of pending prefetches (stale ones are dropped): the
transfer thread takes them in order, never evicting a pinned, in-flight or protected key, and drops a
prefetch for which no slot can be freed.

One link: copies land one after another. The copy itself is the runtime's `load(key, slot)` callback,
which issues it (jax.device_put) and returns a function that waits until it has landed and writes the
slot (or None when done at once). While one copy is on the link the thread has the next one issued,
so the link does not idle while the thread finishes one copy and starts the next; demand copies may be
issued deeper (`copies_in_flight`), where a fixed per-copy latency overlaps with other copies. With an
`EmulatedLink` each copy takes bytes/bandwidth + latency of link time, back to back when queued; only
the thread waits. A failure in the thread is re-raised in the main thread (same exception object,
original traceback) at its next `ensure`, within `POLL_S` while it waits.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from scheduler.link import EmulatedLink
from scheduler.slot_table import ExpertKey, SlotTable

POLL_S = 0.05
COPIES_IN_FLIGHT = 2  # copies issued and not landed, at most: the default, and always the limit for prefetches


@dataclass
class CacheStats:
    hits: int = 0  # requested key resident and ready
    late_hits: int = 0  # requested key prefetched but still in flight (waited for)
    misses: int = 0  # requested key absent: demand transfer
    prefetches: int = 0  # prefetch transfers completed
    prefetch_hits: int = 0  # prefetched keys later requested (ready or late)
    wasted_prefetch_bytes: int = 0  # prefetched keys evicted before any use
    h2d_bytes: int = 0
    stall_s: float = 0.0  # main-thread wall time waiting for expert transfers
    link_busy_s: float = 0.0  # transfer-thread time spent copying
    transfer_cpu_s: float = 0.0  # transfer-thread CPU time (issuing copies, slot writes, claims, bookkeeping)
    hits_per_layer: Counter = field(default_factory=Counter)
    misses_per_layer: Counter = field(default_factory=Counter)
    h2d_bytes_per_layer: Counter = field(default_factory=Counter)

    @property
    def requests(self) -> int:
        return self.hits + self.late_hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 1.0

    def as_dict(self) -> dict:
        per_layer = lambda c: {str(k): v for k, v in sorted(c.items())}  # noqa: E731
        return {
            "hits": self.hits, "late_hits": self.late_hits, "misses": self.misses, "hit_rate": self.hit_rate,
            "prefetches": self.prefetches, "prefetch_hits": self.prefetch_hits,
            "prefetch_precision": self.prefetch_hits / self.prefetches if self.prefetches else 0.0,
            "wasted_prefetch_bytes": self.wasted_prefetch_bytes, "h2d_bytes": self.h2d_bytes,
            "stall_s": self.stall_s, "link_busy_s": self.link_busy_s, "transfer_cpu_s": self.transfer_cpu_s,
            "hits_per_layer": per_layer(self.hits_per_layer), "misses_per_layer": per_layer(self.misses_per_layer),
            "h2d_bytes_per_layer": per_layer(self.h2d_bytes_per_layer),
        }


@dataclass
class SlotRequest:
    """One layer's `request_slots`: its keys (layers int or int[n], experts int[n]), their slots int64[n]
    (valid once landed) and `waits`, the slots whose copies are still to land."""

    layers: object
    experts: np.ndarray
    slots: np.ndarray
    waits: list

    @property
    def must_wait(self) -> bool:
        return bool(self.waits)


class ExpertCache:
    def __init__(self, num_slots: int, policy, load: Callable[[ExpertKey, int], None], expert_bytes: int,
                 link: EmulatedLink | None = None, key_shape: tuple[int, int] | None = None,
                 copies_in_flight: int = COPIES_IN_FLIGHT):
        self.table = SlotTable(num_slots, key_shape)
        self.policy = policy
        self.load = load
        self.expert_bytes = expert_bytes
        self.link = link
        if copies_in_flight < COPIES_IN_FLIGHT:
            raise ValueError(f"copies_in_flight {copies_in_flight}: at least {COPIES_IN_FLIGHT} "
                             "(one landing, the next issued)")
        # copies issued and not yet landed, at most: demand copies fill up to this, a prefetch is issued
        # only while fewer than COPIES_IN_FLIGHT are in flight
        self.copies_in_flight = copies_in_flight
        self.stats = CacheStats()
        self.measured_bandwidth: float | None = None  # bytes/s, EMA over transfers
        lock = threading.RLock()  # over everything below
        self._cond = threading.Condition(lock)  # the transfer thread waits on it for work
        # the decode loop waits on this one for its own copies: woken when the last of them lands (`_awaited`),
        # not at every landing (at 7 demand copies per layer, each wake-up cost it CPU and the interpreter lock)
        self._landed = threading.Condition(lock)
        self._awaited: set[int] = set()  # slots `wait_for` waits for that have not landed yet
        self._in_flight: set[int] = set()  # slots whose copy has not landed yet
        self._demand: deque[tuple[ExpertKey, int]] = deque()
        self._pending: deque[ExpertKey] = deque()
        self._protect: frozenset = frozenset()
        self._prefetched_unused: set[ExpertKey] = set()
        self._error: BaseException | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def num_slots(self) -> int:
        return self.table.num_slots

    def forget_prefetches(self) -> None:
        """Prefetches that landed before now no longer count as prefetch hits or waste: called where a
        stats window starts (a run, its decode), so a window's prefetch precision counts only the
        prefetches that landed in it and stays <= 1."""
        with self._cond:
            self._prefetched_unused.clear()

    # -- main thread ----------------------------------------------------------------------------------
    def ensure(self, keys: Sequence[ExpertKey]) -> dict[ExpertKey, int]:
        """Makes every key (distinct, at most num_slots) resident and pinned -> {key: slot}. Blocks."""
        layers = np.array([key[0] for key in keys], np.int64)
        experts = np.array([key[1] for key in keys], np.int64)
        return dict(zip(keys, self.ensure_slots(layers, experts).tolist()))

    def ensure_slots(self, layers, experts: np.ndarray) -> np.ndarray:
        """`ensure` over arrays (the runtime's per-layer call): layers one layer (int) or int[n]; experts
        int[n] (distinct keys, in request order) -> int64[n], the slot of each. Blocks until all landed."""
        request = self.request_slots(layers, experts)
        self.wait_for(request)
        return request.slots

    def request_slots(self, layers, experts: np.ndarray) -> "SlotRequest":
        """The first half of `ensure_slots`: pins the resident keys and queues demand transfers for the
        missing ones, ahead of every prefetch, without waiting -> a `SlotRequest` for `wait_for`. Between
        the two the caller may plan prefetches: they queue behind the demand transfers and start while the
        caller waits (the runtime plans the next layer there)."""
        if len(experts) > self.table.num_slots:
            raise ValueError(f"{len(experts)} experts requested at once but only {self.table.num_slots} slots")
        self._raise_if_failed()
        self._start()
        one_layer = isinstance(layers, (int, np.integer))
        layer_of = (lambda i: int(layers)) if one_layer else (lambda i: int(layers[i]))  # noqa: E731
        waits: list[int] = []  # slots to wait for
        stats = self.stats
        with self._cond:
            table = self.table
            table.unpin_all()
            slots = table.slots_of(layers, experts)
            slot_list = slots.tolist()  # a few keys: Python beats numpy's per-call overhead from here on
            missing_rows = [i for i, slot in enumerate(slot_list) if slot < 0]
            hit_rows = [i for i, slot in enumerate(slot_list) if slot >= 0] if missing_rows else range(len(slot_list))
            table.pinned_mask[[slot_list[i] for i in hit_rows] if missing_rows else slots] = True
            late_rows = set()
            if self._in_flight or self._prefetched_unused:  # late hits and prefetch hits: a few keys, in Python
                for i in hit_rows:
                    key, flying = (layer_of(i), int(experts[i])), slot_list[i] in self._in_flight
                    if flying:
                        waits.append(slot_list[i])
                        late_rows.add(i)
                    if flying or key in self._prefetched_unused:
                        stats.prefetch_hits += 1
                        self._prefetched_unused.discard(key)
            stats.late_hits += len(late_rows)
            stats.hits += len(hit_rows) - len(late_rows)
            if one_layer:
                stats.hits_per_layer[int(layers)] += len(hit_rows) - len(late_rows)
            else:
                for i in hit_rows:
                    if i not in late_rows:
                        stats.hits_per_layer[layer_of(i)] += 1
            if missing_rows or self._pending:
                wanted = {(layer_of(i), int(experts[i])) for i in range(len(experts))}
                self._pending = deque(k for k in self._pending if k not in wanted)
            missing = [(layer_of(i), int(experts[i])) for i in missing_rows]
            # evict outside the prefetch plan's protected set while possible
            claimed = self._claim_slots(missing, protect=wanted | self._protect) if missing else []
            if None in claimed:
                unclaimed = [n for n, slot in enumerate(claimed) if slot is None]
                for n, slot in zip(unclaimed, self._claim_slots([missing[n] for n in unclaimed], protect=wanted)):
                    claimed[n] = slot
            for i, key, slot in zip(missing_rows, missing, claimed):
                while slot is None:  # every other slot pinned or in flight: wait for a transfer to land
                    self._cond.wait(POLL_S)
                    self._raise_if_failed()
                    slot = self._claim_slot(key, protect=wanted)
                self.table.pin(slot)
                slots[i] = slot
                self._demand.append((key, slot))
                waits.append(slot)
                stats.misses += 1
                stats.misses_per_layer[key[0]] += 1
            if missing_rows:
                self._cond.notify_all()
        return SlotRequest(layers, experts, slots, waits)

    def wait_for(self, request: "SlotRequest") -> None:
        """Blocks until every transfer `request` needs has landed (the stall), then marks its keys used."""
        if request.waits:
            t0 = time.perf_counter()
            with self._cond:  # the slots stay pinned; the transfer thread notifies when the last one lands
                self._awaited = {slot for slot in request.waits if slot in self._in_flight}
                while any(slot in self._in_flight for slot in request.waits):
                    self._raise_if_failed()
                    self._landed.wait(POLL_S)
                self._awaited = set()
            self.stats.stall_s += time.perf_counter() - t0
            self._raise_if_failed()
        self.policy.touch_many(request.layers, request.experts)

    def landed_slots(self, layers: np.ndarray) -> np.ndarray:
        """int32[len(layers), E]: the slot of every key of these layers whose copy has landed, -1 elsewhere
        (absent or in flight). Taken while no slot write can be issued (the runtime holds its slots lock),
        it describes exactly the slot buffers of that moment: a landed key's write was issued before."""
        with self._cond:
            index = self.table.slot_index[layers]
            if self._in_flight:
                index = np.where(np.isin(index, list(self._in_flight)), -1, index)
            return index.astype(np.int32)

    def record_hits(self, layers: np.ndarray, experts) -> None:
        """Counts requests served from the cache without `request_slots` (a whole-token decode program read
        these keys from slots that had landed): layers int[m], experts int[m, k] (or m arrays), row i the
        distinct experts of layers[i], in request order. Hits, prefetch hits and the eviction policy's use
        stamps as m `ensure` calls; a key evicted since still counts (the program used its copy)."""
        stats = self.stats
        rows = [np.asarray(row) for row in experts] if isinstance(experts, list) else experts
        layer_list = layers.tolist()
        with self._cond:
            self.table.unpin_all()
            if self._prefetched_unused:
                for layer, row in zip(layer_list, rows):
                    for e in row.tolist():
                        if (layer, e) in self._prefetched_unused:
                            stats.prefetch_hits += 1
                            self._prefetched_unused.discard((layer, e))
            for layer, row in zip(layer_list, rows):
                stats.hits_per_layer[layer] += len(row)
            stats.hits += sum(len(row) for row in rows)
        if isinstance(rows, np.ndarray):
            self.policy.touch_many(np.repeat(layers, rows.shape[1]), rows.reshape(-1))
        else:
            self.policy.touch_many(np.repeat(layers, [len(r) for r in rows]), np.concatenate(rows))

    def prefetch(self, keys: Iterable[ExpertKey], protect: Iterable[ExpertKey] = ()) -> None:
        """Replaces the pending prefetches with `keys` (most urgent first). Keys in `protect` (and the
        requested keys themselves) are not evicted to make room for them."""
        self._raise_if_failed()
        self._start()
        with self._cond:
            lookup = self.table.slot_of.get
            self._pending = deque(k for k in dict.fromkeys(keys) if lookup(k) is None) if keys else deque()
            self._protect = frozenset(protect) | frozenset(self._pending) if self._pending else frozenset(protect)
            if self._pending:  # the thread waits for work only; fewer pending keys need no wake-up
                self._cond.notify_all()

    def resident_keys(self) -> set[ExpertKey]:
        with self._cond:
            return set(self.table.slot_of)

    def resident_mask(self, layers=None) -> np.ndarray:
        """bool[layers, experts]: keys in the cache or in flight (rows: `layers`, an index array, or all)."""
        with self._cond:
            index = self.table.slot_index
            return (index if layers is None else index[layers]) >= 0

    def close(self) -> None:
        """Stops the transfer thread (after the copy in progress) and drops pending prefetches.
        The cache stays usable: the next `ensure`/`prefetch` starts a new thread."""
        with self._cond:
            self._closed = True
            self._pending.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._cond:
            self._closed = False

    # -- shared helpers (caller holds the lock) ------------------------------------------------------
    def _claim_slot(self, key: ExpertKey, protect) -> int | None:
        """A free slot, or the victim among slots neither pinned, in flight nor protected; assigns key.
        The same slot as `_claim_slots([key], protect)`, from the policy's `victim` (no full ranking)."""
        slot = self.table.first_free()
        if slot is None:
            candidates = self.table.candidates(protect, busy=self._in_flight)
            if not len(candidates):
                return None
            slot = self.policy.victim(self.table, candidates)
        return self._assign_claimed(key, slot)

    def _assign_claimed(self, key: ExpertKey, slot: int) -> int:
        """Puts `key` in `slot` (free or the victim), counting an unused prefetch it evicts, and marks the
        slot in flight -> slot."""
        evicted = self.table.assign(key, slot)
        if evicted is not None and evicted in self._prefetched_unused:
            self._prefetched_unused.discard(evicted)
            self.stats.wasted_prefetch_bytes += self.expert_bytes
        self._in_flight.add(slot)
        return slot

    def _claim_slots(self, keys: list[ExpertKey], protect) -> list[int | None]:
        """`_claim_slot` for each key in turn (None where no slot can be freed), with one eviction ranking
        for all of them: the same slots as successive claims, which each take their slot out."""
        out, ranked = [], None
        for key in keys:
            slot = self.table.first_free()
            if slot is None:
                if ranked is None:
                    candidates = self.table.candidates(protect, busy=self._in_flight)
                    ranked = iter(self.policy.ranked(self.table, candidates).tolist() if len(candidates) else ())
                slot = next(ranked, None)
                if slot is None:
                    out.append(None)
                    continue
            out.append(self._assign_claimed(key, slot))
        return out

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _start(self) -> None:
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._run, name="jaxmoe-expert-transfers", daemon=True)
            self._thread.start()

    # -- transfer thread ---------------------------------------------------------------------------
    def _next_transfer(self, wait: bool = True, demand_only: bool = False):
        """(key, slot, is_prefetch) of the next transfer; None when there is none and not `wait` (or only
        prefetches and `demand_only`); _CLOSED when closed. Holds the lock."""
        while True:
            if self._closed:
                return _CLOSED
            if self._demand:
                key, slot = self._demand.popleft()
                return key, slot, False
            if demand_only:
                return None
            while self._pending:
                key = self._pending.popleft()
                if self.table.lookup(key) is not None:
                    continue
                slot = self._claim_slot(key, protect=self._protect)
                if slot is not None:
                    return key, slot, True
            if not wait:
                return None
            self._cond.wait()

    def _start_transfer(self, job, link_free_at: float) -> _Transfer:
        """Issues the copy of job = (key, slot, is_prefetch): `load` returns once the copy is queued (with
        the wait until it has landed, or None if it already has). link_free_at: when the emulated link
        finishes the copy ahead of it."""
        key, slot, is_prefetch = job
        t0 = time.perf_counter()
        landed = self.load(key, slot)
        emulated_done = None
        if self.link is not None:  # one copy at a time, back to back when queued
            emulated_done = max(t0, link_free_at) + self.link.transfer_s(self.expert_bytes)
        return _Transfer(key, slot, is_prefetch, t0, landed, emulated_done)

    def _count_cpu(self) -> None:
        """Adds this (transfer) thread's CPU time since the last call to the stats. Holds the lock."""
        now = time.thread_time()
        self.stats.transfer_cpu_s += now - self._cpu_mark
        self._cpu_mark = now

    def _finish_transfer(self, transfer: _Transfer, previous_done: float) -> float:
        """Waits until `transfer` has landed, then makes its slot usable -> when it landed."""
        if transfer.landed is not None:
            transfer.landed()
        if self.link is not None:
            remaining = transfer.emulated_done - time.perf_counter()
            if remaining > 0:
                time.sleep(remaining)
        done = time.perf_counter()
        service = done - max(transfer.started, previous_done)  # the link's time for this copy alone
        with self._cond:
            key, slot = transfer.key, transfer.slot
            self.stats.h2d_bytes += self.expert_bytes
            self.stats.h2d_bytes_per_layer[key[0]] += self.expert_bytes
            self.stats.link_busy_s += service
            rate = self.expert_bytes / max(service, 1e-9)
            self.measured_bandwidth = rate if self.measured_bandwidth is None else 0.8 * self.measured_bandwidth + 0.2 * rate
            if transfer.is_prefetch:
                self.stats.prefetches += 1
                if not self.table.pinned_mask[slot]:
                    self._prefetched_unused.add(key)
            self._in_flight.discard(slot)
            self._count_cpu()
            if slot in self._awaited:
                self._awaited.discard(slot)
                if not self._awaited:
                    self._landed.notify()
            self._cond.notify_all()  # a claim waiting for any slot to free up (rare)
        return done

    def _run(self) -> None:
        """Copies land one after another, but while one is on the link the next is already issued, so
        the link does not idle while this thread finishes one copy and starts the next. Demand copies are
        issued up to `copies_in_flight` deep (a fixed per-copy latency then overlaps with the copies
        ahead); a prefetch only while fewer than COPIES_IN_FLIGHT (2) are in flight: queueing prefetches
        deeper would commit the link to guesses that a demand transfer arriving meanwhile would have to
        wait for."""
        flying: deque[_Transfer] = deque()  # issued, oldest first
        done = 0.0
        self._cpu_mark = time.thread_time()
        try:
            while True:
                if not flying:
                    with self._cond:
                        self._count_cpu()  # before an idle wait: what the last landing left uncounted
                        job = self._next_transfer()
                    if job is _CLOSED:
                        return
                    flying.append(self._start_transfer(job, done))
                while len(flying) < self.copies_in_flight:
                    with self._cond:
                        job = self._next_transfer(wait=False, demand_only=len(flying) >= COPIES_IN_FLIGHT)
                    if job is None or job is _CLOSED:
                        break
                    flying.append(self._start_transfer(job, flying[-1].emulated_done or 0.0))
                done = self._finish_transfer(flying.popleft(), done)
        except BaseException as e:  # noqa: BLE001 — surfaced in the main thread
            with self._cond:
                self._error = e
                self._cond.notify_all()
                self._landed.notify_all()


_CLOSED = object()


@dataclass
class _Transfer:
    """A copy the transfer thread has issued: landed() (or None) waits until it is on the device;
    emulated_done: when the emulated link delivers it (perf_counter seconds; None without emulation)."""

    key: ExpertKey
    slot: int
    is_prefetch: bool
    started: float
    landed: Callable[[], None] | None
    emulated_done: float | None
