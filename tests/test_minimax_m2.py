"""MiniMax-M2 (`minimax_m2`): the Hub's config.json mapped (checked against transformers' own config where it
decides), refusals, multi-token-prediction layers skipped, the selection bias mattering, and the offloaded engine
(layer path and whole-token programs) equal to the resident one. Logits, cached decode and greedy generation
against transformers are in test_parity.py (the tiny model is in tests/hf_models.py)."""

import json

import pytest

import jaxmoe
from convert.converter import convert, model_config_from_hf
from tests.hf_models import add_tensors, assert_config_refused, build_hf_checkpoint

# MiniMaxAI/MiniMax-M2's config.json as the Hub ships it, sizes shrunk (62 layers -> 4, 256 experts -> 16, ...);
# its quantization_config (fp8) is HUB_FP8 below (a whole FP8 model converts in test_fp8.py)
HUB = dict(
    architectures=["MiniMaxM2ForCausalLM"], model_type="minimax_m2", attn_type_list=[1, 1, 1, 1], head_dim=16,
    hidden_act="silu", hidden_size=48, intermediate_size=24, max_position_embeddings=196608, mtp_transformer_layers=1,
    num_attention_heads=6, num_experts_per_tok=4, num_hidden_layers=4, num_key_value_heads=2, num_local_experts=16,
    num_mtp_modules=3, qk_norm_type="per_layer", rms_norm_eps=1e-06, rope_theta=5000000, rotary_dim=8,
    scoring_func="sigmoid", shared_intermediate_size=0, tie_word_embeddings=False, use_cache=True, use_mtp=True,
    use_qk_norm=True, use_routing_bias=True, vocab_size=120, torch_dtype="bfloat16",
)


def transformers_rotary_dim(hf: dict) -> int:
    """The rotated width transformers' MiniMaxM2RotaryEmbedding uses for config.json `hf`."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("minimax_m2", **{k: v for k, v in hf.items() if k != "model_type"})
    return int(cfg.head_dim * cfg.rope_parameters.get("partial_rotary_factor", 1.0))


def test_hub_config():
    cfg = model_config_from_hf(HUB, None)
    assert cfg.family == "minimax_m2" and cfg.dtype == "bfloat16" and cfg.attention_kind == "gqa"
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size) == (6, 2, 16, 48)  # q width 96 != d
    assert cfg.rotary_dim == 8 == transformers_rotary_dim(HUB) and cfg.rope_theta == 5e6
    assert cfg.qk_norm == "full" and not cfg.attention_bias and not cfg.attention_out_bias
    assert cfg.moe_layers == (True,) * 4 and cfg.shared_intermediate_size == 0 and cfg.dense_intermediate_size == 0
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (16, 4, 24)
    routing = (cfg.router_scoring, cfg.router_bias, cfg.norm_topk_prob, cfg.n_group, cfg.routed_scaling_factor)
    assert routing == ("sigmoid", True, True, 1, 1.0)
    assert cfg.max_position_embeddings == 196608 and cfg.eos_token_ids == ()

    # a partial_rotary_factor in the config wins over rotary_dim, as in transformers
    factor = dict(HUB, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.75})
    assert model_config_from_hf(factor, None).rotary_dim == 12 == transformers_rotary_dim(factor)
    # without rotary_dim, head_dim or rope_theta: transformers' defaults (all of a 128-wide head, theta 5e6)
    bare = model_config_from_hf({k: v for k, v in HUB.items() if k not in ("rotary_dim", "head_dim", "rope_theta")}, None)
    assert (bare.head_dim, bare.rotary_dim, bare.rope_theta) == (128, 128, 5e6)
    # use_routing_bias false: no selection bias (transformers' buffer stays zero)
    assert not model_config_from_hf(dict(HUB, use_routing_bias=False), None).router_bias


@pytest.mark.parametrize("change, words", [
    (dict(quantization_config={"quant_method": "awq"}), ["quantization_config", "awq"]),
    (dict(attn_type_list=[0, 1, 1, 1]), ["attn_type_list", "lightning"]),
    (dict(attn_type_list=[1, 1]), ["attn_type_list"]),
    (dict(use_qk_norm=False), ["use_qk_norm"]),
    (dict(qk_norm_type="per_head"), ["qk_norm_type", "per_head"]),
    (dict(scoring_func="softmax"), ["scoring_func", "softmax"]),
    (dict(shared_intermediate_size=24), ["shared_intermediate_size"]),
    (dict(rotary_dim=7), ["rotary_dim", "even"]),
    (dict(rotary_dim=32), ["rotary_dim", "head_dim"]),
    (dict(num_local_experts=None), ["num_local_experts"]),
    (dict(hidden_act="gelu"), ["hidden_act"]),
])
def test_unsupported_options_are_refused(change, words):
    assert_config_refused({**HUB, **change}, words)


def test_mtp_layers_skipped(tmp_path):
    import torch

    hf_dir = build_hf_checkpoint("minimax_m2", tmp_path / "hf")
    num_layers = json.loads((hf_dir / "config.json").read_text())["num_hidden_layers"]
    add_tensors(hf_dir, {f"model.layers.{num_layers + i}.block_sparse_moe.experts.0.w1.weight": torch.zeros(4, 4)
                         for i in range(3)})
    cfg = convert(hf_dir, tmp_path / "out", progress=False)
    assert cfg.num_layers == num_layers and cfg.rotary_dim == 4 and cfg.router_bias


def test_selection_bias_changes_the_output(converted_model):
    """The tiny model's e_score_correction_bias changes expert choices: without it transformers' logits move far
    beyond test_parity's tolerance, so parity there shows the bias is honoured."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    hf_dir, _ = converted_model("minimax_m2")
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype="float32").eval()
    tokens = torch.tensor([PROMPT])
    with torch.no_grad():
        with_bias = model(tokens).logits.numpy()
        for layer in model.model.layers:
            layer.mlp.e_score_correction_bias.zero_()
        without = model(tokens).logits.numpy()
    assert np.abs(with_bias - without).max() > 1e-2 * np.abs(with_bias).max()


PROMPT = [5, 17, 33, 8, 41, 12, 9, 60, 3, 27, 71, 44]
NEW_TOKENS = 12


@pytest.mark.parametrize("slots, policy, speculate", [(3, "on-demand", "off"), (6, "presched", "off"),
                                                      (24, "on-demand", "on"), (5, "presched", "on")])
def test_offloaded_equals_resident(converted_model, slots, policy, speculate):
    _, model_dir = converted_model("minimax_m2")
    expected = jaxmoe.load(model_dir).generate(PROMPT, NEW_TOKENS).generated_ids
    assert len(expected) == NEW_TOKENS
    engine = jaxmoe.load(model_dir, cache_slots=slots, policy=policy, speculate=speculate)
    for _ in range(2):  # cold, then warm (with 24 slots every expert is cached: whole-token steps)
        assert engine.generate(PROMPT, NEW_TOKENS).generated_ids == expected, (slots, policy, speculate)


def test_hub_fp8_quantization_config_is_accepted():
    """The Hub release is FP8 block-wise, with `fmt` spelled float8_e4m3fn: it maps, and the converter's fp8 reader
    takes its quantization_config (whole FP8 models convert in test_fp8.py)."""
    from convert.fp8 import block_size_of

    quantization = {"activation_scheme": "dynamic", "fmt": "float8_e4m3fn", "quant_method": "fp8",
                    "weight_block_size": [128, 128], "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"]}
    assert model_config_from_hf(dict(HUB, quantization_config=quantization), None).family == "minimax_m2"
    assert block_size_of(quantization) == (128, 128)
