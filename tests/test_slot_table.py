"""SlotTable / eviction policies / ExpertCache bookkeeping, without JAX: the load callback only records."""

import random
import threading
import time

import pytest

import numpy as np

from scheduler.eviction import LFU, LRU, Belady, ExpectedReuse
from scheduler.expert_cache import ExpertCache
from scheduler.slot_table import SlotTable

EXPERT_BYTES = 1000


class RecordingLoad:
    """The transfer callback: records (key, slot) and which thread ran it."""

    def __init__(self):
        self.calls = []
        self.threads = set()

    def __call__(self, key, slot):
        self.calls.append((key, slot))
        self.threads.add(threading.current_thread().name)


@pytest.fixture
def make_cache():
    made = []

    def make(num_slots, policy=None):
        load = RecordingLoad()
        cache = ExpertCache(num_slots, policy or LRU(), load, EXPERT_BYTES)
        made.append(cache)
        return cache, load

    yield make
    for cache in made:
        cache.close()


# -- SlotTable ---------------------------------------------------------------------------------------

def test_assign_evict_release_bookkeeping():
    t = SlotTable(3)
    assert t.free_slots() == [0, 1, 2] and t.evictable_slots() == []
    assert t.assign((0, 1), 0) is None
    assert t.assign((0, 2), 2) is None
    assert t.lookup((0, 1)) == 0 and t.lookup((0, 2)) == 2 and t.lookup((0, 3)) is None
    assert t.free_slots() == [1] and t.evictable_slots() == [0, 2]
    assert t.assign((1, 5), 0) == (0, 1)  # replaces and reports the evicted key
    assert t.lookup((0, 1)) is None and t.lookup((1, 5)) == 0
    assert t.key_in_slot == [(1, 5), None, (0, 2)]
    t.check()
    with pytest.raises(ValueError, match="already in slot"):
        t.assign((1, 5), 1)
    t.pin(2)
    assert t.evictable_slots() == [0]
    with pytest.raises(ValueError, match="pinned"):
        t.assign((0, 4), 2)
    assert t.lookup((0, 2)) == 2  # a refused assign changes nothing
    t.release(2)
    assert t.lookup((0, 2)) is None and 2 not in t.pinned and t.free_slots() == [1, 2]
    t.release(1)  # releasing a free slot is a no-op
    t.pin(0)
    t.unpin_all()
    assert t.pinned == set()
    t.check()
    with pytest.raises(ValueError):
        SlotTable(0)


def test_check_detects_inconsistency():
    t = SlotTable(2)
    t.assign((0, 0), 0)
    t.slot_of[(0, 0)] = 1  # corrupt
    with pytest.raises(AssertionError):
        t.check()


# -- eviction policies ----------------------------------------------------------------------------------

def filled_table(keys):
    t = SlotTable(len(keys))
    for slot, key in enumerate(keys):
        t.assign(key, slot)
    return t


def test_lru_order_and_pinned_never_victim():
    keys = [(0, e) for e in range(4)]
    t = filled_table(keys)
    lru = LRU()
    for e in (2, 0, 3, 1):
        lru.touch((0, e))
    assert lru.victim(t) == 2  # least recently used
    lru.touch((0, 2))
    assert lru.victim(t) == 0
    t.pin(0)
    assert lru.victim(t) == 3  # pinned slot 0 is skipped
    assert lru.victim(t, candidates=[1, 2]) == 1
    for s in range(4):
        t.pin(s)
    with pytest.raises(RuntimeError, match="pinned"):
        lru.victim(t)
    t.unpin_all()
    t.assign((5, 5), 3)  # never touched: evicted first
    assert lru.victim(t) == 3


def test_lfu_order_ties_by_recency():
    t = filled_table([(1, 0), (1, 1), (1, 2)])
    lfu = LFU()
    for key in [(1, 0), (1, 0), (1, 0), (1, 1), (1, 2), (1, 2)]:
        lfu.touch(key)
    assert lfu.victim(t) == 1  # used once
    lfu.touch((1, 1))  # now (1,1) and (1,2) both used twice; (1,2) was used longer ago
    assert lfu.victim(t) == 2
    t.pin(2)
    assert lfu.victim(t) == 1
    t.pin(1)
    assert lfu.victim(t) == 0
    t.pin(0)
    with pytest.raises(RuntimeError):
        lfu.victim(t)


