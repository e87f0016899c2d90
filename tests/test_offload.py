"""The offloaded engine reproduces the resident one exactly, for every cache size and policy, without
recompiling; its stats, flag errors and host memory placement."""

import numpy as np
import pytest

import jaxmoe
import jaxmoe.engine
import jaxmoe.offload
from jaxmoe.engine import bucket_length

PROMPT = [5, 17, 33, 8, 41, 12, 9, 60, 3, 27, 71, 44]  # 12 tokens: bucket 16 > 8, the grouped kernel
PROMPT2 = [88, 14, 6, 52, 30, 19, 77, 23, 65, 10]  # a different prompt in the same buckets
NEW_TOKENS = 16
FAMILIES = ["qwen2_moe", "mixtral"]
CACHE_SIZES = [2, 3, 7, 18]  # from top-k to every expert (qwen2_moe has 12 routed experts: 18 -> 12)
POLICIES = ["on-demand", "lfu"]


def run_prefill(engine, prompt):
    """engine.start + engine.prefill on the right-padded prompt -> float32 logits [1, V] (numpy)."""
    n = len(prompt)
    tokens = np.zeros((1, bucket_length(n)), np.int32)
    tokens[0, :n] = prompt
    engine.start(bucket_length(tokens.shape[1] + NEW_TOKENS))
    return np.asarray(engine.prefill(tokens, n))


def total_experts(cfg):
    return cfg.num_experts * len(cfg.moe_layer_ids)


@pytest.fixture(scope="module")
def resident(converted_model):
    """resident(family) -> (model_dir, greedy ids, prefill logits) of the ResidentEngine."""
    made = {}

    def get(family):
        if family not in made:
            _, model_dir = converted_model(family)
            engine = jaxmoe.load(model_dir)
            logits = run_prefill(engine, PROMPT)
            made[family] = (model_dir, engine.generate(PROMPT, NEW_TOKENS).generated_ids, logits)
        return made[family]

    return get


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("slots", CACHE_SIZES)
@pytest.mark.parametrize("family", FAMILIES)
def test_offloaded_equals_resident(family, slots, policy, resident):
    model_dir, expected_ids, expected_logits = resident(family)
    assert len(expected_ids) >= NEW_TOKENS  # no early EOS: every step is compared
    engine = jaxmoe.load(model_dir, cache_slots=slots, policy=policy)
    cfg = engine.cfg
    assert engine.num_slots == min(slots, total_experts(cfg))

    logits = run_prefill(engine, PROMPT)
    scale = np.abs(expected_logits).max()
    assert np.abs(logits - expected_logits).max() <= 1e-5 * scale
    if slots < cfg.num_experts:  # the prompt needs more experts per layer than there are slots: groups
        assert len(engine._requests) > len(cfg.moe_layer_ids)

    result = engine.generate(PROMPT, NEW_TOKENS)
    assert result.generated_ids == expected_ids, (family, slots, policy)
    assert result.stats["cache_slots"] == min(slots, total_experts(cfg))
    assert result.stats["policy"] == policy
    assert 0.0 <= result.stats["hit_rate"] <= 1.0


JITTED = {
    "moe_front": jaxmoe.offload.moe_front,
    "routed_over_slots": jaxmoe.offload.routed_over_slots,
    "moe_back": jaxmoe.offload.moe_back,
    "moe_back_front": jaxmoe.offload.moe_back_front,
    "write_slot": jaxmoe.offload.write_slot,
    "write_slot_from_host": jaxmoe.offload.write_slot_from_host,
    "dense_layer": jaxmoe.offload.dense_layer,
    "decode_token_over_slots": jaxmoe.offload.decode_token_over_slots,
    "embed_tokens": jaxmoe.offload.embed_tokens,
    "final_logits": jaxmoe.offload.final_logits,
    "decode_step": jaxmoe.engine.decode_step,
    "prefill_step": jaxmoe.engine.prefill_step,
}


@pytest.mark.parametrize("family", FAMILIES)
def test_no_recompiles_after_warmup(family, resident):
    model_dir, _, _ = resident(family)
    engines = [jaxmoe.load(model_dir), jaxmoe.load(model_dir, cache_slots=3, policy="on-demand"),
               jaxmoe.load(model_dir, cache_slots=3, policy="lfu"),
               jaxmoe.load(model_dir, cache_slots=7, policy="on-demand", speculate="on")]
    for engine in engines:
        engine.generate(PROMPT, NEW_TOKENS)  # warm-up: compiles prefill and decode shapes
    before = {name: fn._cache_size() for name, fn in JITTED.items()}
    for engine in engines:
        engine.generate(PROMPT2, NEW_TOKENS)  # other tokens, routing, evictions, length; same buckets
    after = {name: fn._cache_size() for name, fn in JITTED.items()}
    assert after == before


