"""GPT-OSS (`gpt_oss`): the Hub's config.json, refusals, MXFP4 checkpoints converted exactly as transformers
dequantizes them, the gate-lookahead predictor with the router's logit bias, and the offloaded engine equal to the
resident one. Logits, cached decode (across the sliding window) and greedy generation against transformers are in
test_parity.py (the tiny model is in tests/hf_models.py)."""

import json

import numpy as np
import pytest

import jaxmoe
from convert.converter import convert, model_config_from_hf
from jaxmoe.checkpoint import load_resident
from jaxmoe.errors import JaxmoeError
from tests.hf_models import assert_config_refused, build_hf_checkpoint

# gpt-oss-20b's config.json as the Hub ships it (rope_scaling at the top level, MXFP4 experts), sizes shrunk
HUB_20B = dict(
    architectures=["GptOssForCausalLM"], model_type="gpt_oss", attention_bias=True, attention_dropout=0.0,
    eos_token_id=200002, experts_per_token=4, head_dim=16, hidden_act="silu", hidden_size=64,
    initial_context_length=4096, intermediate_size=64, layer_types=["sliding_attention", "full_attention"] * 2,
    max_position_embeddings=131072, num_attention_heads=8, num_experts_per_tok=4, num_hidden_layers=4,
    num_key_value_heads=2, num_local_experts=32, pad_token_id=199999,
    quantization_config={"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                    "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    rms_norm_eps=1e-05, rope_scaling={"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                      "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
    rope_theta=150000, router_aux_loss_coef=0.9, sliding_window=128, swiglu_limit=7.0, tie_word_embeddings=False,
    vocab_size=201088,
)


def test_hub_style_config():
    cfg = model_config_from_hf(HUB_20B, None)
    assert cfg.family == "gpt_oss" and cfg.dtype == "bfloat16" and cfg.attention_kind == "gqa"
    assert cfg.attention_bias and cfg.attention_out_bias and cfg.attention_sinks and cfg.qk_norm == "none"
    assert cfg.sliding_window == 128 and cfg.sliding_layers == (True, False, True, False)
    assert [cfg.layer_window(i) for i in range(4)] == [128, None, 128, None]
    assert cfg.rope_theta == 150000 and cfg.rope_scaling.kind == "yarn" and cfg.rope_scaling.factor == 32.0
    assert not cfg.rope_scaling.truncate and cfg.rope_scaling.original_max_position_embeddings == 4096
    assert cfg.moe_layers == (True,) * 4 and (cfg.num_experts, cfg.num_experts_per_tok) == (32, 4)
    assert (cfg.router_scoring, cfg.norm_topk_prob, cfg.router_logit_bias, cfg.router_bias) == ("softmax", True, True, False)
    assert (cfg.expert_activation, cfg.expert_bias, cfg.swiglu_alpha, cfg.swiglu_limit) == ("gpt_oss", True, 1.702, 7.0)
    assert cfg.eos_token_ids == (200002,) and cfg.expert_param_count == 3 * 64 * 64 + 3 * 64
    # transformers' defaults: alternating windows from layer 0, a window of 128; a null window: none anywhere
    defaults = model_config_from_hf({k: v for k, v in HUB_20B.items() if k not in ("layer_types", "sliding_window")}, None)
    assert defaults.sliding_layers == (True, False, True, False) and defaults.sliding_window == 128
    unwindowed = model_config_from_hf(dict(HUB_20B, sliding_window=None), None)
    assert unwindowed.sliding_layers == () and unwindowed.layer_window(0) is None


@pytest.mark.parametrize("change, words", [
    (dict(quantization_config={"quant_method": "fp8"}), ["quantization_config", "fp8", "mxfp4"]),
    (dict(layer_types=["sliding_attention"] * 3), ["layer_types", "4 entries"]),
    (dict(layer_types=["sliding_attention", "chunked_attention"] * 2), ["layer_types"]),
    (dict(sliding_window=0), ["sliding_window", "positive"]),
    (dict(swiglu_limit=0.0), ["swiglu_limit", "positive"]),
    (dict(hidden_act="gelu"), ["hidden_act"]),
    (dict(num_local_experts=None), ["num_local_experts"]),
])
def test_unsupported_options_are_refused(change, words):
    assert_config_refused({**HUB_20B, **change}, words)


def _tensors(hf_dir):
    from safetensors.numpy import load_file

    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    out = {}
    for name in sorted(set(index["weight_map"].values())):
        out.update(load_file(hf_dir / name))
    return out


def _write_checkpoint(directory, tensors, config):
    from safetensors.numpy import save_file

    directory.mkdir()
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))


