"""Qwen3.5-MoE (`qwen3_5_moe`): the Hub's multimodal config.json maps (text_config), refusals, vision and
multi-token-prediction tensors skipped, the text-only checkpoint converts to the same model, the logits equal
transformers' multimodal class on text, and the offloaded engine equals the resident one, token for token.
Logits, cached decode and greedy generation against transformers' text model are in test_parity.py (the tiny
model is in tests/hf_models.py: 3 Gated DeltaNet layers, 1 gated attention layer, every layer MoE)."""

import json

import numpy as np
import pytest

import jaxmoe
from convert.converter import convert, model_config_from_hf
from jaxmoe.checkpoint import load_resident
from jaxmoe.errors import JaxmoeError
from tests.hf_models import add_tensors, assert_config_refused
from tests.test_qwen3_next import NEW_TOKENS, PROMPT, check_offloaded_equals_resident

# Qwen/Qwen3.5-35B-A3B's config.json as the Hub ships it, sizes shrunk (in the release: 40 layers, d 2048,
# 16 attention heads of 256 with 2 KV heads, Gated DeltaNet 16 key / 32 value heads of 128, 256 experts top-8
# of width 512, a shared expert of 512, vocab 248320: transformers' Qwen3_5MoeTextConfig defaults)
TEXT = dict(
    model_type="qwen3_5_moe_text", vocab_size=120, hidden_size=64, num_hidden_layers=8, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
    linear_num_key_heads=2, linear_num_value_heads=4, moe_intermediate_size=16, shared_expert_intermediate_size=16,
    num_experts=16, num_experts_per_tok=4, layer_types=["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"],
    full_attention_interval=4, attn_output_gate=True, attention_bias=False, attention_dropout=0.0, hidden_act="silu",
    rms_norm_eps=1e-06, max_position_embeddings=262144, mtp_num_hidden_layers=1, mtp_use_dedicated_embeddings=False,
    rope_parameters=dict(mrope_interleaved=True, mrope_section=[2, 1, 1], rope_type="default", rope_theta=10000000,
                         partial_rotary_factor=0.25),
    router_aux_loss_coef=0.001, output_router_logits=False, use_cache=True, tie_word_embeddings=False,
    bos_token_id=None, eos_token_id=248044, dtype="bfloat16",
)
HUB = dict(
    architectures=["Qwen3_5MoeForConditionalGeneration"], model_type="qwen3_5_moe", text_config=TEXT,
    vision_config=dict(model_type="qwen3_5_moe_vision", depth=2, hidden_size=32, intermediate_size=48, num_heads=2,
                       out_hidden_size=64, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                       num_position_embeddings=2304, in_channels=3, hidden_act="gelu_pytorch_tanh"),
    image_token_id=248056, video_token_id=248057, vision_start_token_id=248053, vision_end_token_id=248054,
    tie_word_embeddings=False, transformers_version="4.57.0.dev0",
)


def with_text(**change) -> dict:
    return {**HUB, "text_config": {**TEXT, **change}}


def test_hub_style_config():
    cfg = model_config_from_hf(HUB, None)
    assert cfg.family == "qwen3_5_moe" and cfg.dtype == "bfloat16" and cfg.attention_kind == "gqa"
    assert cfg.linear_layers == (True, True, True, False) * 2
    linear = (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim,
              cfg.linear_conv_kernel)
    assert linear == (2, 4, 16, 16, 4)
    # multimodal RoPE on text: plain RoPE over a quarter of each head
    assert cfg.head_dim == 32 and cfg.rotary_dim == 8 and cfg.rope_theta == 1e7 and cfg.rope_scaling.kind == "default"
    assert cfg.attention_output_gate and cfg.qk_norm == "head" and cfg.norm_unit_offset and not cfg.attention_bias
    assert cfg.moe_layers == (True,) * 8 and cfg.num_experts == 16 and cfg.num_experts_per_tok == 4
    assert cfg.router_scoring == "softmax" and cfg.norm_topk_prob
    assert cfg.shared_intermediate_size == 16 and cfg.shared_expert_gated and cfg.moe_intermediate_size == 16
    assert cfg.eos_token_ids == (248044,) and cfg.vocab_size == 120 and not cfg.tie_word_embeddings
    # the text-only model's config (Qwen3_5MoeForCausalLM) is text_config at the top level
    text_only = model_config_from_hf(TEXT, None)
    assert text_only.family == "qwen3_5_moe_text" and text_only == cfg.__class__(**{
        **{f: getattr(cfg, f) for f in cfg.__slots__}, "family": "qwen3_5_moe_text"})
    # tying and the dtype are the multimodal config's top-level fields
    tied = model_config_from_hf({**with_text(dtype=None), "tie_word_embeddings": True, "dtype": "float32"}, None)
    assert tied.tie_word_embeddings and tied.dtype == "float32"
    # fields left out take transformers' defaults: every 4th layer full attention, a quarter of each head rotated
    bare = {k: v for k, v in TEXT.items() if k not in ("layer_types", "rope_parameters")}
    defaults = model_config_from_hf({**HUB, "text_config": bare}, None)
    assert defaults.linear_layers == (True, True, True, False) * 2 and defaults.rotary_dim == 8