def test_expected_reuse_prefers_frequent_and_predicted_experts():
    layers = {10: 0, 11: 1}  # two MoE layers at positions 0, 1; 4 experts, top-1
    t = filled_table([(10, 0), (10, 1), (11, 0), (11, 1)])
    policy = ExpectedReuse(layers, num_experts=4, top_k=1)
    for _ in range(20):  # layer 10 keeps choosing expert 0, layer 11 expert 1
        policy.observe(0, np.array([1.0, 0, 0, 0]))
        policy.observe(1, np.array([0, 1.0, 0, 0]))
    assert t.key_in_slot[policy.victim(t, [0, 1])] == (10, 1)
    assert t.key_in_slot[policy.victim(t, [2, 3])] == (11, 0)
    # the predictor is sure layer 11's next token picks expert 0 and never 1: that flips the choice
    policy.set_predictions({11: np.array([1.0, 0.0, 0, 0], np.float32)})
    assert t.key_in_slot[policy.victim(t, [2, 3])] == (11, 1)
    # a prefill chunk of 32 tokens weighs as 32 observations
    policy.observe(0, np.array([0, 0.75, 0.25, 0]), tokens=32)
    assert policy.freq[0, 1] > policy.freq[0, 0]
    t.pin(1)
    assert policy.victim(t) != 1


@pytest.mark.parametrize("name", ["lru", "lfu", "reuse", "belady"])
def test_victim_is_the_first_of_the_ranking(name):
    """`victim` (one claim: no full ranking) picks what `ranked(...)[0]` does, ties included: repeated
    stamps, scores and use counts, predictions inside the horizon, any running position."""
    rng = np.random.default_rng(2)
    layers = [3, 5, 8, 9]
    keys = [(layer, e) for layer in layers for e in range(8)]
    t = filled_table(keys)
    future = [{keys[i] for i in rng.choice(32, 3, replace=False)} for _ in range(60)]
    policy = {"lru": LRU(), "lfu": LFU(), "belady": Belady(future),
              "reuse": ExpectedReuse({layer: pos for pos, layer in enumerate(layers)}, num_experts=8, top_k=2)}[name]
    for step in range(50):
        pos = step % 4
        if step % 3:  # leave some keys never touched, and stamps of keys touched together in order
            policy.touch_many(layers[pos], rng.permutation(8)[:2])
        policy.observe(pos, np.bincount(rng.choice(8, 2, replace=False), minlength=8) / 1.0)
        policy.set_predictions({layers[(pos + 1) % 4]: rng.choice([0.0, 0.5, 1.0], 8).astype(np.float32)})
        policy.at_step((pos + 1) % 4, step)
        candidates = np.sort(rng.choice(32, 10, replace=False))
        assert policy.victim(t, candidates) == int(policy.ranked(t, candidates)[0])


def test_expected_reuse_misses_fewer_than_lru_on_skewed_routing(make_cache):
    """A Zipf-like routing stream at one layer: LRU thrashes on the tail, expected reuse keeps the head."""
    rng = np.random.default_rng(0)
    weights = 1.0 / np.arange(1, 17)
    stream = rng.choice(16, size=600, p=weights / weights.sum())
    misses = {}
    for name, policy in [("lru", LRU()), ("reuse", ExpectedReuse({0: 0}, num_experts=16, top_k=1)),
                         ("belady", Belady([{(0, int(e))} for e in stream]))]:
        cache, _ = make_cache(4, policy)
        for step, e in enumerate(stream):
            if isinstance(policy, Belady):
                policy.advance(step + 1)
            cache.ensure([(0, int(e))])
            if isinstance(policy, ExpectedReuse):
                policy.observe(0, np.eye(16)[e])
        misses[name] = cache.stats.misses
    assert misses["belady"] < misses["reuse"] < 0.9 * misses["lru"], misses


# -- ExpertCache ---------------------------------------------------------------------------------------

