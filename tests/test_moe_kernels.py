"""The fast routed-expert kernels against the naive per-expert loop, and routing rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe.moe import (
    ExpertFFN, experts_bucketed, experts_capacity, experts_gather, experts_grouped, experts_reference, plan_buckets,
)
from jaxmoe.routing import RouterSpec, select_experts


def random_problem(n, k=3, slots=7, d=16, f=24, seed=0):
    keys = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(keys[0], (n, d))
    logits = jax.random.normal(keys[1], (n, slots))
    ids = jax.lax.top_k(logits, k)[1].astype(jnp.int32)
    weights = jax.nn.softmax(jax.random.normal(keys[2], (n, k)))
    w_gate = 0.2 * jax.random.normal(keys[3], (slots, d, f))
    w_up = 0.2 * jax.random.normal(keys[4], (slots, d, f))
    w_down = 0.2 * jax.random.normal(keys[5], (slots, f, d))
    return x, ids, weights, w_gate, w_up, w_down


@pytest.mark.parametrize("kernel", [experts_gather, experts_grouped])
@pytest.mark.parametrize("n", [1, 5, 64])
def test_kernel_matches_reference(kernel, n):
    args = random_problem(n, seed=n)
    ref = experts_reference(*args)
    np.testing.assert_allclose(np.asarray(jax.jit(kernel)(*args)), np.asarray(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 9, 64])
def test_bucketed_matches_reference_with_host_plan(n):
    x, ids, weights, *w = random_problem(n, k=3, slots=40, seed=n)
    ids = np.asarray(ids).copy()
    ids[::3, 1] = -1  # skipped pairs (expert outside this group) contribute nothing
    groups, rows = plan_buckets(ids)
    used = ids[ids >= 0]
    assert groups >= len(np.unique(used)) and rows >= np.bincount(used).max() and rows >= 8
    kernel = jax.jit(experts_bucketed, static_argnames=("num_groups", "rows_per_group"))
    ref = experts_reference(x, jnp.maximum(ids, 0), jnp.where(ids >= 0, weights, 0), *w)
    np.testing.assert_allclose(np.asarray(kernel(x, ids, weights, *w, num_groups=groups, rows_per_group=rows)),
                               np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_bucketed_one_hot_slot_and_tight_rows():
    x, _, weights, *w = random_problem(20, k=2, slots=5)
    ids = np.stack([np.full(20, 3), np.arange(20) % 2], axis=1).astype(np.int32)  # slot 3 in every token
    groups, rows = plan_buckets(ids)
    assert (groups, rows) == (4, 32)
    np.testing.assert_allclose(np.asarray(experts_bucketed(x, ids, weights, *w, groups, rows)),
                               np.asarray(experts_reference(x, ids, weights, *w)), atol=1e-5)


def test_grouped_handles_unused_slots():
    x, ids, weights, *w = random_problem(9, k=2, slots=7)
    ids = jnp.minimum(ids, 2)  # only slots 0..2 used, the rest have empty groups
    ids = ids.at[:, 1].set(jnp.where(ids[:, 0] == ids[:, 1], (ids[:, 0] + 1) % 3, ids[:, 1]))
    np.testing.assert_allclose(np.asarray(experts_grouped(x, ids, weights, *w)),
                               np.asarray(experts_reference(x, ids, weights, *w)), atol=1e-5)


GPT_OSS = ExpertFFN("gpt_oss", alpha=1.702, limit=0.5)  # a low clamp: both clamps bite at this scale


def biases(slots=7, d=16, f=24, seed=9):
    k = jax.random.split(jax.random.key(seed), 3)
    return (0.3 * jax.random.normal(k[0], (slots, f)), 0.3 * jax.random.normal(k[1], (slots, f)),
            0.3 * jax.random.normal(k[2], (slots, d)))


def test_gpt_oss_reference_is_the_clamped_biased_swiglu():
    x, ids, weights, wg, wu, wd = random_problem(6, k=2, slots=7)
    bias = biases()
    x, wg, wu, wd, weights = (np.asarray(a, np.float64) for a in (x, wg, wu, wd, weights))
    bg, bu, bd = (np.asarray(b, np.float64) for b in bias)
    want = np.zeros_like(x)
    for n in range(6):
        for j, e in enumerate(np.asarray(ids)[n]):
            gate = np.minimum(x[n] @ wg[e] + bg[e], 0.5)
            up = np.clip(x[n] @ wu[e] + bu[e], -0.5, 0.5)
            assert (x[n] @ wg[e] + bg[e]).max() > 0.5 and np.abs(x[n] @ wu[e] + bu[e]).max() > 0.5
            want[n] += weights[n, j] * ((gate / (1 + np.exp(-1.702 * gate)) * (up + 1)) @ wd[e] + bd[e])
    got = experts_reference(*(jnp.asarray(a, jnp.float32) for a in (x,)), ids, jnp.asarray(weights, jnp.float32),
                            *(jnp.asarray(a, jnp.float32) for a in (wg, wu, wd)), ffn=GPT_OSS, bias=bias)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


@pytest.mark.parametrize("n", [1, 5, 40])
def test_every_kernel_matches_reference_with_gpt_oss_experts(n):
    x, ids, weights, *w = random_problem(n, k=3, slots=7, seed=n)
    bias = biases()
    ref = np.asarray(experts_reference(x, ids, weights, *w, ffn=GPT_OSS, bias=bias))
    assert np.abs(ref - np.asarray(experts_reference(x, ids, weights, *w))).max() > 0.1  # the FFN matters
    for kernel in (experts_gather, experts_grouped):
        got = jax.jit(kernel, static_argnames=("ffn",))(x, ids, weights, *w, ffn=GPT_OSS, bias=bias)
        np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5, rtol=1e-5)
    groups, rows = plan_buckets(np.asarray(ids))
    got = experts_bucketed(x, ids, weights, *w, groups, rows, ffn=GPT_OSS, bias=bias)
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5, rtol=1e-5)
    got = experts_capacity(x, ids, weights, *w, capacity_factor=7.0, ffn=GPT_OSS, bias=bias)  # nothing dropped
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5, rtol=1e-5)


def test_group_limited_routing_only_picks_top_groups():
    logits = jnp.array([[5.0, 4.0, 0.0, 0.1, 3.0, 2.9, -1.0, -2.0]])
    spec = RouterSpec(top_k=3, scoring="softmax", norm_topk_prob=False, n_group=4, topk_group=2, group_score="max")
    ids, _ = select_experts(logits, spec)
    assert sorted(np.asarray(ids)[0].tolist()) == [0, 1, 4]  # best two groups: {0,1} and {4,5}


def test_selection_bias_changes_choice_not_weight():
    logits = jnp.array([[1.0, 0.5, 0.0, -0.5]])
    spec = RouterSpec(top_k=1, scoring="sigmoid", norm_topk_prob=False)
    bias = jnp.array([0.0, 0.0, 2.0, 0.0])
    ids, weights = select_experts(logits, spec, bias)
    assert int(ids[0, 0]) == 2
    np.testing.assert_allclose(float(weights[0, 0]), float(jax.nn.sigmoid(0.0)), rtol=1e-6)
