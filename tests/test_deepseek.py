"""DeepSeek-V2 / V3 and GLM-4.7-Flash (multi-head latent attention, group-limited routing) against transformers.

Tiny random checkpoints from tests/hf_models.py: V2 without q LoRA, V3 with q LoRA and attention
biases; both YaRN (mscale / mscale_all_dim), one dense first layer, shared experts, 4 expert groups
of which 2 are kept, routed_scaling_factor != 1, and (V3) a non-zero e_score_correction_bias.
"""

from functools import partial

import jax
import numpy as np
import pytest

import jax.numpy as jnp
from flax import nnx

from convert.converter import convert, model_config_from_hf
from jaxmoe.checkpoint import load_resident
from jaxmoe.mla import mla_softmax_scale
from jaxmoe.rope import yarn_mscale
from tests.hf_models import add_tensors, assert_config_refused, build_hf_checkpoint

FAMILIES = ["deepseek_v2", "deepseek_v3", "glm4_moe_lite"]  # glm4_moe_lite: GLM-4.7-Flash, V3's architecture


def hf_model(hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype="float32").eval()


def prompts(vocab, batch=2, length=9, seed=0):
    return np.random.RandomState(seed).randint(3, vocab, (batch, length)).astype(np.int32)


def set_mode(model, mode):
    for layer in model.layers:
        layer.attn.mode = mode


@partial(jax.jit, static_argnames=("graphdef",))
def _jit_call(graphdef, state, tokens, positions, cache):
    return nnx.merge(graphdef, state)(tokens, positions, cache)


def call(model, tokens, positions, cache):
    """model(tokens, positions, cache), jitted: one compile per shape beats op-by-op dispatch on CPU."""
    graphdef, state = nnx.split(model)
    return _jit_call(graphdef, state, jnp.asarray(tokens), positions, cache)


def full_forward(model, tokens):
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, _, routing = call(model, tokens, positions, model.init_cache(b, t))
    return np.asarray(logits), routing


