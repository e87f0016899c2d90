"""Quantized routed experts (int8, int4): the quantizers' error bounds, the packed copy's round trip into
the slot buffers, offloaded == resident for a quantized model (several cache sizes, both decode paths), and
a quantized model close to the unquantized one."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxmoe
from jaxmoe.expert_quant import (
    QuantizedStack, check_quantize, dequantize, int4_group, quantize, quantized_shapes, scale_dtype, weight_row,
)
from jaxmoe.offload import empty_slots, pack_expert, write_slot
from tests.test_offload import NEW_TOKENS, PROMPT, run_prefill, total_experts


def test_quantize_int8_error_is_at_most_half_a_step_per_output_channel():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 24, 10)).astype(np.float32) * rng.uniform(0.01, 5.0, size=(3, 1, 10)).astype(np.float32)
    w[1, :, 4] = 0.0  # an all-zero column
    codes, scale = quantize(w, "int8")
    assert codes.dtype == np.int8 and codes.shape == w.shape and scale.shape == (3, 10)
    assert np.abs(codes.astype(int)).max() == 127  # each column's largest entry uses the full range
    assert (codes >= -127).all()
    back = dequantize(codes, scale, np.float32, "int8")
    assert (np.abs(back - w) <= scale[:, None, :] / 2 * (1 + 1e-6)).all()
    assert (back[1, :, 4] == 0).all() and scale[1, 4] == 1.0
    # scales are per output column: a column 1000x larger leaves the others' error unchanged
    w2 = w.copy()
    w2[0, :, 0] *= 1000
    np.testing.assert_array_equal(quantize(w2, "int8")[1][0, 1:], scale[0, 1:])


def test_quantize_int4_packs_two_codes_per_byte_with_a_scale_per_group_of_rows():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(2, 128, 6)).astype(np.float32)
    w[0, 64:, 3] *= 100  # one group of one column much larger: only that group's scale grows
    codes, scale = quantize(w, "int4")
    assert codes.dtype == np.uint8 and codes.shape == (2, 64, 6) and scale.shape == (2, 2, 6)
    assert ((codes & 15) >= 1).all() and ((codes >> 4) >= 1).all()  # codes + 8 in [1, 15]: symmetric [-7, 7]
    back = dequantize(codes, scale, np.float32, "int4")
    step = np.repeat(scale, 64, axis=-2)  # each row's scale
    assert back.shape == w.shape and (np.abs(back - w) <= step / 2 * (1 + 1e-6)).all()
    assert scale[0, 1, 3] > 50 * scale[0, 0, 3]
    # row 2i is byte i's low nibble, row 2i+1 its high nibble
    np.testing.assert_array_equal((codes[..., 0, :] & 15).astype(int) - 8, np.rint(back[..., 0, :] / scale[..., 0, :]))
    np.testing.assert_array_equal((codes[..., 0, :] >> 4).astype(int) - 8, np.rint(back[..., 1, :] / scale[..., 0, :]))
    assert int4_group(1408) == 64 and int4_group(48) == 16 and int4_group(2) == 2
    with pytest.raises(ValueError, match="even"):
        int4_group(7)


def test_mxfp4_is_lossless_on_mxfp4_values_and_bounded_otherwise():
    """Weights that are MXFP4 values (dequantized as transformers does for GPT-OSS, groups of 32 input rows)
    quantize back to exactly themselves; other weights stay within 2 * 2**e of themselves (e: their group's
    exponent; FP4 steps are 0.5 to 2)."""
    from convert.mxfp4 import dequantize_mxfp4

    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, (3, 24, 2, 16), dtype=np.uint8)  # [E, out, in / 32, 16]: 3 experts [64, 24]
    scales = rng.integers(118, 130, (3, 24, 2), dtype=np.uint8)
    scales[0, 0, 0] = 1  # a tiny group, and a group of zero codes
    blocks[1, 2, 1] = 0
    w = dequantize_mxfp4(blocks, scales)  # bf16 [3, 64, 24]: [E, in, out]
    codes, scale = quantize(w, "mxfp4")
    assert codes.shape == (3, 32, 24) and codes.dtype == np.uint8 and scale.shape == (3, 2, 24) and scale.dtype == np.uint8
    np.testing.assert_array_equal(dequantize(codes, scale, ml_dtypes.bfloat16, "mxfp4").astype(np.float32),
                                  w.astype(np.float32))
    # on the device too (expert 0's tiny group aside: XLA flushes float32 subnormals to zero)
    np.testing.assert_array_equal(np.asarray(dequantize(jnp.asarray(codes[1:]), jnp.asarray(scale[1:]), jnp.bfloat16,
                                                        "mxfp4", jnp)), w[1:])
    x = rng.normal(size=(64, 24)).astype(np.float32)
    codes, scale = quantize(x, "mxfp4")
    back = dequantize(codes, scale, np.float32, "mxfp4")
    step = np.repeat(np.ldexp(1.0, scale.astype(np.int32) - 127), 32, axis=0)  # 2**e; clipping [6, 8) to 6 costs < 2
    assert np.all(np.abs(back - x) <= 2 * step) and np.abs(back - x).max() > 0
    assert np.all(np.abs(x).reshape(2, 32, 24).max(1) / np.ldexp(1.0, scale.astype(np.int32) - 127) < 8)
    with pytest.raises(Exception, match="multiples of 32"):
        check_quantize("mxfp4", 64, 48)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("mode", ["int8", "int4", "mxfp4"])
def test_packed_expert_round_trips_into_the_slot_buffers(mode, bias):
    rng = np.random.default_rng(1)
    d, f = (64, 32) if mode == "mxfp4" else (16, 12)
    shapes = {"w_gate": (d, f), "w_up": (d, f), "w_down": (f, d)}
    biases = {"b_gate": (f,), "b_up": (f,), "b_down": (d,)} if bias else {}
    expert = {n: rng.normal(size=s).astype(np.float32) for n, s in {**shapes, **biases}.items()}
    packed = pack_expert(expert, jnp.bfloat16, mode)
    scale_bytes = np.dtype(scale_dtype(mode)).itemsize
    expected_bytes = sum(np.prod(quantized_shapes(s, mode)[0][0]) + scale_bytes * np.prod(quantized_shapes(s, mode)[1])
                         for s in shapes.values()) + 2 * sum(np.prod(s) for s in biases.values())
    assert packed.dtype == np.uint8 and packed.nbytes == expected_bytes
    slots = empty_slots({n: (s, jnp.bfloat16) for n, s in {**shapes, **biases}.items()}, 6, mode)
    assert all(isinstance(slots[n], QuantizedStack) and slots[n].shape == (6, *shapes[n]) for n in shapes)
    out = jax.block_until_ready(write_slot(slots, 3, jnp.asarray(packed)))
    for n in biases:  # biases travel unquantized, as bfloat16 bytes
        np.testing.assert_array_equal(np.asarray(out[n][3]), expert[n].astype(ml_dtypes.bfloat16))
        assert not np.asarray(out[n][jnp.array([0, 5])]).any()
    for n in shapes:
        expected = dequantize(*quantize(expert[n], mode), ml_dtypes.bfloat16, mode)
        got = out[n][3]
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got), expected)
        np.testing.assert_array_equal(np.asarray(weight_row(out[n], jnp.int32(3))), expected)
        assert not np.asarray(out[n][jnp.array([0, 5])]).any()  # other slots untouched
        assert np.abs(expected.astype(np.float32) - expert[n]).max() > 0  # really quantized


@pytest.fixture(scope="module")
def quantized(converted_model):
    """quantized(mode, family) -> (model_dir, greedy result, prefill logits) of that quantized resident engine."""
    made = {}

    def get(mode, family="qwen2_moe"):
        if (mode, family) not in made:
            _, model_dir = converted_model(family)
            engine = jaxmoe.load(model_dir, quantize_experts=mode)
            logits = run_prefill(engine, PROMPT)
            made[mode, family] = (model_dir, engine.generate(PROMPT, NEW_TOKENS), logits)
        return made[mode, family]

    return get


@pytest.mark.parametrize("mode,slots,speculate,family", [
    ("int8", 2, "off", "qwen2_moe"), ("int8", 7, "on", "qwen2_moe"), ("int4", 3, "off", "qwen2_moe"),
    ("int4", 18, "on", "qwen2_moe"), ("int4", 7, "on", "deepseek_v2"), ("int8", 5, "on", "gpt_oss")])
def test_offloaded_quantized_equals_resident_quantized(mode, slots, speculate, family, quantized):
    model_dir, expected, expected_logits = quantized(mode, family)
    engine = jaxmoe.load(model_dir, cache_slots=slots, quantize_experts=mode, speculate=speculate)
    logits = run_prefill(engine, PROMPT)
    assert np.abs(logits - expected_logits).max() <= 1e-5 * np.abs(expected_logits).max()
    result = engine.generate(PROMPT, NEW_TOKENS)
    assert result.generated_ids == expected.generated_ids
    cfg = engine.cfg
    d, f = cfg.hidden_size, cfg.moe_intermediate_size
    packed = {"int8": 3 * d * f + 4 * (2 * f + d), "int4": 3 * d * f // 2 + 4 * (f * d // int4_group(d) * 2 + d * f // int4_group(f))}
    bias_bytes = (2 * f + d) * np.dtype(cfg.dtype).itemsize if cfg.expert_bias else 0  # unquantized
    assert result.stats["expert_bytes"] == packed[mode] + bias_bytes
    assert result.stats["quantize_experts"] == mode and expected.stats["quantize_experts"] == mode
    if slots < total_experts(cfg):
        assert result.stats["h2d_bytes"] % result.stats["expert_bytes"] == 0 and result.stats["h2d_bytes"] > 0
    if speculate == "on" and slots >= total_experts(cfg):
        assert result.stats["speculated_tokens"] > 0


def test_quantized_model_stays_close_to_the_unquantized_model(quantized):
    model_dir = quantized("int8")[0]
    logits = run_prefill(jaxmoe.load(model_dir), PROMPT)

    def log_softmax(x):  # in float64: int8's KL on this tiny model (~3e-8) is below float32's rounding of the sum
        x = np.asarray(x[0], np.float64)
        x = x - x.max()
        return x - np.log(np.exp(x).sum())

    p = log_softmax(logits)
    kl = {mode: float(np.sum(np.exp(p) * (p - log_softmax(quantized(mode)[2])))) for mode in ("int8", "int4")}
    assert 0 < kl["int8"] < 1e-3 and kl["int8"] < kl["int4"] < 3e-2, kl  # different, by the quantization error
    assert logits.argmax() == quantized("int8")[2].argmax()


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
    check_quantize("int4", 64, 144)
    check_quantize("int8", 64, 143)
    with pytest.raises(jaxmoe.JaxmoeError, match="--quantize-experts int4: needs even expert dimensions.*143"):
        check_quantize("int4", 64, 143)
