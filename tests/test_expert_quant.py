"""Int8 routed experts: the quantizer's error bound, the packed copy's round trip into the slot buffers,
offloaded == resident for a quantized model (every cache size, both decode paths), and a quantized model
close to the unquantized one."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxmoe
from jaxmoe.expert_quant import Int8Stack, dequantize_int8, quantize_int8, weight_row
from jaxmoe.offload import EXPERT_NAMES, empty_slots, pack_expert, write_slot
from tests.test_offload import NEW_TOKENS, PROMPT, run_prefill, total_experts


def test_quantize_int8_error_is_at_most_half_a_step_per_output_channel():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 24, 10)).astype(np.float32) * rng.uniform(0.01, 5.0, size=(3, 1, 10)).astype(np.float32)
    w[1, :, 4] = 0.0  # an all-zero column
    codes, scale = quantize_int8(w)
    assert codes.dtype == np.int8 and codes.shape == w.shape and scale.shape == (3, 10)
    assert np.abs(codes.astype(int)).max() == 127  # each column's largest entry uses the full range
    assert (codes >= -127).all()
    back = dequantize_int8(codes, scale, np.float32)
    assert (np.abs(back - w) <= scale[:, None, :] / 2 * (1 + 1e-6)).all()
    assert (back[1, :, 4] == 0).all() and scale[1, 4] == 1.0
    # scales are per output column: a column 1000x larger leaves the others' error unchanged
    w2 = w.copy()
    w2[0, :, 0] *= 1000
    np.testing.assert_array_equal(quantize_int8(w2)[1][0, 1:], scale[0, 1:])


def test_packed_int8_expert_round_trips_into_the_slot_buffers():
    rng = np.random.default_rng(1)
    d, f = 16, 12
    shapes = {"w_gate": (d, f), "w_up": (d, f), "w_down": (f, d)}
    expert = {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}
    packed = pack_expert(expert, jnp.bfloat16, "int8")
    assert packed.dtype == np.uint8 and packed.nbytes == 3 * d * f + 4 * (f + f + d)
    slots = empty_slots({n: (s, jnp.bfloat16) for n, s in shapes.items()}, 6, "int8")
    assert all(isinstance(slots[n], Int8Stack) for n in EXPERT_NAMES)
    out = jax.block_until_ready(write_slot(slots, 3, jnp.asarray(packed)))
    for n in EXPERT_NAMES:
        expected = dequantize_int8(*quantize_int8(expert[n]), ml_dtypes.bfloat16)
        got = out[n][3]
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got), expected)
        np.testing.assert_array_equal(np.asarray(weight_row(out[n], jnp.int32(3))), expected)
        assert not np.asarray(out[n][jnp.array([0, 5])]).any()  # other slots untouched
        codes = np.asarray(out[n].codes[3])
        assert np.abs(codes.astype(np.float32) * np.asarray(out[n].scale[3]) - expert[n]).max() > 0  # really int8


@pytest.fixture(scope="module")
def quantized(converted_model):
    """(model_dir, greedy ids, prefill logits) of the int8 resident engine on the qwen2_moe model."""
    _, model_dir = converted_model("qwen2_moe")
    engine = jaxmoe.load(model_dir, quantize_experts="int8")
    logits = run_prefill(engine, PROMPT)
    return model_dir, engine.generate(PROMPT, NEW_TOKENS), logits


@pytest.mark.parametrize("slots,speculate", [(2, "off"), (7, "off"), (7, "on"), (18, "on")])
def test_offloaded_int8_equals_resident_int8(slots, speculate, quantized):
    model_dir, expected, expected_logits = quantized
    engine = jaxmoe.load(model_dir, cache_slots=slots, quantize_experts="int8", speculate=speculate)
    logits = run_prefill(engine, PROMPT)
    assert np.abs(logits - expected_logits).max() <= 1e-5 * np.abs(expected_logits).max()
    result = engine.generate(PROMPT, NEW_TOKENS)
    assert result.generated_ids == expected.generated_ids
    cfg = engine.cfg
    d, f = cfg.hidden_size, cfg.moe_intermediate_size
    assert result.stats["expert_bytes"] == 3 * d * f + 4 * (2 * f + d)
    assert result.stats["quantize_experts"] == "int8" and expected.stats["quantize_experts"] == "int8"
    if slots < total_experts(cfg):
        assert result.stats["h2d_bytes"] % result.stats["expert_bytes"] == 0 and result.stats["h2d_bytes"] > 0
    if speculate == "on" and slots >= total_experts(cfg):
        assert result.stats["speculated_tokens"] > 0


def test_int8_model_stays_close_to_the_unquantized_model(quantized):
    model_dir, _, int8_logits = quantized
    logits = run_prefill(jaxmoe.load(model_dir), PROMPT)
    p, q = jax.nn.log_softmax(logits[0]), jax.nn.log_softmax(int8_logits[0])
    kl = float(jnp.sum(jnp.exp(p) * (p - q)))
    assert 0 < kl < 1e-3  # different (quantized), but only by the quantization error
    assert logits.argmax() == int8_logits.argmax()


def test_int8_halves_the_expert_bytes_and_the_cache_it_buys(converted_model):
    _, model_dir = converted_model("qwen2_moe")
    native = jaxmoe.load(model_dir, cache_slots=2)
    int8 = jaxmoe.load(model_dir, expert_cache_gb=2 * native.store.expert_bytes / 1e9, quantize_experts="int8")
    d, f = native.cfg.hidden_size, native.cfg.moe_intermediate_size
    assert native.store.expert_bytes == 3 * d * f * jnp.dtype(native.cfg.dtype).itemsize
    assert int8.store.expert_bytes == 3 * d * f + 4 * (2 * f + d)
    assert int8.num_slots == min(total_experts(int8.cfg), 2 * native.store.expert_bytes // int8.store.expert_bytes) > 2


def test_unknown_quantization_is_a_clear_error(converted_model):
    _, model_dir = converted_model("qwen2_moe")
    for options in ({}, {"cache_slots": 4}):
        with pytest.raises(jaxmoe.JaxmoeError, match="--quantize-experts 'int3'"):
            jaxmoe.load(model_dir, quantize_experts="int3", **options)