@pytest.mark.parametrize("config, words", [
    ({**HUB, "quantization_config": {"quant_method": "awq"}}, ["quantization_config", "awq"]),
    ({k: v for k, v in HUB.items() if k != "text_config"}, ["text_config"]),
    (with_text(layer_types=["linear_attention"] * 3), ["layer_types", "num_hidden_layers"]),
    (with_text(layer_types=["linear_attention", "sliding_attention"] * 4), ["layer_types", "sliding_attention"]),
    (with_text(linear_num_value_heads=3), ["linear_num_value_heads", "multiple"]),
    (with_text(shared_expert_intermediate_size=0), ["shared_expert_intermediate_size"]),
    (with_text(hidden_act="gelu"), ["hidden_act"]),
    (with_text(num_experts=None), ["num_experts"]),
    (with_text(rope_parameters=dict(rope_type="mrope_unknown", rope_theta=1e7)), ["rope", "mrope_unknown"]),
])
def test_unsupported_options_are_refused(config, words):
    assert_config_refused(config, words)


def _copy(hf_dir, directory):
    directory.mkdir()
    for f in hf_dir.iterdir():
        (directory / f.name).write_bytes(f.read_bytes())
    return directory


def _drop_tensor(hf_dir, key: str):
    from safetensors.torch import load_file, save_file

    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    shard = str(hf_dir / index["weight_map"].pop(key))
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard)
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))


def test_vision_and_mtp_tensors_skipped(tmp_path, converted_model):
    import torch

    hf_dir, model_dir = converted_model("qwen3_5_moe")
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    assert any(k.startswith("model.visual.") for k in index["weight_map"])  # the tiny checkpoint has a vision tower
    assert all(k.startswith(("model.visual.", "model.language_model.", "lm_head.")) for k in index["weight_map"])
    copy = _copy(hf_dir, tmp_path / "hf")
    add_tensors(copy, {"mtp.fc.weight": torch.zeros(4, 8), "mtp.norm.weight": torch.zeros(4),  # as the Hub ships them
                       "mtp.layers.0.mlp.experts.0.up_proj.weight": torch.zeros(4, 4)}, "mtp.safetensors")
    assert convert(copy, tmp_path / "out", progress=False).linear_layers == (True, False, True, True)
    # the skipped prefixes are exactly those: another unknown text tensor is still refused
    add_tensors(copy, {"model.language_model.layers.0.linear_attn.extra.weight": torch.zeros(4)})
    with pytest.raises(JaxmoeError, match="unused tensor model.language_model.layers.0.linear_attn.extra.weight"):
        convert(copy, tmp_path / "out2", progress=False)


def test_missing_split_projection_is_named(tmp_path, converted_model):
    hf_dir, _ = converted_model("qwen3_5_moe")
    """in_proj_qkvz is filled by two tensors: without in_proj_z its columns are not all filled, and the error
    names the tensor."""
    copy = _copy(hf_dir, tmp_path / "hf")
    _drop_tensor(copy, "model.language_model.layers.2.linear_attn.in_proj_z.weight")
    with pytest.raises(JaxmoeError, match=r"missing tensor model\.language_model\.layers\.2\.linear_attn\.in_proj_z"):
        convert(copy, tmp_path / "out", progress=False)


def _leaves(model_dir) -> dict:
    import jax

    _, _, state = load_resident(model_dir)
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state)}


