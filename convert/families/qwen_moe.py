"""Qwen2-MoE and Qwen3-MoE.

Qwen2-MoE: q/k/v bias, a shared expert behind a sigmoid gate, `norm_topk_prob` usually false.
Qwen3-MoE: per-head q/k RMSNorm, explicit `head_dim`, no shared expert.
Both: `decoder_sparse_step` / `mlp_only_layers` choose which layers are dense.
"""

from convert.families.common import (
    common_fields, expert_rules, global_rules, gqa_rules, layer_norm_rules, mlp_rules, refuse_quantized, require,
    router_rules,
    sparse_layer_flags,
)
from convert.keymap import KeyRule
from jaxmoe.config import ModelConfig


def _moe_fields(hf: dict, family: str, dtype: str) -> dict:
    refuse_quantized(hf)
    fields = common_fields(hf, family, dtype)
    return dict(
        fields,
        moe_layers=sparse_layer_flags(hf, fields["num_layers"]),
        num_experts=require(hf, "num_experts", family, "num_local_experts"),
        num_experts_per_tok=require(hf, "num_experts_per_tok", family),
        moe_intermediate_size=require(hf, "moe_intermediate_size", family),
        dense_intermediate_size=hf.get("intermediate_size") or 0,
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
    )


def qwen2_config_from_hf(hf: dict, dtype: str) -> ModelConfig:
    fields = _moe_fields(hf, "qwen2_moe", dtype)
    shared = hf.get("shared_expert_intermediate_size") or 0
    return ModelConfig(
        **fields,
        attention_bias=bool(hf.get("qkv_bias", True)),
        shared_intermediate_size=shared,
        shared_expert_gated=shared > 0,
    )


def qwen3_config_from_hf(hf: dict, dtype: str) -> ModelConfig:
    fields = _moe_fields(hf, "qwen3_moe", dtype)
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(**fields, qk_norm="head", attention_bias=bias, attention_out_bias=bias)


def _ffn_rules(cfg: ModelConfig) -> list[KeyRule]:
    mlp = "model.layers.{layer}.mlp"
    rules = router_rules(f"{mlp}.gate") + expert_rules(f"{mlp}.experts")
    if not all(cfg.moe_layers):
        rules += mlp_rules(mlp, "layers.{layer}.mlp")
    return rules


def qwen2_key_rules(cfg: ModelConfig) -> list[KeyRule]:
    mlp = "model.layers.{layer}.mlp"
    rules = global_rules(cfg.tie_word_embeddings) + layer_norm_rules()
    rules += gqa_rules(qkv_bias=cfg.attention_bias) + _ffn_rules(cfg)
    if cfg.shared_intermediate_size:
        rules += mlp_rules(f"{mlp}.shared_expert", "layers.{layer}.moe.shared")
        rules.append(KeyRule(f"{mlp}.shared_expert_gate.weight", "layers.{layer}.moe.shared_gate", transpose=True))
    return rules


def qwen3_key_rules(cfg: ModelConfig) -> list[KeyRule]:
    rules = global_rules(cfg.tie_word_embeddings) + layer_norm_rules()
    return rules + gqa_rules(cfg.attention_bias, cfg.attention_out_bias, qk_norm=True) + _ffn_rules(cfg)


def qwen3_config_to_hf(cfg: ModelConfig) -> dict:
    """The Hub's Qwen3-MoE config.json for `cfg` (the inverse of qwen3_config_from_hf)."""
    if cfg.qk_norm != "head" or cfg.shared_intermediate_size or cfg.rope_scaling.kind != "default":
        raise ValueError("config is not expressible as qwen3_moe")
    dense = [i for i, moe in enumerate(cfg.moe_layers) if not moe]
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.dense_intermediate_size or cfg.moe_intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size, "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok, "norm_topk_prob": cfg.norm_topk_prob,
        "decoder_sparse_step": 1, "mlp_only_layers": dense, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": None, "max_position_embeddings": cfg.max_position_embeddings,
        "attention_bias": cfg.attention_bias, "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_sliding_window": False, "sliding_window": None, "output_router_logits": False,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_ids[0] if cfg.eos_token_ids else None,
    }