def test_stats_with_every_expert_cached(resident):
    model_dir, _, _ = resident("mixtral")
    engine = jaxmoe.load(model_dir, cache_slots=18)
    keys = {(layer, e) for layer in engine.cfg.moe_layer_ids for e in range(engine.cfg.num_experts)}
    first = engine.generate(PROMPT2, 4).stats
    seen = engine.cache.resident_keys()  # every expert routed to so far: loaded once, never evicted
    assert first["cache"]["misses"] == len(seen)
    assert first["cache"]["h2d_bytes"] == len(seen) * engine.store.expert_bytes
    assert first["prefill_h2d_bytes"] + first["h2d_bytes"] == first["cache"]["h2d_bytes"]
    for layer in engine.cfg.moe_layer_ids:  # load the experts no prompt routed to yet
        engine.cache.ensure([(layer, e) for e in range(engine.cfg.num_experts)])
    assert engine.cache.resident_keys() == keys
    assert engine.cache.stats.misses == len(keys)

    stats = engine.generate(PROMPT, NEW_TOKENS).stats  # warm: everything resident
    assert stats["hit_rate"] == 1.0
    assert stats["h2d_bytes"] == 0
    assert stats["decode_cache"]["misses"] == 0
    assert stats["decode_cache"]["hits"] == (stats["generated_tokens"] - 1) * 3 * 2  # 3 MoE layers, top-2
    assert stats["prefill_h2d_bytes"] == 0 and stats["prefill_hit_rate"] == 1.0  # this call's prefill only
    assert stats["cache"]["misses"] == len(keys)  # nothing loaded twice
    assert stats["cache_slots"] == 18


@pytest.mark.parametrize("policy", POLICIES)
def test_stats_with_minimum_cache(policy, resident):
    model_dir, _, _ = resident("mixtral")
    engine = jaxmoe.load(model_dir, cache_slots=2, policy=policy)
    stats = engine.generate(PROMPT, NEW_TOKENS).stats
    assert stats["cache_slots"] == 2 and stats["policy"] == policy
    # two slots hold only the previous MoE layer's two experts: every decode request misses
    decode_requests = (stats["generated_tokens"] - 1) * len(engine.cfg.moe_layer_ids) * 2
    assert stats["hit_rate"] == 0.0
    assert stats["decode_cache"]["misses"] == decode_requests
    assert stats["h2d_bytes"] == decode_requests * engine.store.expert_bytes > 0
    assert stats["stall_s"] > 0
    assert stats["prefill_h2d_bytes"] > 0
    for key in ("decode_tokens_per_s", "prefill_tokens_per_s", "ttft_s", "peak_device_bytes"):
        assert stats[key] > 0
    # host CPU: the decode loop's thread busy for part of the decode's wall time; the transfer thread's
    # time issuing the copies counted in the decode window
    assert 0 < stats["decode_main_cpu_s"] <= stats["decode_s"] * 1.05 + 0.01
    assert stats["decode_cache"]["transfer_cpu_s"] > 0
    assert stats["cache"]["transfer_cpu_s"] >= stats["decode_cache"]["transfer_cpu_s"]


def test_flag_errors(resident):
    model_dir, _, _ = resident("mixtral")
    with pytest.raises(jaxmoe.JaxmoeError, match="--cache-slots 1") as info:
        jaxmoe.load(model_dir, cache_slots=1)
    assert "top-k" in str(info.value)
    with pytest.raises(jaxmoe.JaxmoeError, match="--expert-cache-gb"):
        jaxmoe.load(model_dir, expert_cache_gb=1e-7)
    with pytest.raises(jaxmoe.JaxmoeError, match="--policy 'bogus'") as info:
        jaxmoe.load(model_dir, cache_slots=4, policy="bogus")
    for name in ("on-demand", "lfu", "resident"):
        assert name in str(info.value)
    with pytest.raises(jaxmoe.JaxmoeError, match="--speculate 'always'"):
        jaxmoe.load(model_dir, cache_slots=4, speculate="always")


def test_experts_live_in_pinned_host_memory(resident):
    model_dir, _, _ = resident("qwen2_moe")
    engine = jaxmoe.load(model_dir, cache_slots=3)
    store = engine.store
    assert store.memory_kind == "pinned_host"
    assert len(store.experts) == total_experts(engine.cfg)
    d, f = engine.cfg.hidden_size, engine.cfg.moe_intermediate_size
    for packed in store.experts.values():  # one packed array per expert
        assert packed.sharding.memory_kind == "pinned_host" and packed.shape == (3 * d * f,)
    for a in engine.slots.values():  # the slot buffers are device memory
        assert a.sharding.memory_kind != "pinned_host" and a.shape[0] == 3
    assert engine.generate(PROMPT, 2).stats["host_memory_kind"] == "pinned_host"