def test_text_only_checkpoint_converts_to_the_same_model(tmp_path, converted_model):
    """transformers' text model (Qwen3_5MoeForCausalLM, `qwen3_5_moe_text`) loaded from the multimodal checkpoint
    and saved: the same parameters, bit for bit."""
    from transformers import AutoModelForCausalLM

    hf_dir, model_dir = converted_model("qwen3_5_moe")
    text = AutoModelForCausalLM.from_pretrained(hf_dir, dtype="float32")
    assert text.config.model_type == "qwen3_5_moe_text"
    text.save_pretrained(tmp_path / "hf")
    cfg = convert(tmp_path / "hf", tmp_path / "out", progress=False)
    assert cfg.family == "qwen3_5_moe_text"
    ours, theirs = _leaves(model_dir), _leaves(tmp_path / "out")
    assert ours.keys() == theirs.keys()
    for path in ours:
        np.testing.assert_array_equal(ours[path], theirs[path], err_msg=path)


def test_logits_match_the_multimodal_model_on_text(converted_model):
    """transformers' Qwen3_5MoeForConditionalGeneration (multimodal RoPE positions from its own text path) on
    token ids alone: the same logits as ours."""
    import torch
    from flax import nnx
    from transformers import AutoModelForImageTextToText

    from tests.test_parity import full_forward, prompts

    hf_dir, model_dir = converted_model("qwen3_5_moe")
    cfg, graphdef, state = load_resident(model_dir)
    tokens = prompts(cfg.vocab_size, batch=2, length=9, seed=4)
    ours, _ = full_forward(nnx.merge(graphdef, state), tokens)
    hf = AutoModelForImageTextToText.from_pretrained(hf_dir, dtype="float32").eval()
    assert type(hf).__name__ == "Qwen3_5MoeForConditionalGeneration"
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    assert np.abs(ours - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


@pytest.fixture(scope="module")
def expected(converted_model):
    _, model_dir = converted_model("qwen3_5_moe")
    ids = jaxmoe.load(model_dir).generate(PROMPT, NEW_TOKENS).generated_ids
    assert len(ids) == NEW_TOKENS
    return ids


# 4 MoE layers x 6 experts = 24; top-2. Whole-token steps with 7 slots miss and are redone layer by layer
@pytest.mark.parametrize("slots, policy, speculate", [(2, "on-demand", "off"), (5, "presched", "off"),
                                                      (7, "presched", "on"), (24, "on-demand", "on")])
def test_offloaded_equals_resident(converted_model, expected, slots, policy, speculate):
    check_offloaded_equals_resident(converted_model("qwen3_5_moe")[1], expected, slots, policy, speculate)


def test_hub_stacked_experts_convert_to_the_same_model(tmp_path, converted_model):
    """The Hub's checkpoints hold each layer's routed experts as one `experts.gate_up_proj` [E, 2f, d] and one
    `experts.down_proj` [E, d, f], transformers' own parameters (save_pretrained splits them per expert). Written
    from transformers' state dict as they are: the same parameters, bit for bit, as the per-expert checkpoint."""
    import torch
    from safetensors.torch import save_file

    from tests.hf_models import build_hf_model

    hf_dir, model_dir = converted_model("qwen3_5_moe")
    state = build_hf_model("qwen3_5_moe").state_dict()  # the same seed as the converted_model fixture's checkpoint
    stacked = {k: v.contiguous() for k, v in state.items() if not k.startswith("model.visual.")}
    assert stacked["model.language_model.layers.0.mlp.experts.gate_up_proj"].dim() == 3
    assert not any(".experts.0." in k for k in stacked)
    hub = tmp_path / "hub"
    hub.mkdir()
    save_file(stacked, str(hub / "model.safetensors"))
    (hub / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    convert(hub, tmp_path / "out", progress=False)
    ours, theirs = _leaves(model_dir), _leaves(tmp_path / "out")
    assert ours.keys() == theirs.keys()
    for path in ours:
        np.testing.assert_array_equal(ours[path], theirs[path], err_msg=path)
    # gate and up are the two halves of each expert's rows: swapped, the weights differ
    swapped = dict(stacked)
    gate_up = stacked["model.language_model.layers.0.mlp.experts.gate_up_proj"]
    swapped["model.language_model.layers.0.mlp.experts.gate_up_proj"] = torch.cat(gate_up.chunk(2, dim=1)[::-1], 1)
    (tmp_path / "swapped").mkdir()
    save_file(swapped, str(tmp_path / "swapped" / "model.safetensors"))
    (tmp_path / "swapped" / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    convert(tmp_path / "swapped", tmp_path / "out-swapped", progress=False)
    assert any((_leaves(tmp_path / "out-swapped")[p] != ours[p]).any() for p in ours if "w_gate" in p)
