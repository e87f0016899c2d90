"""GLM-4.5 (`glm4_moe`) and GLM-4.7-Flash (`glm4_moe_lite`): Hub-style configs, refusals, multi-token-prediction
layers skipped, and the offloaded engine (layer path and whole-token programs) equal to the resident one.
GLM-4.5's logits, cached decode and greedy generation against transformers are in test_parity.py, GLM-4.7-Flash's
logits, routing and cached decode in test_deepseek.py (the tiny models are in tests/hf_models.py)."""

import json

import pytest

import jaxmoe
from convert.converter import convert, model_config_from_hf
from jaxmoe.errors import JaxmoeError
from tests.hf_models import add_tensors, assert_config_refused, build_hf_checkpoint

# GLM-4.5-Air's config.json as the Hub ships it (top-level partial_rotary_factor, rope_scaling null), sizes shrunk
HUB_AIR = dict(
    architectures=["Glm4MoeForCausalLM"], model_type="glm4_moe", vocab_size=120, hidden_size=64,
    intermediate_size=96, moe_intermediate_size=16, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.5, n_routed_experts=16, n_shared_experts=1,
    num_experts_per_tok=4, first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True,
    routed_scaling_factor=1.0, attention_bias=True, use_qk_norm=False, rope_theta=1000000, rope_scaling=None,
    rms_norm_eps=1e-05, hidden_act="silu", max_position_embeddings=131072, num_nextn_predict_layers=1,
    tie_word_embeddings=False, pad_token_id=151329, eos_token_id=[151329, 151336, 151338], torch_dtype="bfloat16",
)


def test_hub_style_config():
    cfg = model_config_from_hf(HUB_AIR, None)
    assert cfg.family == "glm4_moe" and cfg.dtype == "bfloat16" and cfg.attention_kind == "gqa"
    assert cfg.rotary_dim == 8 and cfg.head_dim == 16 and cfg.rope_theta == 1e6 and cfg.rope_scaling.kind == "default"
    assert cfg.attention_bias and not cfg.attention_out_bias and cfg.qk_norm == "none"
    assert cfg.moe_layers == (False, True, True, True) and cfg.dense_intermediate_size == 96
    assert cfg.shared_intermediate_size == 16 and not cfg.shared_expert_gated
    routing = (cfg.router_scoring, cfg.router_bias, cfg.group_score, cfg.n_group, cfg.topk_group, cfg.norm_topk_prob)
    assert routing == ("sigmoid", True, "top2_sum", 1, 1, True)
    assert cfg.eos_token_ids == (151329, 151336, 151338)

    # GLM-4.5 (not Air): q/k norm, more dense layers, a quarter of each head rotated
    full = model_config_from_hf(dict(HUB_AIR, use_qk_norm=True, first_k_dense_replace=3, partial_rotary_factor=0.25), None)
    assert full.qk_norm == "head" and full.moe_layers == (False, False, False, True) and full.rotary_dim == 4

    # transformers >= 5 writes the factor inside rope_parameters; a config that leaves out the fields below
    # takes transformers' defaults (half the head rotated, one dense layer, one shared expert)
    sparse = {k: v for k, v in HUB_AIR.items() if k not in ("partial_rotary_factor", "first_k_dense_replace",
                                                            "n_shared_experts", "rope_theta", "rope_scaling")}
    assert model_config_from_hf(dict(sparse, rope_parameters={"rope_theta": 5e5, "rope_type": "default",
                                                              "partial_rotary_factor": 0.75}), None).rotary_dim == 12
    defaults = model_config_from_hf(sparse, None)
    assert defaults.rotary_dim == 8 and defaults.moe_layers == (False, True, True, True)
    assert defaults.shared_intermediate_size == 16


@pytest.mark.parametrize("change, words", [
    (dict(quantization_config={"quant_method": "gptq"}), ["quantization_config", "gptq", "fp8"]),
    (dict(n_group=3), ["n_group", "divisible"]),
    (dict(n_group=4, topk_group=5), ["topk_group"]),
    (dict(n_group=16, topk_group=1), ["n_group", "fewer than 2"]),
    (dict(partial_rotary_factor=0.1), ["partial_rotary_factor", "even"]),  # int(16 * 0.1) = 1
    (dict(intermediate_size=None), ["intermediate_size"]),
    (dict(hidden_act="gelu"), ["hidden_act"]),
])
def test_unsupported_options_are_refused(change, words):
    assert_config_refused({**HUB_AIR, **change}, words)


