"""OpenAI GPT-OSS (`gpt_oss`: gpt-oss-20b, gpt-oss-120b): GQA attention with sinks and sliding windows,
biased clamped-SwiGLU experts.

Attention: grouped KV heads, bias on q/k/v/o (`attention_bias`), a learned per-head sink logit in every
softmax's denominator, YaRN RoPE over whole heads (halves rotated), and on the layers `layer_types` marks
"sliding_attention" only the last `sliding_window` positions (transformers' default alternates, layer 0
windowed).
MoE: every layer; the router adds a bias to its logits, takes the top-k logits and softmaxes over them (the
same weights as a softmax over all experts renormalized over the chosen: `norm_topk_prob`). Each expert is
`ExpertFFN("gpt_oss")` with biases: the checkpoint's fused `gate_up_proj` [E, d, 2f] interleaves gate and
up columns (gate = [..., ::2], up = [..., 1::2]) and is stored [in, out] already, as is `down_proj`
[E, f, d].
The Hub checkpoints ship the expert matrices as MXFP4 (`quantization_config.quant_method` "mxfp4", tensors
`*_blocks` / `*_scales`); the converter dequantizes them (`convert.mxfp4`) exactly as transformers does.
"""

from __future__ import annotations

from convert.families.common import common_fields, global_rules, gqa_rules, layer_norm_rules, quant_method, require
from convert.keymap import KeyRule
from jaxmoe.config import ModelConfig
from jaxmoe.errors import JaxmoeError

MODEL_TYPE = "gpt_oss"
LAYER_TYPES = ("sliding_attention", "full_attention")
# transformers' GptOssConfig defaults for the fields a config.json may leave out
DEFAULTS = dict(sliding_window=128, swiglu_alpha=1.702, swiglu_limit=7.0, attention_bias=True)


def _get(hf: dict, key: str):
    return DEFAULTS[key] if key not in hf else hf[key]


def _sliding_layers(hf: dict, num_layers: int) -> tuple[bool, ...]:
    types = hf.get("layer_types")
    if types is None:  # transformers' default: windowed, full, windowed, ...
        return tuple(i % 2 == 0 for i in range(num_layers))
    if not isinstance(types, list) or len(types) != num_layers or any(t not in LAYER_TYPES for t in types):
        raise JaxmoeError(
            f"config.json: {MODEL_TYPE} layer_types must list {num_layers} entries of {' / '.join(LAYER_TYPES)}, got {types!r}"
        )
    return tuple(t == "sliding_attention" for t in types)


def config_from_hf(hf: dict, dtype: str) -> ModelConfig:
    method = quant_method(hf)
    if method not in (None, "mxfp4"):
        raise JaxmoeError(f"config.json: quantization_config ({method}) is not supported; {MODEL_TYPE} converts from "
                          f"mxfp4 (the Hub's checkpoints) or bfloat16")
    fields = common_fields(hf, MODEL_TYPE, dtype)
    num_layers = fields["num_layers"]
    window = _get(hf, "sliding_window")
    sliding = _sliding_layers(hf, num_layers)
    if window is None:
        sliding = (False,) * num_layers  # transformers: no window anywhere
    elif not (isinstance(window, int) and window > 0):
        raise JaxmoeError(f"config.json: {MODEL_TYPE} sliding_window must be a positive integer, got {window!r}")
    limit = _get(hf, "swiglu_limit")
    if limit is None or float(limit) <= 0:
        raise JaxmoeError(f"config.json: {MODEL_TYPE} swiglu_limit must be positive, got {limit!r}")
    attention_bias = bool(_get(hf, "attention_bias"))
    return ModelConfig(
        **fields,
        moe_layers=(True,) * num_layers,
        num_experts=int(require(hf, "num_local_experts", MODEL_TYPE, "num_experts")),
        num_experts_per_tok=int(require(hf, "num_experts_per_tok", MODEL_TYPE, "experts_per_token")),
        moe_intermediate_size=int(require(hf, "intermediate_size", MODEL_TYPE)),
        attention_bias=attention_bias,
        attention_out_bias=attention_bias,
        attention_sinks=True,
        norm_float32_scale=True,
        sliding_window=window if any(sliding) else None,
        sliding_layers=sliding if any(sliding) else (),
        norm_topk_prob=True,
        router_logit_bias=True,
        expert_activation="gpt_oss",
        expert_bias=True,
        swiglu_alpha=float(_get(hf, "swiglu_alpha")),
        swiglu_limit=float(limit),
    )


def key_rules(cfg: ModelConfig) -> list[KeyRule]:
    attn, mlp, experts = "model.layers.{layer}.self_attn", "model.layers.{layer}.mlp", "layers.{layer}.moe.experts"
    rules = global_rules(cfg.tie_word_embeddings) + layer_norm_rules()
    rules += gqa_rules(qkv_bias=cfg.attention_bias, out_bias=cfg.attention_out_bias)
    rules += [
        KeyRule(f"{attn}.sinks", "layers.{layer}.attn.sinks"),
        KeyRule(f"{mlp}.router.weight", "layers.{layer}.moe.router", transpose=True),
        KeyRule(f"{mlp}.router.bias", "layers.{layer}.moe.router_logit_bias"),
        # gate and up interleaved in one [E, d, 2f] tensor (and its [E, 2f] bias): even columns gate, odd up
        KeyRule(f"{mlp}.experts.gate_up_proj", f"{experts}.w_gate", columns=(0, 2)),
        KeyRule(f"{mlp}.experts.gate_up_proj", f"{experts}.w_up", columns=(1, 2)),
        KeyRule(f"{mlp}.experts.gate_up_proj_bias", f"{experts}.b_gate", columns=(0, 2)),
        KeyRule(f"{mlp}.experts.gate_up_proj_bias", f"{experts}.b_up", columns=(1, 2)),
        KeyRule(f"{mlp}.experts.down_proj", f"{experts}.w_down"),
        KeyRule(f"{mlp}.experts.down_proj_bias", f"{experts}.b_down"),
    ]
    return rules
