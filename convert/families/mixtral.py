"""Mixtral: GQA attention, softmax top-k routing renormalized over the chosen experts."""

from convert.families.common import (
    common_fields, expert_rules, global_rules, gqa_rules, layer_norm_rules, refuse_quantized, require, router_rules,
)
from jaxmoe.config import ModelConfig

MODEL_TYPE = "mixtral"


def config_from_hf(hf: dict, dtype: str) -> ModelConfig:
    refuse_quantized(hf)
    fields = common_fields(hf, MODEL_TYPE, dtype)
    return ModelConfig(
        **fields,
        moe_layers=(True,) * fields["num_layers"],
        num_experts=require(hf, "num_local_experts", MODEL_TYPE, "num_experts"),
        num_experts_per_tok=require(hf, "num_experts_per_tok", MODEL_TYPE),
        moe_intermediate_size=require(hf, "intermediate_size", MODEL_TYPE),
        norm_topk_prob=True,
    )


def key_rules(cfg: ModelConfig):
    moe = "model.layers.{layer}.block_sparse_moe"
    return (
        global_rules(cfg.tie_word_embeddings)
        + layer_norm_rules()
        + gqa_rules()
        + router_rules(f"{moe}.gate")
        + expert_rules(f"{moe}.experts", names=("w1", "w3", "w2"))
    )