def test_mtp_layers_skipped(tmp_path):
    import torch

    hf_dir = build_hf_checkpoint("glm4_moe", tmp_path / "hf")
    num_layers = json.loads((hf_dir / "config.json").read_text())["num_hidden_layers"]
    add_tensors(hf_dir, {f"model.layers.{num_layers}.eh_proj.weight": torch.zeros(4, 4),  # GLM-4.5's MTP layer
                         f"model.layers.{num_layers}.mlp.experts.0.up_proj.weight": torch.zeros(4, 4)})
    cfg = convert(hf_dir, tmp_path / "out", progress=False)
    assert cfg.num_layers == num_layers and cfg.rotary_dim == 6


PROMPT = [5, 17, 33, 8, 41, 12, 9, 60, 3, 27, 71, 44]
NEW_TOKENS = 12


@pytest.mark.parametrize("slots, policy, speculate", [(3, "on-demand", "off"), (5, "presched", "off"),
                                                      (16, "on-demand", "on"), (4, "adaptive", "on")])
def test_offloaded_equals_resident(converted_model, slots, policy, speculate):
    _, model_dir = converted_model("glm4_moe")
    expected = jaxmoe.load(model_dir).generate(PROMPT, NEW_TOKENS).generated_ids
    assert len(expected) == NEW_TOKENS
    engine = jaxmoe.load(model_dir, cache_slots=slots, policy=policy, speculate=speculate)
    for _ in range(2):  # cold, then warm (with 16 slots every expert is cached: whole-token steps)
        assert engine.generate(PROMPT, NEW_TOKENS).generated_ids == expected, (slots, policy, speculate)


# GLM-4.7-Flash (`glm4_moe_lite`): DeepSeek-V3's MLA and routing; logits, routing and cached decode against
# transformers are in test_deepseek.py
HUB_FLASH = dict(
    model_type="glm4_moe_lite", vocab_size=120, hidden_size=64, intermediate_size=96, moe_intermediate_size=16,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
    num_experts_per_tok=4, kv_lora_rank=32, q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    mlp_layer_types=["dense", "sparse", "sparse", "sparse"], n_group=1, topk_group=1, norm_topk_prob=True,
    routed_scaling_factor=1.8, rope_parameters={"rope_theta": 1e6, "rope_type": "default"}, rope_interleave=True,
    rms_norm_eps=1e-5, hidden_act="silu", max_position_embeddings=202752, num_nextn_predict_layers=1,
    tie_word_embeddings=False, eos_token_id=[3, 5], torch_dtype="bfloat16",
)


def test_flash_config():
    cfg = model_config_from_hf(HUB_FLASH, None)
    assert cfg.attention_kind == "mla" and cfg.q_lora_rank == 24 and cfg.rope_interleaved and cfg.rope_theta == 1e6
    assert cfg.moe_layers == (False, True, True, True) and cfg.shared_intermediate_size == 16
    assert (cfg.router_scoring, cfg.router_bias, cfg.routed_scaling_factor) == ("sigmoid", True, 1.8)
    mixed = model_config_from_hf(dict(HUB_FLASH, mlp_layer_types=["sparse", "dense", "sparse", "dense"]), None)
    assert mixed.moe_layers == (True, False, True, False)
    defaults = model_config_from_hf({k: v for k, v in HUB_FLASH.items() if k != "mlp_layer_types"}, None)
    assert defaults.moe_layers == (False, True, True, True)
    for change, word in [(dict(mlp_layer_types=["dense", "sparse"]), "mlp_layer_types"),
                         (dict(mlp_layer_types=["dense", "moe", "sparse", "sparse"]), "mlp_layer_types"),
                         (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
                         (dict(num_key_value_heads=2), "num_key_value_heads")]:
        with pytest.raises(JaxmoeError, match=word):
            model_config_from_hf(dict(HUB_FLASH, **change), None)


def test_flash_greedy_generation_matches_transformers_and_offloaded(converted_model):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    hf_dir, model_dir = converted_model("glm4_moe_lite")
    ours = jaxmoe.load(model_dir).generate(PROMPT, NEW_TOKENS).generated_ids
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype="float32").eval()
        ref = hf.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(PROMPT):].tolist()
    assert ours == ref and len(ours) == NEW_TOKENS, np.asarray(ours)
    engine = jaxmoe.load(model_dir, cache_slots=5, policy="presched", speculate="on")
    for _ in range(2):
        assert engine.generate(PROMPT, NEW_TOKENS).generated_ids == ours
