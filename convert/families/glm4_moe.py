"""GLM-4.5 / GLM-4.5-Air / GLM-4.6 (`glm4_moe`): GQA attention with DeepSeek-V3 routing.

Attention: grouped KV heads, bias on q/k/v (not o) when `attention_bias`, per-head q/k RMSNorm when
`use_qk_norm`, and RoPE over only the first `head_dim * partial_rotary_factor` of each head (halves
rotated; transformers defaults the factor to 0.5).
MoE: the first `first_k_dense_replace` layers dense (`intermediate_size`); the others route with
sigmoid scores, `e_score_correction_bias` for selection within the `topk_group` best of `n_group`
groups (top-2 sums), weights renormalized when `norm_topk_prob`, times `routed_scaling_factor`, plus
`n_shared_experts` shared experts fused into one SwiGLU.
The Hub checkpoints append `num_nextn_predict_layers` multi-token-prediction layers, which
transformers does not load and neither do we.
"""

from __future__ import annotations

from convert.families.common import (
    common_fields, expert_rules, global_rules, gqa_rules, layer_norm_rules, mlp_rules, partial_rotary_dim,
    refuse_quantized, require, router_rules, sigmoid_group_routing,
)
from convert.keymap import KeyRule
from jaxmoe.config import ModelConfig
from jaxmoe.errors import JaxmoeError

MODEL_TYPE = "glm4_moe"
# transformers' Glm4MoeConfig defaults for the fields a config.json may leave out
DEFAULTS = dict(first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=1.0, n_group=1, topk_group=1,
                norm_topk_prob=True, partial_rotary_factor=0.5)


def _get(hf: dict, key: str):
    value = hf.get(key)
    return DEFAULTS[key] if value is None else value


def config_from_hf(hf: dict, dtype: str) -> ModelConfig:
    refuse_quantized(hf, "convert a bfloat16 checkpoint")
    fields = common_fields(hf, MODEL_TYPE, dtype)
    first_dense = int(_get(hf, "first_k_dense_replace"))
    moe_layers = tuple(i >= first_dense for i in range(fields["num_layers"]))
    moe_intermediate = int(require(hf, "moe_intermediate_size", MODEL_TYPE))
    dense_intermediate = int(hf.get("intermediate_size") or 0)
    if dense_intermediate == 0 and not all(moe_layers):
        raise JaxmoeError(f"config.json: {MODEL_TYPE} checkpoint with dense layers lacks required field 'intermediate_size'")
    fields.update(
        moe_layers=moe_layers,
        num_experts=int(require(hf, "n_routed_experts", MODEL_TYPE, "num_local_experts")),
        num_experts_per_tok=int(require(hf, "num_experts_per_tok", MODEL_TYPE)),
        moe_intermediate_size=moe_intermediate,
        dense_intermediate_size=dense_intermediate,
        n_group=int(_get(hf, "n_group")),
        topk_group=int(_get(hf, "topk_group")),
        routed_scaling_factor=float(_get(hf, "routed_scaling_factor")),
        shared_intermediate_size=moe_intermediate * int(_get(hf, "n_shared_experts")),
    )
    return ModelConfig(
        **fields,
        rotary_dim=partial_rotary_dim(hf, fields["head_dim"], MODEL_TYPE, DEFAULTS["partial_rotary_factor"]),
        attention_bias=bool(hf.get("attention_bias", False)),
        qk_norm="head" if hf.get("use_qk_norm") else "none",
        **sigmoid_group_routing(fields, MODEL_TYPE, bool(_get(hf, "norm_topk_prob"))),
    )


def key_rules(cfg: ModelConfig) -> list[KeyRule]:
    mlp = "model.layers.{layer}.mlp"
    rules = global_rules(cfg.tie_word_embeddings) + layer_norm_rules()
    rules += gqa_rules(qkv_bias=cfg.attention_bias, qk_norm=cfg.qk_norm == "head")
    rules += router_rules(f"{mlp}.gate", "e_score_correction_bias") + expert_rules(f"{mlp}.experts")
    if cfg.shared_intermediate_size:
        rules += mlp_rules(f"{mlp}.shared_experts", "layers.{layer}.moe.shared")
    if not all(cfg.moe_layers):
        rules += mlp_rules(mlp, "layers.{layer}.mlp")
    return rules
