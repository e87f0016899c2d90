"""Scheduling may change speed, never results: fuzzed policies, predictors, cache sizes and transfer
delays all reproduce the resident model's tokens; transfer-thread faults surface in the caller."""

import random
import signal
import threading
import time
import traceback
from contextlib import contextmanager

import numpy as np
import pytest

import jaxmoe
from jaxmoe.offload import POLICIES, OffloadEngine
from scheduler.speculation import FORGET, MAX_REDO, Speculation

PROMPT = [5, 17, 33, 8, 41, 12, 9, 60, 3, 27, 71, 44]


@contextmanager
def time_limit(seconds: int):
    """A hang is a failure: SIGALRM interrupts the test after `seconds`."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"scheduler test exceeded {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class AdversarialPredictor:
    """Scores the experts that will *not* be used highest (or random noise)."""

    name = "adversarial"

    def __init__(self, num_experts: int, seed: int, mode: str):
        self.rng, self.mode, self.num_experts = np.random.default_rng(seed), mode, num_experts

    def reset(self):
        pass

    def predict(self, pos, hidden, router_logits, horizon):
        if self.mode == "random":
            return self.rng.normal(size=(horizon, self.num_experts)).astype(np.float32)
        return np.tile(-np.asarray(router_logits, np.float32), (horizon, 1))  # anti-correlated guess

    def observe(self, pos, expert_ids):
        pass


def with_random_delays(engine: OffloadEngine, seed: int, max_delay_s: float):
    rng = random.Random(seed)
    copy = engine.cache.load

    def delayed(key, slot):
        time.sleep(rng.uniform(0, max_delay_s))
        return copy(key, slot)

    engine.cache.load = delayed


@pytest.fixture(scope="module")
def reference(converted_model):
    refs = {}

    def get(family, quantize_experts=None):
        key = (family, quantize_experts)
        if key not in refs:
            _, model_dir = converted_model(family)
            refs[key] = (model_dir, jaxmoe.load(model_dir, quantize_experts=quantize_experts).generate(PROMPT, 20).generated_ids)
        return refs[key]

    return get


@pytest.mark.parametrize("seed", range(12))
def test_fuzzed_schedules_reproduce_resident_output(seed, reference):
    rng = random.Random(seed)
    family = ["qwen2_moe", "mixtral"][seed % 2] if seed < 10 else "gpt_oss"  # gpt_oss: biased, clamped experts
    quantize = random.Random(seed + 1000).choice([None, None, "int8", "int4"])  # experts as stored, or quantized
    model_dir, expected = reference(family, quantize)
    policy = POLICIES[seed % len(POLICIES)]
    slots = rng.choice([2, 3, 4, 7, 12, 18])
    link = rng.choice([None, f"{rng.uniform(0.005, 0.05):.4f},{rng.randint(0, 300)}"])
    engine = jaxmoe.load(model_dir, cache_slots=slots, policy=policy, quantize_experts=quantize,
                         **({"emulate_link": link} if link else {}))
    if policy in ("prefetch", "presched", "adaptive"):
        choice = rng.choice(["gate-lookahead", "previous-token", "frequency", "adversarial", "random"])
        engine.predictor = (AdversarialPredictor(engine.cfg.num_experts, seed, choice)
                            if choice in ("adversarial", "random") else engine.build_predictor(choice))
        engine.fuse_predictor = rng.random() < 0.5  # gate-lookahead inside the layer's program, or on the host
    engine.speculation = Speculation(rng.choice(["auto", "on", "off"]))  # whole-token decode steps, or not
    with_random_delays(engine, seed, max_delay_s=0.003)
    with time_limit(120):
        result = engine.generate(PROMPT, 20)
    assert result.generated_ids == expected, (policy, slots, link, engine.speculation.mode, quantize)
    assert 0 <= result.stats["prefetch_precision"] <= 1  # prefill's prefetches are not credited to decode
    assert threading.active_count() == 1 or all(t.name != "jaxmoe-expert-transfers" for t in threading.enumerate())


def test_transfer_thread_fault_surfaces_with_traceback(reference):
    model_dir, _ = reference("mixtral")
    engine = jaxmoe.load(model_dir, cache_slots=3, policy="prefetch")
    calls = {"n": 0}
    copy = engine.cache.load

    def failing_copy(key, slot):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated DMA failure")
        return copy(key, slot)

    engine.cache.load = failing_copy
    t0 = time.perf_counter()
    with time_limit(30), pytest.raises(RuntimeError, match="simulated DMA failure") as info:
        engine.generate(PROMPT, 20)
    assert time.perf_counter() - t0 < 10
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "failing_copy" in frames  # the original traceback from the transfer thread
    assert all(t.name != "jaxmoe-expert-transfers" for t in threading.enumerate())


def test_emulated_link_makes_misses_stall(reference):
    model_dir, expected = reference("mixtral")
    slow = jaxmoe.load(model_dir, cache_slots=2, policy="on-demand", emulate_link="0.002,0")  # 2 MB/s
    result = slow.generate(PROMPT, 6)
    expert_s = slow.store.expert_bytes / 2e6
    misses = result.stats["decode_cache"]["misses"]
    assert misses > 0
    assert result.stats["stall_s"] >= 0.9 * misses * expert_s
    assert result.stats["emulated_link"] == "0.002 GB/s + 0 us"
    assert result.generated_ids == expected[:6]


def test_decode_plans_the_next_layer_while_waiting_for_misses(reference):
    """A decoding layer that must wait for transfers queues the next layer's prefetches between queueing
    its own misses and waiting for them (so they start during the wait); an all-hit layer plans after
    its dispatch. Either way the tokens are the resident model's."""
    model_dir, expected = reference("mixtral")
    engine = jaxmoe.load(model_dir, cache_slots=4, policy="presched", emulate_link="0.05,0")
    cache, log = engine.cache, []
    request_slots, wait_for, prefetch = cache.request_slots, cache.wait_for, cache.prefetch

    def logged_request(layers, experts):
        request = request_slots(layers, experts)
        log.append(("request", engine._decoding, request.must_wait))
        return request

    def logged_wait(request):
        log.append(("wait",))
        return wait_for(request)

    def logged_prefetch(keys, protect=()):
        log.append(("prefetch",))
        return prefetch(keys, protect)

    cache.request_slots, cache.wait_for, cache.prefetch = logged_request, logged_wait, logged_prefetch
    with time_limit(60):
        result = engine.generate(PROMPT, 8)
    assert result.generated_ids == expected[:8]
    waiting = [i for i, entry in enumerate(log) if entry[0] == "request" and entry[1] and entry[2]]
    all_hit = [i for i, entry in enumerate(log) if entry[0] == "request" and entry[1] and not entry[2]]
    assert waiting, "the test needs decoding layers that miss"
    for i in waiting:
        assert log[i + 1] == ("prefetch",) and log[i + 2] == ("wait",), log[i : i + 3]
    for i in all_hit:
        assert log[i + 1] == ("wait",)