def test_mxfp4_checkpoint_converts_to_what_transformers_dequantizes(tmp_path):
    """The Hub layout (expert matrices as *_blocks / *_scales, quant_method mxfp4) against the same model with the
    matrices dequantized by transformers: the same converted weights bit for bit, the same greedy tokens as
    transformers."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    hf_dir = build_hf_checkpoint("gpt_oss", tmp_path / "hf", intermediate_size=32)  # MXFP4 groups are 32 wide
    config = json.loads((hf_dir / "config.json").read_text())
    tensors = _tensors(hf_dir)
    rng = np.random.default_rng(0)
    quantized, dequantized = {}, {}
    for key, value in tensors.items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            e, rows_in, cols_out = value.shape  # [E, in, out]: the blocks hold the transpose [E, out, in / 32, 16]
            blocks = rng.integers(0, 256, (e, cols_out, rows_in // 32, 16), dtype=np.uint8)
            scales = rng.integers(121, 125, (e, cols_out, rows_in // 32), dtype=np.uint8)
            quantized[key + "_blocks"], quantized[key + "_scales"] = blocks, scales
            ref = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.bfloat16)
            assert tuple(ref.shape) == value.shape
            dequantized[key] = ref.float().numpy()
        else:
            quantized[key] = dequantized[key] = value
    _write_checkpoint(tmp_path / "mxfp4", quantized, dict(config, quantization_config={"quant_method": "mxfp4"}))
    _write_checkpoint(tmp_path / "dense", dequantized, config)
    convert(tmp_path / "mxfp4", tmp_path / "mxfp4-out", dtype="float32", progress=False)
    convert(tmp_path / "dense", tmp_path / "dense-out", dtype="float32", progress=False)
    _, _, state_q = load_resident(tmp_path / "mxfp4-out")
    _, _, state_d = load_resident(tmp_path / "dense-out")
    flat_q, flat_d = dict(state_q.flat_state()), dict(state_d.flat_state())
    assert flat_q.keys() == flat_d.keys()
    for path in flat_q:
        np.testing.assert_array_equal(np.asarray(flat_q[path].get_value()), np.asarray(flat_d[path].get_value()), str(path))
    w_gate = np.asarray(flat_q[("layers", 0, "moe", "experts", "w_gate")].get_value())
    np.testing.assert_array_equal(w_gate, dequantized["model.layers.0.mlp.experts.gate_up_proj"][..., ::2])

    prompt = [5, 17, 33, 8, 41, 12, 9]
    ours = jaxmoe.load(tmp_path / "mxfp4-out").generate(prompt, 12).generated_ids
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype="float32").eval()
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    assert ours == ref and len(ours) == 12

    # --quantize-experts mxfp4 re-quantizes those weights to exactly themselves: resident and offloaded, the same
    # tokens, with 4.25 bits per weight over the link (+ unquantized biases)
    _, _, state_l = load_resident(tmp_path / "mxfp4-out", quantize_experts="mxfp4")
    for path, value in state_l.flat_state():
        np.testing.assert_array_equal(np.asarray(value.get_value()), np.asarray(flat_q[path].get_value()), str(path))
    lossless = jaxmoe.load(tmp_path / "mxfp4-out", quantize_experts="mxfp4")
    assert lossless.generate(prompt, 12).generated_ids == ours
    offloaded = jaxmoe.load(tmp_path / "mxfp4-out", cache_slots=5, policy="presched", quantize_experts="mxfp4")
    result = offloaded.generate(prompt, 12)
    assert result.generated_ids == ours
    d = f = 32
    assert result.stats["expert_bytes"] == 3 * d * f // 2 + 3 * d * f // 32 + 4 * (2 * f + d)


def test_mxfp4_blocks_without_scales_is_a_clear_error(tmp_path):
    _write_checkpoint(tmp_path / "hf", {"model.layers.0.mlp.experts.down_proj_blocks": np.zeros((2, 4, 1, 16), np.uint8)},
                      dict(HUB_20B, num_hidden_layers=1, layer_types=["full_attention"]))
    with pytest.raises(JaxmoeError, match="down_proj_blocks") as err:
        convert(tmp_path / "hf", tmp_path / "out", progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_gate_lookahead_adds_the_router_logit_bias(converted_model):
    """The predictor's scores for the next layer, from that layer's own input, are that layer's router logits:
    only true with the logit bias added."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxmoe.offload import OffloadEngine

    _, model_dir = converted_model("gpt_oss")
    cfg, graphdef, state = load_resident(model_dir)
    model = nnx.merge(graphdef, state)
    pure = nnx.to_pure_dict(state)
    predictor = OffloadEngine.load(model_dir, cache_slots=6, policy="prefetch").predictor
    assert predictor.logit_bias is not None and np.abs(predictor.logit_bias).max() > 0
    tokens = jnp.asarray([[5, 17, 33, 8]], jnp.int32)
    positions = jnp.arange(4, dtype=jnp.int32)[None]
    _, _, routing = model(tokens, positions, model.init_cache(1, 4))
    hidden = np.asarray(routing[1]["hidden"][-1], np.float32)  # the residual stream entering layer 1's MoE block
    scores = predictor.predict(0, hidden, None, 1)[0]  # position 0 predicts layer 1
    np.testing.assert_allclose(scores, np.asarray(routing[1]["router_logits"][-1]), rtol=1e-4, atol=1e-4)
    assert "router_logit_bias" in pure["layers"][1]["moe"]