def hf_forward_with_routing(hf, tokens):
    """-> (logits [B, T, V], {layer: (topk_indices [B*T, k], topk_weights [B*T, k])})."""
    import torch

    choices, hooks = {}, []
    for i, layer in enumerate(hf.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and not isinstance(gate, torch.nn.Linear):  # the router, not a dense gate_proj
            def hook(_module, _inputs, out, i=i):
                _, weights, indices = out
                choices[i] = (indices.numpy(), weights.numpy())

            hooks.append(gate.register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    finally:
        for h in hooks:
            h.remove()
    return logits, choices


@pytest.fixture(scope="module")
def loaded(converted_model):
    cache = {}

    def get(family):
        if family not in cache:
            hf_dir, model_dir = converted_model(family)
            cfg, graphdef, state = load_resident(model_dir)
            cache[family] = (hf_dir, cfg, nnx.merge(graphdef, state))
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_routing_match_transformers(family, loaded):
    hf_dir, cfg, model = loaded(family)
    assert cfg.attention_kind == "mla" and cfg.moe_layers == (False, True, True)
    tokens = prompts(cfg.vocab_size)
    ref, hf_choices = hf_forward_with_routing(hf_model(hf_dir), tokens)
    # tiny sizes: "auto" absorbs for up to 12 query tokens; the expanded form is checked against this
    # one in test_cached_decode_equals_uncached_forward (prefill)
    set_mode(model, "absorbed")
    ours, routing = full_forward(model, tokens)
    assert np.abs(ours - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())

    assert sorted(hf_choices) == list(cfg.moe_layer_ids)
    restricted = 0
    for layer, (hf_ids, hf_weights) in hf_choices.items():
        ids = np.asarray(routing[layer]["expert_ids"])
        weights = np.asarray(routing[layer]["expert_weights"])
        for n in range(ids.shape[0]):  # same expert set, same weight per expert
            ours_w = dict(zip(ids[n].tolist(), weights[n].tolist()))
            ref_w = dict(zip(hf_ids[n].tolist(), hf_weights[n].tolist()))
            assert ours_w.keys() == ref_w.keys(), (layer, n)
            np.testing.assert_allclose([ours_w[e] for e in ref_w], list(ref_w.values()), rtol=1e-5, atol=1e-6)
        # the test is only meaningful if group limiting (and V3's selection bias) changed some choices
        logits = np.asarray(routing[layer]["router_logits"])
        unrestricted = np.argsort(-logits, axis=-1)[:, : cfg.num_experts_per_tok]  # softmax/sigmoid are monotone
        restricted += sum(set(a) != set(b) for a, b in zip(unrestricted.tolist(), ids.tolist()))
    assert restricted > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decode_equals_uncached_forward(family, loaded):
    _, cfg, model = loaded(family)
    tokens = prompts(cfg.vocab_size, seed=1)
    set_mode(model, "absorbed")
    full, _ = full_forward(model, tokens)
    cache = model.init_cache(2, 16)
    assert set(cache[0]) == {"c_kv", "k_pe"}  # the compressed latent, not per-head keys/values
    assert cache[0]["c_kv"].shape == (2, 16, cfg.kv_lora_rank)
    assert cache[0]["k_pe"].shape == (2, 16, cfg.qk_rope_head_dim)
    prefix = 5
    set_mode(model, "expanded")  # prefill expanded, decode absorbed: both read the same latent cache
    pos = jnp.broadcast_to(jnp.arange(prefix, dtype=jnp.int32), (2, prefix))
    step_logits, cache, _ = call(model, tokens[:, :prefix], pos, cache)
    got = [np.asarray(step_logits)]
    set_mode(model, "absorbed")
    for t in range(prefix, tokens.shape[1]):
        lg, cache, _ = call(model, tokens[:, t : t + 1], jnp.full((2, 1), t, jnp.int32), cache)
        got.append(np.asarray(lg))
    np.testing.assert_allclose(np.concatenate(got, axis=1), full, atol=1e-5 * max(1, np.abs(full).max()))


def test_v3_half_split_rope_matches_transformers(tmp_path):
    """rope_interleave=False (transformers' rotate_half path) with greedy-style n_group=1 routing."""
    hf_dir = build_hf_checkpoint("deepseek_v3", tmp_path / "hf", seed=3, rope_interleave=False, n_group=1, topk_group=1,
                                 norm_topk_prob=False, rope_scaling=None, attention_bias=False)
    cfg = convert(hf_dir, tmp_path / "jaxmoe", progress=False)
    assert not cfg.rope_interleaved and cfg.rope_scaling.kind == "default" and cfg.n_group == 1
    cfg, graphdef, state = load_resident(tmp_path / "jaxmoe")
    tokens = prompts(cfg.vocab_size, seed=4)
    ref, _ = hf_forward_with_routing(hf_model(hf_dir), tokens)
    ours, _ = full_forward(nnx.merge(graphdef, state), tokens)
    assert np.abs(ours - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


# config.json as the Hub ships it (old rope_theta + rope_scaling keys), sizes shrunk
HUB_V2_LITE = dict(
    model_type="deepseek_v2", vocab_size=100, hidden_size=64, intermediate_size=96, moe_intermediate_size=16,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=2,
    num_experts_per_tok=3, first_k_dense_replace=1, moe_layer_freq=1, kv_lora_rank=32, q_lora_rank=None,
    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1, topk_method="greedy",
    scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0, rms_norm_eps=1e-6, hidden_act="silu",
    max_position_embeddings=163840, rope_theta=10000, aux_loss_alpha=0.001, seq_aux=True, ep_size=1,
    rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                  "original_max_position_embeddings": 4096, "type": "yarn"},
    tie_word_embeddings=False, bos_token_id=100000, eos_token_id=100001, torch_dtype="bfloat16",
)
HUB_V3 = dict(
    HUB_V2_LITE, model_type="deepseek_v3", q_lora_rank=24, n_shared_experts=1, num_experts_per_tok=2, n_group=4,
    topk_group=2, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
    first_k_dense_replace=2, num_nextn_predict_layers=1,
    rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                  "original_max_position_embeddings": 4096, "type": "yarn"},
)


def test_hub_style_configs():
    v2 = model_config_from_hf(HUB_V2_LITE, None)
    assert v2.dtype == "bfloat16" and v2.attention_kind == "mla" and v2.q_lora_rank is None
    assert v2.moe_layers == (False, True, True, True) and v2.dense_intermediate_size == 96
    assert v2.shared_intermediate_size == 32 and v2.router_scoring == "softmax" and not v2.norm_topk_prob
    assert (v2.n_group, v2.topk_group, v2.rope_interleaved, v2.rope_theta) == (1, 1, True, 10000.0)
    assert v2.rope_scaling.kind == "yarn" and v2.rope_scaling.factor == 40 and v2.rope_scaling.mscale_all_dim == 0.707
    assert mla_softmax_scale(v2) == pytest.approx(24**-0.5 * yarn_mscale(40, 0.707) ** 2)

    v3 = model_config_from_hf(HUB_V3, "float32")
    assert v3.moe_layers == (False, False, True, True) and v3.q_lora_rank == 24 and v3.shared_intermediate_size == 16
    routing = (v3.router_scoring, v3.router_bias, v3.group_score, v3.n_group, v3.topk_group)
    assert routing == ("sigmoid", True, "top2_sum", 4, 2)
    assert v3.norm_topk_prob and v3.routed_scaling_factor == 2.5 and v3.rope_interleaved

    freq2 = model_config_from_hf(dict(HUB_V2_LITE, moe_layer_freq=2, first_k_dense_replace=0), None)
    assert freq2.moe_layers == (True, False, True, False)
    greedy = model_config_from_hf(dict(HUB_V2_LITE, n_group=3, topk_group=2), None)  # greedy ignores groups
    assert (greedy.n_group, greedy.topk_group) == (1, 1)

    # fields left out take transformers' per-family defaults
    sparse = {k: v for k, v in HUB_V3.items() if k not in ("n_group", "topk_group", "first_k_dense_replace",
                                                           "routed_scaling_factor", "norm_topk_prob")}
    v3d = model_config_from_hf(dict(sparse, n_routed_experts=16), None)
    assert (v3d.n_group, v3d.topk_group, v3d.routed_scaling_factor, v3d.norm_topk_prob) == (8, 4, 2.5, True)
    assert v3d.moe_layers == (False, False, False, True)


@pytest.mark.parametrize("change, words", [
    (dict(model_type="deepseek_v2", topk_method="noaux_tc"), ["topk_method", "'noaux_tc'", "greedy"]),
    (dict(model_type="deepseek_v2", scoring_func="sigmoid"), ["scoring_func", "'sigmoid'"]),
    (dict(model_type="deepseek_v3", topk_method="greedy"), ["topk_method", "noaux_tc"]),
    (dict(model_type="deepseek_v3", scoring_func="softmax"), ["scoring_func", "sigmoid"]),
    (dict(model_type="deepseek_v3", quantization_config={"quant_method": "awq"}), ["quantization_config", "awq", "fp8"]),
    (dict(model_type="deepseek_v3", num_key_value_heads=2), ["num_key_value_heads"]),
    (dict(model_type="deepseek_v3", n_group=3), ["n_group", "divisible"]),
    (dict(model_type="deepseek_v2", kv_lora_rank=None), ["kv_lora_rank"]),
    (dict(model_type="deepseek_v2", topk_method="group_limited_greedy", n_group=None), ["n_group", "topk_group"]),
    (dict(model_type="deepseek_v2", mlp_bias=True), ["mlp_bias"]),
])
def test_unsupported_options_are_refused(change, words):
    base = HUB_V3 if change["model_type"] == "deepseek_v3" else HUB_V2_LITE
    assert_config_refused({**base, **change}, words)


def test_auto_mode_absorbs_for_short_query_blocks():
    from jaxmoe.mla import absorb_is_cheaper

    # DeepSeek-V3 sizes: kv_lora_rank 512, nope 128, v 128 -> absorbed below ~170 query tokens
    assert absorb_is_cheaper(1, 512, 128, 128) and absorb_is_cheaper(170, 512, 128, 128)
    assert not absorb_is_cheaper(171, 512, 128, 128) and not absorb_is_cheaper(2048, 512, 128, 128)


def test_v3_mtp_layers_skipped_and_selection_bias_kept_in_float32(tmp_path):
    import json

    import torch

    hf_dir = build_hf_checkpoint("deepseek_v3", tmp_path / "hf")
    num_layers = json.loads((hf_dir / "config.json").read_text())["num_hidden_layers"]
    add_tensors(hf_dir, {f"model.layers.{num_layers}.eh_proj.weight": torch.zeros(4, 4)})  # an MTP layer, as V3 ships
    convert(hf_dir, tmp_path / "out", dtype="bfloat16", progress=False)
    cfg, _, state = load_resident(tmp_path / "out")
    moe = state.to_pure_dict()["layers"][cfg.moe_layer_ids[0]]["moe"]
    assert moe["router"].dtype == jnp.bfloat16
    assert moe["router_bias"].dtype == jnp.float32
