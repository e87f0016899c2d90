"""MiniMax-M2 (`minimax_m2`): GQA attention with whole-projection q/k norm and partial RoPE, sigmoid routing.

Attention: grouped KV heads without biases; q and k each RMSNorm-ed over the whole projection
(num_heads * head_dim and num_kv_heads * head_dim wide, `qk_norm_type` "per_layer") before the split into
heads, as OLMoE (`ModelConfig.qk_norm` "full"); RoPE over only the first `rotary_dim` of each head (halves
rotated). The Hub's config.json gives the absolute `rotary_dim`; transformers >= 5 turns it into
`partial_rotary_factor` = rotary_dim / head_dim, and a factor written in the config wins over it.
MoE in every layer, no shared expert: sigmoid scores, `e_score_correction_bias` added for the top-k
selection only, the chosen (unbiased) scores renormalized to sum 1; no groups, no scaling factor.
The Hub checkpoint keeps Mixtral's layout (`block_sparse_moe.experts.{e}.w1/w2/w3`, router
`block_sparse_moe.gate`), with the selection bias beside the router (`block_sparse_moe.e_score_correction_bias`);
transformers' `save_pretrained` writes the same layout. `num_mtp_modules` multi-token-prediction modules
(model.layers.{num_hidden_layers}...), if a checkpoint ships them, are skipped as transformers skips them.
"""

from __future__ import annotations

from convert.families.common import (
    common_fields, expert_rules, global_rules, gqa_rules, layer_norm_rules, partial_rotary_dim, refuse_quantized,
    require, router_rules,
)
from convert.keymap import KeyRule
from jaxmoe.config import ModelConfig
from jaxmoe.errors import JaxmoeError

MODEL_TYPE = "minimax_m2"
# transformers' MiniMaxM2Config defaults for the fields a config.json may leave out where ours differ
DEFAULTS = dict(head_dim=128, rope_theta=5000000.0, max_position_embeddings=196608)
FULL_ATTENTION = 1  # `attn_type_list` entry of a softmax-attention layer (0: MiniMax-01's lightning attention)


def _with_defaults(hf: dict) -> dict:
    """hf with transformers' defaults where a field is absent or null (a `rope_parameters` theta still wins)."""
    return {**DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}


def _check_attention(hf: dict, num_layers: int) -> None:
    """Only what transformers' MiniMaxM2Attention computes: softmax attention in every layer, q/k norm over the
    whole projections."""
    kinds = hf.get("attn_type_list")
    if kinds is not None and (len(kinds) != num_layers or any(k != FULL_ATTENTION for k in kinds)):
        raise JaxmoeError(
            f"config.json: {MODEL_TYPE} attn_type_list must hold {FULL_ATTENTION} (full attention) for each of the "
            f"{num_layers} layers; lightning-attention layers are not supported"
        )
    if hf.get("use_qk_norm") is False:
        raise JaxmoeError(f"config.json: {MODEL_TYPE} use_qk_norm false is not supported (transformers always applies q/k norm)")
    norm_type = hf.get("qk_norm_type", "per_layer")
    if norm_type != "per_layer":
        raise JaxmoeError(f"config.json: {MODEL_TYPE} qk_norm_type {norm_type!r} is not supported (only 'per_layer')")


def _check_moe(hf: dict) -> None:
    scoring = hf.get("scoring_func", "sigmoid")
    if scoring != "sigmoid":
        raise JaxmoeError(f"config.json: {MODEL_TYPE} scoring_func {scoring!r} is not supported (only 'sigmoid')")
    if hf.get("shared_intermediate_size"):
        raise JaxmoeError(f"config.json: {MODEL_TYPE} shared_intermediate_size {hf['shared_intermediate_size']} is not "
                          f"supported (no shared expert, as transformers)")


def _rotary_dim(hf: dict, head_dim: int) -> int:
    """The rotated width: a `partial_rotary_factor` if the config has one, else the Hub's `rotary_dim`, else all."""
    legacy = hf.get("rotary_dim")
    if legacy is not None and not (0 < int(legacy) <= head_dim and int(legacy) % 2 == 0):
        raise JaxmoeError(f"config.json: {MODEL_TYPE} rotary_dim {legacy} must be even and in (0, head_dim={head_dim}]")
    default_factor = 1.0 if legacy is None else int(legacy) / head_dim
    return partial_rotary_dim(hf, head_dim, MODEL_TYPE, default_factor)


def config_from_hf(hf: dict, dtype: str) -> ModelConfig:
    refuse_quantized(hf)
    hf = _with_defaults(hf)
    fields = common_fields(hf, MODEL_TYPE, dtype)
    _check_attention(hf, fields["num_layers"])
    _check_moe(hf)
    return ModelConfig(
        **fields,
        moe_layers=(True,) * fields["num_layers"],
        num_experts=int(require(hf, "num_local_experts", MODEL_TYPE, "num_experts")),
        num_experts_per_tok=int(require(hf, "num_experts_per_tok", MODEL_TYPE)),
        moe_intermediate_size=int(require(hf, "intermediate_size", MODEL_TYPE)),
        rotary_dim=_rotary_dim(hf, fields["head_dim"]),
        qk_norm="full",
        router_scoring="sigmoid",
        router_bias=bool(hf.get("use_routing_bias", True)),
        norm_topk_prob=True,
    )


def key_rules(cfg: ModelConfig) -> list[KeyRule]:
    moe = "model.layers.{layer}.block_sparse_moe"
    rules = global_rules(cfg.tie_word_embeddings) + layer_norm_rules() + gqa_rules(qk_norm=True)
    rules += router_rules(f"{moe}.gate") + expert_rules(f"{moe}.experts", names=("w1", "w3", "w2"))
    if cfg.router_bias:
        rules.append(KeyRule(f"{moe}.e_score_correction_bias", "layers.{layer}.moe.router_bias"))
    return rules
