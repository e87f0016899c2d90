"""OLMoE: RMSNorm over the full q and k projections (before splitting heads), softmax top-k routing."""

from convert.families.common import (
    common_fields, expert_rules, global_rules, gqa_rules, layer_norm_rules, refuse_quantized, require, router_rules,
)
from jaxmoe.config import ModelConfig

MODEL_TYPE = "olmoe"


def config_from_hf(hf: dict, dtype: str) -> ModelConfig:
    refuse_quantized(hf)
    fields = common_fields(hf, MODEL_TYPE, dtype)
    if hf.get("clip_qkv") is not None:
        from jaxmoe.errors import JaxmoeError

        raise JaxmoeError("config.json: olmoe clip_qkv is not supported")
    return ModelConfig(
        **fields,
        moe_layers=(True,) * fields["num_layers"],
        num_experts=require(hf, "num_experts", MODEL_TYPE, "num_local_experts"),
        num_experts_per_tok=require(hf, "num_experts_per_tok", MODEL_TYPE),
        moe_intermediate_size=require(hf, "intermediate_size", MODEL_TYPE),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        qk_norm="full",
        attention_bias=bool(hf.get("attention_bias", False)),
    )


def key_rules(cfg: ModelConfig):
    mlp = "model.layers.{layer}.mlp"
    return (
        global_rules(cfg.tie_word_embeddings)
        + layer_norm_rules()
        + gqa_rules(qkv_bias=cfg.attention_bias, qk_norm=True)
        + router_rules(f"{mlp}.gate")
        + expert_rules(f"{mlp}.experts")
    )