@pytest.mark.parametrize("policy,speculate,slots,quantize,in_flight", [
    ("on-demand", "auto", 5, None, 2), ("presched", "auto", 5, None, 4), ("presched", "on", 10, None, 2),
    ("on-demand", "on", 10, "int4", 3)])
def test_accelerator_copy_path_reproduces_resident_output(policy, speculate, slots, quantize, in_flight, reference):
    """The accelerator's copy path (device_put issued, the next copy issued while it flies, the slot
    written once it has landed), forced on the CPU backend with random delays: the same tokens, also when
    every decode step runs as one program over the slots that had landed when it started, with quantized
    experts (their bytes copied, then written into codes and scales), and with demand copies issued deeper."""
    model_dir, expected = reference("qwen2_moe", quantize)
    engine = jaxmoe.load(model_dir, cache_slots=slots, policy=policy, emulate_link="0.02,50", speculate=speculate,
                         quantize_experts=quantize)
    engine.copy_inside_write = False
    engine.copies_in_flight = in_flight  # demand copies issued this deep
    with_random_delays(engine, seed=7, max_delay_s=0.003)
    with time_limit(120):
        result = engine.generate(PROMPT, 20)
    assert result.generated_ids == expected
    assert result.stats["decode_cache"]["misses"] > 0
    if speculate == "on":  # 10 of 12 experts: most steps find theirs landed (16 of 19 measured)
        assert result.stats["speculation_redone"] < result.stats["speculated_tokens"] == len(expected) - 1


