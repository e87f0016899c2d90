"""Qwen3.5-MoE (`qwen3_5_moe`, e.g. Qwen3.5-35B-A3B / 122B-A10B / 397B-A17B): its language model, the Qwen3-Next
hybrid (convert.families.qwen3_next) with these differences, as transformers 5.25 has them:

- The Hub's config.json is the multimodal `Qwen3_5MoeConfig`: the language model's fields sit under `text_config`
  (tie_word_embeddings, dtype and quantization_config at the top level), a vision tower under `vision_config`.
  A text-only `Qwen3_5MoeForCausalLM` checkpoint (`qwen3_5_moe_text`) has the same fields at the top level.
- Keys: `model.language_model.*` (the text-only class writes `model.*`; transformers loads either into it, and so do
  we), `lm_head.weight`; the vision tower `model.visual.*` and the multi-token-prediction module `mtp.*` are skipped.
- Gated DeltaNet takes four projections, `in_proj_qkv` (q | k | v, each over all heads, the convolution's channel
  order), `in_proj_z`, `in_proj_b`, `in_proj_a` (per value head), where Qwen3-Next fuses them per key head; the
  math is the same, so the key rules lay their columns out as our fused `in_proj_qkvz` / `in_proj_ba`
  (`KeyRule.into`).
- Routed experts: the Hub stores one stacked `experts.gate_up_proj` [E, 2f, d] and `experts.down_proj` [E, d, f] per
  layer (`stacked_expert_rules`); `save_pretrained` writes per-expert keys. Either converts.
- Every layer is MoE (no `decoder_sparse_step` / `mlp_only_layers`) and the router always renormalizes its top-k.
- RoPE is multimodal (`mrope_section`, `mrope_interleaved`): temporal, height and width positions each drive
  some frequencies. For text all three are the token's position, so it is plain RoPE over the first
  `head_dim * partial_rotary_factor` of each head; image and video input is not supported.
"""

from __future__ import annotations

import dataclasses

from convert.families.common import (
    gqa_rules, global_rules, layer_norm_rules, refuse_quantized,
)
from convert.families.qwen3_next import hybrid_fields, shared_moe_rules
from convert.keymap import KeyRule
from jaxmoe.config import ModelConfig
from jaxmoe.errors import JaxmoeError

MODEL_TYPE = "qwen3_5_moe"
TEXT_MODEL_TYPE = "qwen3_5_moe_text"
# the multimodal config's fields that apply to its language model, kept over text_config's
TOP_LEVEL_FIELDS = ("tie_word_embeddings", "quantization_config")
HUB_PREFIX = "model.language_model."  # the Hub's (and Qwen3_5MoeForConditionalGeneration's) text-model keys
SKIPPED_PREFIXES = ("model.visual.", "mtp.")


def text_config_of(hf: dict) -> dict:
    """The language model's fields: `text_config` of the multimodal config (with the top-level fields that belong
    to it: TOP_LEVEL_FIELDS, and dtype where text_config lacks one), or the text-only config itself."""
    if hf.get("model_type") == TEXT_MODEL_TYPE:
        return hf
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise JaxmoeError(f"config.json: {MODEL_TYPE} checkpoint lacks required field 'text_config'")
    merged = {**text, **{k: hf[k] for k in TOP_LEVEL_FIELDS if k in hf}}
    for name in ("dtype", "torch_dtype"):
        if merged.get(name) is None and hf.get(name) is not None:
            merged[name] = hf[name]
    return merged


def config_from_hf(hf: dict, dtype: str) -> ModelConfig:
    text = text_config_of(hf)
    refuse_quantized(text)
    fields = hybrid_fields(text, hf.get("model_type", MODEL_TYPE), dtype)
    return ModelConfig(**fields, moe_layers=(True,) * fields["num_layers"], norm_topk_prob=True)


