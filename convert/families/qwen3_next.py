"""Qwen3-Next (`qwen3_next`, e.g. Qwen3-Next-80B-A3B): Gated DeltaNet and gated attention layers, Qwen MoE.

Token mixers: `layer_types` lists "linear_attention" (Gated DeltaNet, jaxmoe.gated_delta) or "full_attention"
per layer; without it every `full_attention_interval`-th layer (default 4) is full attention. Full attention:
grouped KV heads, q_proj emitting per head a query and an output gate (sigmoid(gate) * attention before
o_proj), per-head q/k RMSNorm, RoPE over the first `head_dim * partial_rotary_factor` (default 0.25) of each
head, bias on q/k/v/o when `attention_bias`.
Norms: the layer, final and q/k RMSNorms scale by (1 + weight) in float32 (zero-centered weights); the gated
RMSNorm inside Gated DeltaNet scales by its plain weight.
MoE: softmax top-k with `norm_topk_prob`, one shared expert behind a sigmoid gate (as Qwen2-MoE);
`decoder_sparse_step` / `mlp_only_layers` choose the dense layers. Checkpoint keys are the Hub's per-expert
layout, which transformers' `save_pretrained` also writes. The Hub checkpoints carry a multi-token-prediction
module (`mtp.*`) that transformers does not load, and neither do we.
"""

from __future__ import annotations

from convert.families.common import (
    common_fields, expert_rules, global_rules, gqa_rules, layer_norm_rules, mlp_rules, partial_rotary_dim,
    refuse_quantized, require, router_rules, sparse_layer_flags,
)
from convert.keymap import KeyRule
from jaxmoe.config import ModelConfig
from jaxmoe.errors import JaxmoeError

MODEL_TYPE = "qwen3_next"
# transformers' Qwen3NextConfig defaults for the fields a config.json may leave out
DEFAULTS = dict(head_dim=256, partial_rotary_factor=0.25, full_attention_interval=4, intermediate_size=5632,
                shared_expert_intermediate_size=512, norm_topk_prob=True, linear_conv_kernel_dim=4,
                linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=32)
LAYER_TYPES = ("linear_attention", "full_attention")


def _get(hf: dict, key: str):
    value = hf.get(key)
    return DEFAULTS[key] if value is None else value


def linear_layer_flags(hf: dict, num_layers: int, family: str = MODEL_TYPE) -> tuple[bool, ...]:
    """Per layer: Gated DeltaNet (True) or full attention, from `layer_types` or `full_attention_interval`."""
    types = hf.get("layer_types")
    if types is None:
        interval = int(_get(hf, "full_attention_interval"))
        if interval < 1:
            raise JaxmoeError(f"config.json: {family} full_attention_interval {interval} must be >= 1")
        return tuple((i + 1) % interval != 0 for i in range(num_layers))
    if len(types) != num_layers:
        raise JaxmoeError(f"config.json: {family} layer_types has {len(types)} entries, num_hidden_layers is {num_layers}")
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown:
        raise JaxmoeError(f"config.json: {family} layer_types {unknown} not supported; expected {', '.join(LAYER_TYPES)}")
    return tuple(t == "linear_attention" for t in types)


def linear_fields(hf: dict, family: str = MODEL_TYPE) -> dict:
    fields = dict(
        linear_num_key_heads=int(_get(hf, "linear_num_key_heads")),
        linear_num_value_heads=int(_get(hf, "linear_num_value_heads")),
        linear_key_head_dim=int(_get(hf, "linear_key_head_dim")),
        linear_value_head_dim=int(_get(hf, "linear_value_head_dim")),
        linear_conv_kernel=int(_get(hf, "linear_conv_kernel_dim")),
    )
    if fields["linear_num_key_heads"] < 1 or fields["linear_num_value_heads"] % fields["linear_num_key_heads"]:
        raise JaxmoeError(f"config.json: {family} linear_num_value_heads {fields['linear_num_value_heads']} is not a "
                          f"multiple of linear_num_key_heads {fields['linear_num_key_heads']}")
    if fields["linear_conv_kernel"] < 1:
        raise JaxmoeError(f"config.json: {family} linear_conv_kernel_dim {fields['linear_conv_kernel']} must be >= 1")
    return fields


