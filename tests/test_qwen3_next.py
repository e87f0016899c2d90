"""Qwen3-Next (`qwen3_next`): the Hub's config maps, refusals, multi-token-prediction tensors skipped, padding
leaves the Gated DeltaNet state alone, and the offloaded engine (layer path, whole-token programs with their
redo after a miss, chunked prefill) equal to the resident one, token for token.
Logits, cached decode and greedy generation against transformers are in test_parity.py (the tiny model is
in tests/hf_models.py: 3 Gated DeltaNet layers, 1 gated attention layer)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmoe
from convert.converter import convert, model_config_from_hf
from jaxmoe.attention import padded_positions
from jaxmoe.checkpoint import load_resident
from tests.hf_models import add_tensors, assert_config_refused, build_hf_checkpoint

# Qwen/Qwen3-Next-80B-A3B-Instruct's config.json as the Hub ships it (no layer_types: full_attention_interval),
# sizes shrunk (48 layers, d 2048, 512 experts top-10 in the release)
HUB = dict(
    architectures=["Qwen3NextForCausalLM"], model_type="qwen3_next", vocab_size=120, hidden_size=64,
    intermediate_size=80, moe_intermediate_size=16, shared_expert_intermediate_size=16, num_hidden_layers=8,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, partial_rotary_factor=0.25, full_attention_interval=4,
    linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
    linear_num_value_heads=4, num_experts=16, num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=1,
    mlp_only_layers=[], attention_bias=False, attention_dropout=0.0, rope_theta=10000000, rope_scaling=None,
    rms_norm_eps=1e-06, hidden_act="silu", max_position_embeddings=262144, tie_word_embeddings=False,
    bos_token_id=151643, eos_token_id=151645, router_aux_loss_coef=0.001, output_router_logits=False,
    use_cache=True, torch_dtype="bfloat16",
)


def test_hub_style_config():
    cfg = model_config_from_hf(HUB, None)
    assert cfg.family == "qwen3_next" and cfg.dtype == "bfloat16" and cfg.attention_kind == "gqa"
    assert cfg.linear_layers == (True, True, True, False) * 2
    assert [cfg.layer_attention_kind(i) for i in range(4)] == ["gated_delta"] * 3 + ["gqa"]
    linear = (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim,
              cfg.linear_conv_kernel)
    assert linear == (2, 4, 16, 16, 4)
    assert cfg.head_dim == 32 and cfg.rotary_dim == 8 and cfg.rope_theta == 1e7 and cfg.rope_scaling.kind == "default"
    assert cfg.attention_output_gate and cfg.qk_norm == "head" and cfg.norm_unit_offset and not cfg.attention_bias
    assert cfg.moe_layers == (True,) * 8 and cfg.num_experts == 16 and cfg.num_experts_per_tok == 4
    assert cfg.router_scoring == "softmax" and cfg.norm_topk_prob
    assert cfg.shared_intermediate_size == 16 and cfg.shared_expert_gated
    assert cfg.eos_token_ids == (151645,)

    # transformers >= 5 writes layer_types and the rotary factor inside rope_parameters
    v5 = {k: v for k, v in HUB.items() if k not in ("full_attention_interval", "partial_rotary_factor", "rope_theta")}
    v5.update(layer_types=["full_attention", "linear_attention"] * 4,
              rope_parameters={"rope_theta": 1e6, "rope_type": "default", "partial_rotary_factor": 0.5})
    cfg = model_config_from_hf(v5, None)
    assert cfg.linear_layers == (False, True) * 4 and cfg.rotary_dim == 16 and cfg.rope_theta == 1e6
    # fields left out take transformers' defaults: every 4th layer full attention, a quarter of each head rotated
    defaults = model_config_from_hf({k: v for k, v in HUB.items() if k not in ("full_attention_interval",
                                                                              "partial_rotary_factor")}, None)
    assert defaults.linear_layers == (True, True, True, False) * 2 and defaults.rotary_dim == 8
    sparse = model_config_from_hf(dict(HUB, decoder_sparse_step=2, mlp_only_layers=[3]), None)
    assert sparse.moe_layers == (False, True, False, False, False, True, False, True)


@pytest.mark.parametrize("change, words", [
    (dict(quantization_config={"quant_method": "awq"}), ["quantization_config", "awq"]),
    (dict(layer_types=["linear_attention"] * 3), ["layer_types", "num_hidden_layers"]),
    (dict(layer_types=["linear_attention", "sliding_attention"] * 4), ["layer_types", "sliding_attention"]),
    (dict(linear_num_value_heads=3), ["linear_num_value_heads", "multiple"]),
    (dict(full_attention_interval=0), ["full_attention_interval"]),
    (dict(shared_expert_intermediate_size=0), ["shared_expert_intermediate_size"]),
    (dict(partial_rotary_factor=0.1), ["partial_rotary_factor", "even"]),  # int(32 * 0.1) = 3
    (dict(hidden_act="gelu"), ["hidden_act"]),
])
def test_unsupported_options_are_refused(change, words):
    assert_config_refused({**HUB, **change}, words)


def test_mtp_tensors_skipped(tmp_path):
    import torch

    hf_dir = build_hf_checkpoint("qwen3_next", tmp_path / "hf")
    add_tensors(hf_dir, {"mtp.fc.weight": torch.zeros(4, 8), "mtp.norm.weight": torch.zeros(4),  # as the Hub ships them
                         "mtp.layers.0.mlp.experts.0.up_proj.weight": torch.zeros(4, 4)})
    cfg = convert(hf_dir, tmp_path / "out", progress=False)
    assert cfg.linear_layers == (True, False, True, True)


def test_padding_leaves_the_recurrent_state_alone(converted_model):
    """A right-padded prefill (positions -1 after the real tokens) leaves every layer's running state as the
    real tokens alone do, and the next token's logits equal."""
    _, model_dir = converted_model("qwen3_next")
    cfg, graphdef, state = load_resident(model_dir)
    model = nnx.merge(graphdef, state)
    forward = jax.jit(lambda st, tokens, positions, cache: nnx.merge(graphdef, st)(tokens, positions, cache)[:2])
    tokens = np.random.RandomState(3).randint(3, cfg.vocab_size, (1, 16)).astype(np.int32)
    length = 6
    exact_pos = jnp.arange(length, dtype=jnp.int32)[None]
    _, exact = forward(state, jnp.asarray(tokens[:, :length]), exact_pos, model.init_cache(1, 32))
    padded_pos = padded_positions(length, 16)[None]
    assert padded_pos[0, length - 1] == length - 1 and (padded_pos[0, length:] == -1).all()
    _, padded = forward(state, jnp.asarray(tokens), padded_pos, model.init_cache(1, 32))
    for layer, (a, b) in enumerate(zip(exact, padded)):  # equal up to float rounding (matmuls of other shapes)
        if cfg.linear_layers[layer]:
            for name in ("conv", "recurrent"):
                np.testing.assert_allclose(np.asarray(a[name]), np.asarray(b[name]), rtol=0, atol=1e-5)
    step = jnp.asarray([[7]], jnp.int32), jnp.full((1, 1), length, jnp.int32)
    after_exact, _ = forward(state, *step, exact)
    after_padded, _ = forward(state, *step, padded)
    np.testing.assert_allclose(np.asarray(after_exact), np.asarray(after_padded), rtol=0, atol=1e-5)
    # without the -1 positions the padding would have stepped the state: the check above can fail
    _, stepped = forward(state, jnp.asarray(tokens), jnp.arange(16, dtype=jnp.int32)[None], model.init_cache(1, 32))
    assert np.abs(np.asarray(stepped[0]["recurrent"]) - np.asarray(exact[0]["recurrent"])).max() > 1e-2