def test_ensure_counts_hits_misses_and_bytes(make_cache):
    cache, load = make_cache(3)
    a, b, c, d = (0, 0), (0, 1), (1, 0), (1, 1)
    slots = cache.ensure([a, b])
    assert slots == {a: cache.table.lookup(a), b: cache.table.lookup(b)}
    assert (cache.stats.hits, cache.stats.misses, cache.stats.h2d_bytes) == (0, 2, 2 * EXPERT_BYTES)
    assert sorted(load.calls) == sorted(slots.items())
    assert load.threads == {"jaxmoe-expert-transfers"}  # copies run on the transfer thread
    slots2 = cache.ensure([b, c])
    assert slots2[b] == slots[b]  # a hit keeps its slot
    assert (cache.stats.hits, cache.stats.misses, cache.stats.h2d_bytes) == (1, 3, 3 * EXPERT_BYTES)
    assert cache.table.pinned == {slots2[b], slots2[c]}  # the previous call's pins are gone
    cache.ensure([d])  # full: evicts the LRU key, a
    assert cache.table.lookup(a) is None
    assert {cache.table.lookup(k) for k in (b, c, d)} == {0, 1, 2}
    assert cache.stats.requests == 5 and cache.stats.hit_rate == pytest.approx(1 / 5)
    assert cache.stats.hits_per_layer == {0: 1} and cache.stats.misses_per_layer == {0: 2, 1: 2}
    assert cache.stats.h2d_bytes_per_layer == {0: 2 * EXPERT_BYTES, 1: 2 * EXPERT_BYTES}
    assert len(load.calls) == cache.stats.misses
    assert cache.stats.stall_s >= 0.0
    cache.table.check()


@pytest.mark.parametrize("order", ["hit_first", "miss_first"])
def test_never_evicts_a_key_requested_in_the_same_call(make_cache, order):
    cache, _ = make_cache(3)
    a, b, c, d = (0, 0), (0, 1), (0, 2), (0, 3)
    cache.ensure([a])
    cache.ensure([b])
    cache.ensure([c])  # LRU order: a (oldest), b, c
    keys = [a, d] if order == "hit_first" else [d, a]
    slots = cache.ensure(keys)
    assert cache.table.lookup(a) == slots[a]  # a is the LRU key but requested: b goes instead
    assert cache.table.lookup(b) is None
    assert cache.table.lookup(c) is not None and cache.table.lookup(d) == slots[d]


def test_lfu_cache_keeps_frequent_expert(make_cache):
    cache, _ = make_cache(2, LFU())
    hot, x, y = (0, 0), (0, 1), (0, 2)
    for _ in range(3):
        cache.ensure([hot])
    cache.ensure([x])
    cache.ensure([y])  # LRU would evict hot (older); LFU evicts x (used once)
    assert cache.table.lookup(hot) is not None and cache.table.lookup(x) is None


def test_raises_when_more_keys_than_slots(make_cache):
    cache, load = make_cache(2)
    with pytest.raises(ValueError, match="3 experts requested at once but only 2 slots"):
        cache.ensure([(0, 0), (0, 1), (0, 2)])
    assert load.calls == [] and cache.stats.requests == 0
    cache.ensure([(0, 0), (0, 1)])  # still usable
    assert cache.stats.misses == 2


def test_close_then_reuse(make_cache):
    cache, load = make_cache(2)
    cache.ensure([(0, 0)])
    cache.close()
    assert all(t.name != "jaxmoe-expert-transfers" for t in threading.enumerate())
    cache.ensure([(0, 0), (0, 1)])  # a new transfer thread
    assert cache.stats.hits == 1 and cache.stats.misses == 2 and len(load.calls) == 2


class ReferenceCache:
    """Set-level model of ExpertCache without prefetch: which keys are resident after each call."""

    def __init__(self, num_slots, lfu):
        self.num_slots, self.lfu = num_slots, lfu
        self.resident = set()
        self.clock = 0
        self.last_use, self.uses = {}, {}

    def ensure(self, keys):
        wanted = set(keys)
        hits = [k for k in keys if k in self.resident]
        for key in keys:
            if key in self.resident:
                continue
            if len(self.resident) >= self.num_slots:
                candidates = self.resident - wanted
                rank = (lambda k: (self.uses[k], self.last_use[k])) if self.lfu else (lambda k: self.last_use[k])
                self.resident.remove(min(candidates, key=rank))
            self.resident.add(key)
        for key in keys:
            self.clock += 1
            self.last_use[key] = self.clock
            self.uses[key] = self.uses.get(key, 0) + 1
        return len(hits)