def config_from_hf(hf: dict, dtype: str) -> ModelConfig:
    refuse_quantized(hf)
    fields = hybrid_fields(hf, MODEL_TYPE, dtype)
    fields.update(
        moe_layers=sparse_layer_flags(hf, fields["num_layers"]),
        dense_intermediate_size=int(_get(hf, "intermediate_size")),
        norm_topk_prob=bool(_get(hf, "norm_topk_prob")),
    )
    return ModelConfig(**fields)


def hybrid_fields(hf: dict, family: str, dtype: str) -> dict:
    """ModelConfig fields Qwen3-Next and Qwen3.5-MoE read alike: Gated DeltaNet and gated attention layers, routed
    experts with a gated shared expert, zero-centered norms (all but which layers are MoE and top-k renormalizing)."""
    fields = common_fields(hf, family, dtype)
    fields["head_dim"] = int(_get(hf, "head_dim"))
    shared = int(_get(hf, "shared_expert_intermediate_size"))
    if shared < 1:
        raise JaxmoeError(f"config.json: {family} shared_expert_intermediate_size {shared} must be > 0")
    num_experts = int(require(hf, "num_experts", family))
    if num_experts < 1:
        raise JaxmoeError(f"config.json: {family} num_experts {num_experts} must be > 0 (a model without experts)")
    bias = bool(hf.get("attention_bias", False))
    return dict(
        fields,
        num_experts=num_experts,
        num_experts_per_tok=int(require(hf, "num_experts_per_tok", family)),
        moe_intermediate_size=int(require(hf, "moe_intermediate_size", family)),
        **linear_fields(hf, family),
        linear_layers=linear_layer_flags(hf, fields["num_layers"], family),
        rotary_dim=partial_rotary_dim(hf, fields["head_dim"], family, DEFAULTS["partial_rotary_factor"]),
        qk_norm="head",
        attention_output_gate=True,
        attention_bias=bias,
        attention_out_bias=bias,
        norm_unit_offset=True,
        shared_intermediate_size=shared,
        shared_expert_gated=True,
    )


def linear_attention_rules() -> list[KeyRule]:
    """Gated DeltaNet: `linear_attn.*` -> `attn.*` (jaxmoe.gated_delta.GatedDeltaNet's parameters)."""
    p, t = "model.layers.{layer}.linear_attn", "layers.{layer}.attn"
    rules = [KeyRule(f"{p}.{n}.weight", f"{t}.{n}", transpose=True) for n in ("in_proj_qkvz", "in_proj_ba", "out_proj")]
    return rules + [
        KeyRule(f"{p}.conv1d.weight", f"{t}.conv_weight"),  # [conv_dim, 1, K] kept in torch's layout
        KeyRule(f"{p}.A_log", f"{t}.A_log"),
        KeyRule(f"{p}.dt_bias", f"{t}.dt_bias"),
        KeyRule(f"{p}.norm.weight", f"{t}.norm.scale"),
    ]


def shared_moe_rules() -> list[KeyRule]:
    """Router, per-expert weights, shared expert and its sigmoid gate under `model.layers.{layer}.mlp`."""
    mlp = "model.layers.{layer}.mlp"
    rules = router_rules(f"{mlp}.gate") + expert_rules(f"{mlp}.experts")
    rules += mlp_rules(f"{mlp}.shared_expert", "layers.{layer}.moe.shared")
    rules.append(KeyRule(f"{mlp}.shared_expert_gate.weight", "layers.{layer}.moe.shared_gate", transpose=True))
    return rules


def key_rules(cfg: ModelConfig) -> list[KeyRule]:
    rules = global_rules(cfg.tie_word_embeddings) + layer_norm_rules()
    rules += gqa_rules(cfg.attention_bias, cfg.attention_out_bias, qk_norm=True) + linear_attention_rules()
    rules += shared_moe_rules()
    if not all(cfg.moe_layers):
        rules += mlp_rules("model.layers.{layer}.mlp", "layers.{layer}.mlp")
    return rules


def is_mtp_module_key(cfg: ModelConfig, key: str) -> bool:
    """The Hub checkpoints' multi-token-prediction module (`mtp.fc`, `mtp.layers.*`, `mtp.norm`, ...)."""
    return key.startswith("mtp.")