PROMPT = [5, 17, 33, 8, 41, 12, 9, 60, 3, 27, 71, 44]  # 12 tokens: the 16-token bucket holds 4 of padding
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def expected(converted_model):
    _, model_dir = converted_model("qwen3_next")
    ids = jaxmoe.load(model_dir).generate(PROMPT, NEW_TOKENS).generated_ids
    assert len(ids) == NEW_TOKENS
    return ids


# 3 MoE layers x 6 experts = 18; top-2. Whole-token steps with 7 slots miss and are redone layer by layer
@pytest.mark.parametrize("slots, policy, speculate", [(2, "on-demand", "off"), (5, "presched", "off"),
                                                      (7, "presched", "on"), (18, "on-demand", "on")])
def test_offloaded_equals_resident(converted_model, expected, slots, policy, speculate):
    check_offloaded_equals_resident(converted_model("qwen3_next")[1], expected, slots, policy, speculate)


def check_offloaded_equals_resident(model_dir, expected, slots: int, policy: str, speculate: str) -> None:
    """Greedy PROMPT + NEW_TOKENS, cold then warm, equals the resident `expected`; with speculation and fewer slots
    than experts, some whole-token steps missed and were redone layer by layer (running states kept from before
    the token)."""
    engine = jaxmoe.load(model_dir, cache_slots=slots, policy=policy, speculate=speculate)
    all_cached = slots >= engine.cfg.num_experts * len(engine.cfg.moe_layer_ids)
    redone = 0
    for _ in range(2):  # cold, then warm (with every expert cached: whole-token steps only)
        result = engine.generate(PROMPT, NEW_TOKENS)
        assert result.generated_ids == expected, (slots, policy, speculate)
        redone += result.stats["speculation_redone"]
        if speculate == "on":
            assert result.stats["speculated_tokens"] == NEW_TOKENS - 1
    if speculate == "on" and not all_cached:
        assert redone > 0  # the redo path ran


def test_offloaded_prefill_in_chunks(converted_model, expected, monkeypatch):
    """Prefill in chunks of 8: the running state carries from chunk to chunk, the last chunk is half padding."""
    import jaxmoe.offload

    monkeypatch.setattr(jaxmoe.offload, "PREFILL_CHUNK", 8)
    _, model_dir = converted_model("qwen3_next")
    engine = jaxmoe.load(model_dir, cache_slots=6, policy="presched", speculate="auto")
    assert engine.generate(PROMPT, NEW_TOKENS).generated_ids == expected