def qkvz_columns(cfg: ModelConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Where `in_proj_qkv`'s and `in_proj_z`'s output columns go in our `in_proj_qkvz` (per key head h, of width
    W = 2 dk + 2 r dv: q [dk], k [dk], v [r dv], z [r dv]; value heads h r .. h r + r - 1 belong to key head h).
    in_proj_qkv's columns are q (nk dk) | k (nk dk) | v (nv dv), head-major; in_proj_z's are nv dv."""
    nk, dk, dv = cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    group_width = cfg.linear_num_value_heads // nk * dv  # r dv
    width = 2 * dk + 2 * group_width

    def block(offset: int, size: int) -> list[int]:
        return [h * width + offset + i for h in range(nk) for i in range(size)]

    qkv = block(0, dk) + block(dk, dk) + block(2 * dk, group_width)
    return tuple(qkv), tuple(block(2 * dk + group_width, group_width))


def ba_columns(cfg: ModelConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Where `in_proj_b`'s and `in_proj_a`'s columns (one per value head) go in our `in_proj_ba` (per key head:
    b [r], a [r])."""
    r = cfg.linear_num_value_heads // cfg.linear_num_key_heads
    heads = range(cfg.linear_num_key_heads)
    b = [h * 2 * r + m for h in heads for m in range(r)]
    return tuple(b), tuple(i + r for i in b)


def linear_attention_rules(cfg: ModelConfig) -> list[KeyRule]:
    """Gated DeltaNet `linear_attn.*` -> `attn.*` (jaxmoe.gated_delta.GatedDeltaNet), the four input projections
    laid out per key head."""
    p, t = "model.layers.{layer}.linear_attn", "layers.{layer}.attn"
    qkv, z = qkvz_columns(cfg)
    b, a = ba_columns(cfg)
    return [
        KeyRule(f"{p}.in_proj_qkv.weight", f"{t}.in_proj_qkvz", transpose=True, into=qkv),
        KeyRule(f"{p}.in_proj_z.weight", f"{t}.in_proj_qkvz", transpose=True, into=z),
        KeyRule(f"{p}.in_proj_b.weight", f"{t}.in_proj_ba", transpose=True, into=b),
        KeyRule(f"{p}.in_proj_a.weight", f"{t}.in_proj_ba", transpose=True, into=a),
        KeyRule(f"{p}.out_proj.weight", f"{t}.out_proj", transpose=True),
        KeyRule(f"{p}.conv1d.weight", f"{t}.conv_weight"),  # [conv_dim, 1, K], channels q | k | v as in_proj_qkv
        KeyRule(f"{p}.A_log", f"{t}.A_log"),
        KeyRule(f"{p}.dt_bias", f"{t}.dt_bias"),
        KeyRule(f"{p}.norm.weight", f"{t}.norm.scale"),
    ]


def stacked_expert_rules() -> list[KeyRule]:
    """The routed experts as the Hub's Qwen3.5 checkpoints store them, one stacked tensor per layer in the layout of
    transformers' Qwen3_5MoeExperts: `experts.gate_up_proj` [E, 2f, d] (each expert's gate rows, then its up rows)
    and `experts.down_proj` [E, d, f]. A checkpoint written by `save_pretrained` has per-expert keys instead
    (`shared_moe_rules`); each converts."""
    hf, ours = "model.layers.{layer}.mlp.experts", "layers.{layer}.moe.experts"
    return [KeyRule(f"{hf}.gate_up_proj", f"{ours}.w_gate", transpose=True, chunk=(0, 2)),
            KeyRule(f"{hf}.gate_up_proj", f"{ours}.w_up", transpose=True, chunk=(1, 2)),
            KeyRule(f"{hf}.down_proj", f"{ours}.w_down", transpose=True)]


def under_hub_prefix(rule: KeyRule) -> KeyRule:
    """`rule` for the multimodal checkpoint's key, `model.X` -> `model.language_model.X` (lm_head.* unchanged)."""
    if not rule.hf.startswith("model."):
        return rule
    return dataclasses.replace(rule, hf=HUB_PREFIX + rule.hf[len("model."):])


def key_rules(cfg: ModelConfig) -> list[KeyRule]:
    """The text model's rules for the Hub's `model.language_model.*` keys, then for the text-only `model.*` keys
    (a checkpoint uses one set; a parameter filled by both is refused as filled twice); `lm_head.weight` once."""
    rules = global_rules(cfg.tie_word_embeddings) + layer_norm_rules()
    rules += gqa_rules(cfg.attention_bias, cfg.attention_out_bias, qk_norm=True) + linear_attention_rules(cfg)
    rules += shared_moe_rules() + stacked_expert_rules()
    return [under_hub_prefix(rule) for rule in rules] + [rule for rule in rules if rule.hf.startswith("model.")]


def is_skipped_key(cfg: ModelConfig, key: str) -> bool:
    """The vision tower (`model.visual.*`) and the multi-token-prediction module (`mtp.*`): not text generation."""
    return key.startswith(SKIPPED_PREFIXES)
