"""Predictors inside the layer's jitted program (predictors.fused) score exactly as their host forms,
alone and in the engine (where they also must not change a single generated token)."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

import jaxmoe
from predictors.base import GateLookaheadPredictor
from predictors.llapor import LLaPor, LLaPorConfig, LLaPorPredictor, params_of, save

PROMPT = [5, 17, 33, 8, 41, 12, 9, 60, 3, 27, 71, 44, 2, 90, 31, 7, 55, 21]  # 18 tokens in a bucket of 32: padding rows


def run_fused(scorer, params, state, pos, hidden, logits, ids):
    return jax.jit(scorer.__call__)(params, state, np.int32(pos), hidden, logits, ids)


@pytest.mark.parametrize("num_layers,horizon,sigmoid", [(2, 4, False), (3, 1, False), (8, 4, False), (3, 2, True)])
def test_fused_gate_lookahead_equals_host(num_layers, horizon, sigmoid):
    rng = np.random.default_rng(num_layers)
    d, E = 16, 8
    bias = rng.normal(size=(num_layers, E)).astype(np.float32) if sigmoid else None
    host = GateLookaheadPredictor(rng.normal(size=(num_layers, d, E)), rng.normal(size=(num_layers, d)), 1e-6, bias)
    scorer, params = host.to_fused(horizon)
    state = scorer.init_state()
    for pos in range(num_layers):
        hidden = (3 * rng.normal(size=d)).astype(np.float32)
        scores, state = run_fused(scorer, params, state, pos, hidden, np.zeros(E, np.float32), np.zeros(2, np.int32))
        np.testing.assert_allclose(np.asarray(scores), host.predict(pos, hidden, None, horizon), rtol=1e-5, atol=1e-5)


def random_llapor(d, E, L, k, seed=0, **options) -> tuple[LLaPorPredictor, dict]:
    """An untrained LLaPor (random weights, made non-trivial) -> (host predictor, its flat params)."""
    rng = np.random.default_rng(seed)
    cfg = LLaPorConfig(hidden_size=d, num_experts=E, num_moe_layers=L, top_k=k, width=32, depth=2, **options)
    net = LLaPor(cfg, nnx.Rngs(seed), lookahead_kernels=rng.normal(size=(L, d, E)).astype(np.float32))
    params = {name: (v + 0.3 * rng.normal(size=v.shape)).astype(np.float32) for name, v in params_of(net).items()}
    return LLaPorPredictor(cfg, params), params


@pytest.mark.parametrize("options", [dict(use_history=True, use_lookahead=True, use_current=True),
                                     dict(use_history=False, use_lookahead=False, activation="gelu")])
def test_fused_llapor_equals_host_with_history(options):
    d, E, L, k = 12, 8, 3, 2
    host, _ = random_llapor(d, E, L, k, **options)
    rng = np.random.default_rng(1)
    for horizon in (1, 4):
        scorer, params = host.to_fused(horizon)
        state = scorer.init_state()
        host.reset()
        for token in range(3):  # history crosses tokens: wrapped targets read this token's routing
            for pos in range(L):
                hidden, logits = rng.normal(size=d).astype(np.float32), rng.normal(size=E).astype(np.float32)
                ids = rng.choice(E, k, replace=False).astype(np.int32)
                host.observe(pos, ids)
                scores, state = run_fused(scorer, params, state, pos, hidden, logits, ids)
                np.testing.assert_allclose(np.asarray(scores), host.predict(pos, hidden, logits, horizon),
                                           rtol=1e-4, atol=1e-4, err_msg=f"token {token} pos {pos} horizon {horizon}")


def test_llapor_refuses_a_longer_horizon_than_trained():
    host, _ = random_llapor(8, 4, 2, 2, horizon=2)
    with pytest.raises(jaxmoe.JaxmoeError, match="horizon 2"):
        host.to_fused(3)


def observed_run(model_dir, predictor, fuse, policy="presched", cache_slots=4, speculate="auto"):
    """-> (generated ids, [(pos, scores)] of every decode layer) of one offloaded run."""
    engine = jaxmoe.load(model_dir, cache_slots=cache_slots, policy=policy, predictor=predictor, speculate=speculate)
    engine.fuse_predictor = fuse
    seen = []
    engine.layer_observer = lambda pos, decoding, ids, scores: seen.append((pos, scores)) if decoding else None
    result = engine.generate(PROMPT, 10)
    assert result.stats["predictor_fused"] == fuse
    ids = result.generated_ids
    return ids, seen


@pytest.mark.parametrize("predictor,policy", [("gate-lookahead", "presched"), ("llapor", "adaptive")])
def test_engine_fused_and_host_predictors_agree(tmp_path, converted_model, predictor, policy):
    _, model_dir = converted_model("qwen2_moe")
    expected = jaxmoe.load(model_dir).generate(PROMPT, 10).generated_ids
    if predictor == "llapor":  # an untrained LLaPor of the tiny model's shape, through the --predictor PATH route
        cfg = jaxmoe.load(model_dir, cache_slots=4).cfg
        host, params = random_llapor(cfg.hidden_size, cfg.num_experts, len(cfg.moe_layer_ids), cfg.num_experts_per_tok,
                             use_history=True, use_lookahead=True, use_current=True)
        predictor = str(tmp_path / "llapor")
        save(tmp_path / "llapor", host.cfg, params, {"trained_on": {"name": "random"}})
    fused_ids, fused = observed_run(model_dir, predictor, True, policy)
    host_ids, hosted = observed_run(model_dir, predictor, False, policy)
    assert fused_ids == host_ids == expected
    assert len(fused) == len(hosted) > 0
    for (pos_a, a), (pos_b, b) in zip(fused, hosted):
        assert pos_a == pos_b
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("cache_slots", [4, 12])
def test_whole_token_steps_keep_fused_and_host_predictors_agreeing(tmp_path, converted_model, cache_slots):
    """Every decode step as one program (`speculate="on"`), with an LLaPor that keeps routing history: the
    fused predictor updates its history inside the program (up to a miss, 4 slots) and scores the next
    token from its last layer; the host one observes the booked routing. Same scores, same tokens."""
    _, model_dir = converted_model("qwen2_moe")
    expected = jaxmoe.load(model_dir).generate(PROMPT, 10).generated_ids
    cfg = jaxmoe.load(model_dir, cache_slots=4).cfg
    host, params = random_llapor(cfg.hidden_size, cfg.num_experts, len(cfg.moe_layer_ids), cfg.num_experts_per_tok,
                                 use_history=True, use_lookahead=True, use_current=True)
    save(tmp_path / "llapor", host.cfg, params, {"trained_on": {"name": "random"}})
    runs = [observed_run(model_dir, str(tmp_path / "llapor"), fuse, "prefetch", cache_slots, "on") for fuse in (True, False)]
    (fused_ids, fused), (host_ids, hosted) = runs
    assert fused_ids == host_ids == expected
    assert [pos for pos, _ in fused] == [pos for pos, _ in hosted]
    scored = [(a, b) for (_, a), (_, b) in zip(fused, hosted) if a is not None or b is not None]
    assert scored
    for a, b in scored:
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3)


def test_engine_keeps_host_predictor_under_routing_override(converted_model):
    _, model_dir = converted_model("qwen2_moe")
    engine = jaxmoe.load(model_dir, cache_slots=4, policy="presched")
    engine.fuse_predictor = True
    engine.routing_override = lambda layer, positions, ids: ids
    engine.generate(PROMPT, 3)
    assert engine._scorer is None
    engine.routing_override = None
    engine.generate(PROMPT, 3)
    assert dataclasses.is_dataclass(engine._scorer)
    engine.fuse_predictor = None  # auto: on the host on the CPU backend
    assert not engine.generate(PROMPT, 3).stats["predictor_fused"]