def test_output_is_bitwise_independent_of_slot_assignment(resident):
    """Which slot holds which expert depends on timing; the numbers must not. Two engines whose caches
    hold the same experts in opposite slot orders give bit-identical prefill logits (the bucketed prefill
    kernel groups token-expert pairs by slot) and the same tokens."""
    model_dir, expected_ids, _ = resident("deepseek_v2")  # top-3: the sum of three is order-dependent
    runs = []
    for order in (1, -1):
        engine = jaxmoe.load(model_dir, cache_slots=10**6)  # every expert
        for layer in engine.cfg.moe_layer_ids:
            experts = list(range(engine.cfg.num_experts))[::order]
            engine.cache.ensure([(layer, e) for e in experts])
        assert engine.cache.stats.misses == total_experts(engine.cfg)
        runs.append((run_prefill(engine, PROMPT), engine.generate(PROMPT, NEW_TOKENS).generated_ids,
                     [engine.cache.table.lookup((engine.cfg.moe_layer_ids[0], e)) for e in range(3)]))
    (logits_a, ids_a, slots_a), (logits_b, ids_b, slots_b) = runs
    assert slots_a != slots_b  # the experts really sit in different slots
    np.testing.assert_array_equal(logits_a, logits_b)
    assert ids_a == ids_b == expected_ids


@pytest.mark.parametrize("family,slots", [(f, n) for f in FAMILIES for n in (2, 7, 18)] + [("deepseek_v2", 7)])
def test_whole_token_decode_equals_resident(family, slots, resident):
    """Every decode step as one program over the slots (`speculate="on"`): the resident model's tokens
    whether the step finds all its experts (18: every expert, after a first run), misses from its first
    MoE layer on (2 slots: the previous layer's two experts only) or somewhere in between."""
    model_dir, expected_ids, _ = resident(family)
    engine = jaxmoe.load(model_dir, cache_slots=slots, speculate="on")
    first = engine.generate(PROMPT, NEW_TOKENS)
    second = engine.generate(PROMPT, NEW_TOKENS)
    assert first.generated_ids == second.generated_ids == expected_ids, (family, slots)
    for stats in (first.stats, second.stats):
        assert stats["speculated_tokens"] == NEW_TOKENS - 1
        assert stats["decode_cache"]["hits"] + stats["decode_cache"]["misses"] >= (NEW_TOKENS - 1) * len(engine.cfg.moe_layer_ids)
    if slots >= total_experts(engine.cfg):  # warm: every step runs whole, nothing loaded
        assert second.stats["speculation_redone"] == 0 and second.stats["h2d_bytes"] == 0
        assert second.stats["hit_rate"] == 1.0
    if slots == 2:  # top-2: the first MoE layer's experts were evicted by the last one's: every step redone
        assert second.stats["speculation_redone"] == NEW_TOKENS - 1
    assert jaxmoe.load(model_dir, cache_slots=slots, speculate="off").generate(PROMPT, NEW_TOKENS).stats["speculated_tokens"] == 0


def test_whole_token_decode_books_what_the_layer_path_books(resident):
    """With every expert resident, a whole-token step records the same hits, per-layer hits and eviction
    stamps order as the layer path: stats do not depend on how a step was run."""
    model_dir, _, _ = resident("mixtral")
    runs = {}
    for mode in ("on", "off"):
        engine = jaxmoe.load(model_dir, cache_slots=18, speculate=mode)
        engine.generate(PROMPT2, 4)
        for layer in engine.cfg.moe_layer_ids:
            engine.cache.ensure([(layer, e) for e in range(engine.cfg.num_experts)])
        stats = engine.generate(PROMPT, NEW_TOKENS).stats
        assert stats["speculated_tokens"] == (NEW_TOKENS - 1 if mode == "on" else 0)
        runs[mode] = (stats["cache"], [r[1].tolist() for r in engine._requests], engine.cache.policy._stamp.copy())
    (cache_on, requests_on, stamps_on), (cache_off, requests_off, stamps_off) = runs["on"], runs["off"]
    for key in ("hits", "misses", "late_hits", "h2d_bytes", "hits_per_layer"):
        assert cache_on[key] == cache_off[key], key
    assert requests_on == requests_off
    np.testing.assert_array_equal(stamps_on, stamps_off)