def test_speculation_cost_rule():
    """auto: the layer path until a token was seen; each mode's all-cached period measured MIN_SAMPLES times
    while few tokens would be redone; then the mode whose modelled period a + b q is lower (b measured from
    tokens with misses, q per mode, drifting to the other mode's measurements); a first compile only for
    enough tokens left to repay it; compiling tokens time no mode."""
    rule = Speculation("auto")
    assert not rule.should_speculate()  # nothing measured
    rule.record(False, 0.0, 0.510, compiled=True)  # the layer path's first step: its startup
    assert rule.samples[False] == 0 and rule.startup_s() == 0.510
    rule.record(False, 0.0, 0.010)
    assert rule.startup_s() == pytest.approx(0.5)
    assert rule.should_speculate(tokens_left=None, compiled=True)  # q = 0: try the whole-token program
    assert rule.should_speculate(tokens_left=101, compiled=False)  # 101 * (0.010 - 0.005) > 0.5
    assert not rule.should_speculate(tokens_left=100, compiled=False)
    rule.record(False, 0.5, 0.015)  # a layer-path token with misses from half way: b_layer = 0.01
    assert rule.per_redo_s[False] == pytest.approx(0.010)
    assert rule.redo_fraction[False] == pytest.approx(0.1) and rule.redo_fraction[True] == pytest.approx(FORGET * 0.5)
    rule.record(True, 0.0, 0.304, compiled=True)
    assert rule.startup_s() == pytest.approx(0.304)  # its own startup from now on
    rule.record(True, 0.0, 0.004)
    rule.record(True, 0.0, 0.004)
    assert rule.samples[True] == 2 and rule.startup_s() == pytest.approx(0.3)
    assert not rule.should_speculate()  # one all-cached layer-path sample so far: measure another
    rule.record(False, 0.0, 0.010)
    q_spec, q_layer = rule.redo_fraction[True], rule.redo_fraction[False]
    assert rule.period_s(True, q_spec) == pytest.approx(0.004 + 0.020 * q_spec)  # b_spec not measured: a + b of the layer path
    assert rule.period_s(False, q_layer) == pytest.approx(0.010 + 0.010 * q_layer)
    assert rule.should_speculate()
    assert not rule.should_speculate(tokens_left=40, compiled=False)  # 40 * ~0.006 does not repay 0.3 s
    rule.record(True, 0.25, 0.014)  # a redone token: b_spec = 0.04
    assert rule.per_redo_s[True] == pytest.approx(0.04)
    for _ in range(3):
        rule.record(True, 0.4, 0.020)  # speculating tokens now miss early: q_spec ~0.26
    assert 0.2 < rule.redo_fraction[True] < MAX_REDO and not rule.should_speculate()  # 0.004 + 0.04 q_spec > 0.010 + 0.01 q_layer
    for _ in range(10):
        rule.record(False, 0.0, 0.010)  # the layer path sees no misses: q_spec drifts down until speculation pays again
        if rule.should_speculate():
            break
    assert rule.should_speculate() and rule.redo_fraction[True] < 0.2
    for _ in range(8):
        rule.record(True, 0.9, 0.030)
    assert rule.redo_fraction[True] >= MAX_REDO and not rule.should_speculate()  # most tokens would fall back early
    assert Speculation("on").should_speculate(1, False) and not Speculation("off").should_speculate()
    with pytest.raises(ValueError, match="always"):
        Speculation("always")