PROMPT = [5, 17, 33, 8, 41, 12, 9, 60, 3, 27, 71, 44]
NEW_TOKENS = 12


@pytest.mark.parametrize("slots, policy, speculate", [(3, "on-demand", "off"), (5, "presched", "off"),
                                                      (18, "on-demand", "on"), (4, "adaptive", "on")])
def test_offloaded_equals_resident(converted_model, slots, policy, speculate):
    _, model_dir = converted_model("gpt_oss")
    expected = jaxmoe.load(model_dir).generate(PROMPT, NEW_TOKENS).generated_ids
    assert len(expected) == NEW_TOKENS
    engine = jaxmoe.load(model_dir, cache_slots=slots, policy=policy, speculate=speculate)
    for _ in range(2):  # cold, then warm (with 18 slots every expert is cached: whole-token steps)
        result = engine.generate(PROMPT, NEW_TOKENS)
        assert result.generated_ids == expected, (slots, policy, speculate)
    if slots == 18:
        assert result.stats["speculated_tokens"] > 0


@pytest.mark.parametrize("float32_scale", [False, True])
def test_bfloat16_rms_norm_rounds_as_transformers(float32_scale):
    """GPT-OSS's norm keeps its weight in float32 and rounds once (GptOssRMSNorm); Llama-style families round the
    normalized input first (MixtralRMSNorm). In bfloat16 each of ours is bit-identical to its transformers form."""
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm
    from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

    from jaxmoe.layers import RMSNorm

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 48)).astype(np.float32)
    weight = (1 + 0.3 * rng.normal(size=48)).astype(np.float32)
    ref_module = (GptOssRMSNorm if float32_scale else MixtralRMSNorm)(48, eps=1e-5)
    with torch.no_grad():
        ref_module.weight.copy_(torch.from_numpy(weight))
        if not float32_scale:
            ref_module.to(torch.bfloat16)  # its weight in the model dtype; GPT-OSS's stays float32
        ref = ref_module(torch.from_numpy(x).to(torch.bfloat16)).float().numpy()
    ours = RMSNorm(48, 1e-5, jnp.bfloat16, float32_scale)
    assert ours.scale[...].dtype == (jnp.float32 if float32_scale else jnp.bfloat16)
    ours.scale[...] = jnp.asarray(weight).astype(ours.scale[...].dtype)
    got = np.asarray(ours(jnp.asarray(x, jnp.bfloat16)).astype(jnp.float32))
    np.testing.assert_array_equal(got, ref)
    other = RMSNorm(48, 1e-5, jnp.bfloat16, not float32_scale)
    other.scale[...] = jnp.asarray(weight).astype(other.scale[...].dtype)
    assert (np.asarray(other(jnp.asarray(x, jnp.bfloat16)).astype(jnp.float32)) != ref).any()  # the styles differ