@pytest.mark.parametrize("seed", range(4))
def test_fuzz_ensure_matches_reference_model(make_cache, seed):
    rng = random.Random(seed)
    universe = [(layer, e) for layer in range(3) for e in range(6)]
    for trial in range(6):
        num_slots = rng.randint(1, 7)
        lfu = rng.random() < 0.5
        cache, load = make_cache(num_slots, LFU() if lfu else LRU())
        ref = ReferenceCache(num_slots, lfu)
        hits = misses = 0
        for _ in range(40):
            keys = rng.sample(universe, rng.randint(1, num_slots))
            before_calls, before = len(load.calls), set(cache.table.slot_of)
            slots = cache.ensure(keys)
            cache.table.check()
            assert set(slots) == set(keys)
            assert len(set(slots.values())) == len(keys)  # distinct slots
            for key, slot in slots.items():
                assert cache.table.lookup(key) == slot and cache.table.key_in_slot[slot] == key
            assert cache.table.pinned == set(slots.values())
            new_hits = ref.ensure(keys)
            hits, misses = hits + new_hits, misses + len(keys) - new_hits
            assert set(cache.table.slot_of) == ref.resident, (seed, trial, keys)
            assert (cache.stats.hits, cache.stats.misses, cache.stats.late_hits) == (hits, misses, 0)
            assert cache.stats.h2d_bytes == misses * EXPERT_BYTES
            loaded = load.calls[before_calls:]  # exactly the missing keys, into the slots the table says
            assert sorted(loaded) == sorted((k, slots[k]) for k in keys if k not in before)
            assert len(loaded) == len(keys) - new_hits
        cache.close()


def test_next_copy_is_issued_before_the_current_one_lands_and_the_link_stays_serial():
    """load() issues a copy and returns the wait for its landing: the thread issues the following copy
    first (so the link does not idle between copies), ensure returns only once every landing ran, and
    the emulated link still moves one expert at a time."""
    from scheduler.link import EmulatedLink

    events = []

    def load(key, slot):
        events.append(("issue", key))
        return lambda: events.append(("land", key))

    link = EmulatedLink(gbps=EXPERT_BYTES / 0.02 / 1e9)  # 20 ms per expert
    cache = ExpertCache(8, LRU(), load, EXPERT_BYTES, link)
    keys = [(0, e) for e in range(4)]
    try:
        cache.ensure(keys)
        assert sorted(events) == sorted([("issue", k) for k in keys] + [("land", k) for k in keys])
        assert events == [("issue", (0, 0)), ("issue", (0, 1)), ("land", (0, 0)), ("issue", (0, 2)),
                          ("land", (0, 1)), ("issue", (0, 3)), ("land", (0, 2)), ("land", (0, 3))]
        assert cache.stats.stall_s >= 4 * 0.02 * 0.99  # issued early, landed one link-time after another
        assert cache.stats.link_busy_s >= 4 * 0.02 * 0.99
        cache.table.check()
    finally:
        cache.close()


def test_demand_copies_go_deeper_than_prefetches():
    """copies_in_flight=4: a layer's six demand copies are issued four deep before the first lands, while
    prefetches (guesses a demand copy may have to wait behind) stay two deep."""
    from scheduler.link import EmulatedLink

    def run(ask):
        events = []

        def load(key, slot):
            events.append("issue")
            return lambda: events.append("land")

        cache = ExpertCache(16, LRU(), load, EXPERT_BYTES, EmulatedLink(gbps=EXPERT_BYTES / 0.01 / 1e9), copies_in_flight=4)
        try:
            ask(cache)
            deadline = time.monotonic() + 5
            while events.count("land") < 6 and time.monotonic() < deadline:
                time.sleep(0.01)
            cache.table.check()
        finally:
            cache.close()
        in_flight, most = 0, 0
        for event in events:
            in_flight += 1 if event == "issue" else -1
            most = max(most, in_flight)
        return events, most

    events, most = run(lambda cache: cache.ensure([(0, e) for e in range(6)]))
    assert events[:5] == ["issue"] * 4 + ["land"] and most == 4
    events, most = run(lambda cache: cache.prefetch([(1, e) for e in range(6)]))
    assert events.count("issue") == 6 and most == 2
    with pytest.raises(ValueError, match="copies_in_flight 1"):
        ExpertCache(4, LRU(), lambda key, slot: None, EXPERT_BYTES, copies_in_flight=1)
