"""Pieces shared by the family adapters: reading HF config fields and the Llama-style key rules."""

from __future__ import annotations

import re

from convert.keymap import KeyRule
from jaxmoe.config import ModelConfig, RopeScaling
from jaxmoe.errors import JaxmoeError
from jaxmoe.rope import ROPE_KINDS


def require(hf: dict, key: str, family: str, *aliases: str):
    """hf[key] (or the first alias present: field names vary between transformers versions)."""
    for name in (key, *aliases):
        if hf.get(name) is not None:
            return hf[name]
    raise JaxmoeError(f"config.json: {family} checkpoint lacks required field {key!r}")


def check_activation(hf: dict) -> None:
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise JaxmoeError(f"config.json: hidden_act {act!r} is not supported (only silu)")


def rope_from_hf(hf: dict) -> tuple[float, RopeScaling]:
    """(theta, scaling) from either `rope_parameters` (transformers >= 5) or `rope_theta` + `rope_scaling`."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_KINDS:
        raise JaxmoeError(f"config.json: rope type {kind!r} is not supported; supported: {', '.join(ROPE_KINDS)}")
    if kind == "default":
        return theta, RopeScaling()
    fields = {f: params[f] for f in RopeScaling.__slots__ if f != "kind" and params.get(f) is not None}
    if kind == "yarn" and "factor" not in fields:
        fields["factor"] = hf["max_position_embeddings"] / params["original_max_position_embeddings"]
    return theta, RopeScaling(kind=kind, **fields)


def partial_rotary_dim(hf: dict, head_dim: int, family: str, default_factor: float) -> int:
    """int(head_dim * partial_rotary_factor), the factor read from `rope_parameters` (transformers >= 5) or the
    top level (the Hub's config.json), else the family's default, as transformers computes the rotated width."""
    factor = (hf.get("rope_parameters") or {}).get("partial_rotary_factor")
    if factor is None:
        factor = hf.get("partial_rotary_factor")
    factor = float(default_factor if factor is None else factor)
    dim = int(head_dim * factor)
    if not (0 < dim <= head_dim and dim % 2 == 0):
        raise JaxmoeError(
            f"config.json: {family} partial_rotary_factor {factor} gives rotary width {dim} of head_dim {head_dim}; "
            f"it must be even and in (0, head_dim]"
        )
    return dim


def eos_ids(hf: dict) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def common_fields(hf: dict, family: str, dtype: str) -> dict:
    """ModelConfig fields every family reads the same way."""
    check_activation(hf)
    theta, scaling = rope_from_hf(hf)
    heads = require(hf, "num_attention_heads", family)
    hidden = require(hf, "hidden_size", family)
    return dict(
        family=family,
        vocab_size=require(hf, "vocab_size", family),
        hidden_size=hidden,
        num_layers=require(hf, "num_hidden_layers", family),
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids(hf),
        dtype=dtype,
    )


def global_rules(tied: bool) -> list[KeyRule]:
    rules = [
        KeyRule("model.embed_tokens.weight", "embed.embedding"),
        KeyRule("model.norm.weight", "final_norm.scale"),
    ]
    if not tied:
        rules.append(KeyRule("lm_head.weight", "lm_head", transpose=True))
    return rules


def layer_norm_rules() -> list[KeyRule]:
    return [
        KeyRule("model.layers.{layer}.input_layernorm.weight", "layers.{layer}.input_norm.scale"),
        KeyRule("model.layers.{layer}.post_attention_layernorm.weight", "layers.{layer}.post_attn_norm.scale"),
    ]


def gqa_rules(qkv_bias: bool = False, out_bias: bool = False, qk_norm: bool = False) -> list[KeyRule]:
    p, t = "model.layers.{layer}.self_attn", "layers.{layer}.attn"
    rules = [KeyRule(f"{p}.{n}_proj.weight", f"{t}.{n}_proj", transpose=True) for n in "qkvo"]
    if qkv_bias:
        rules += [KeyRule(f"{p}.{n}_proj.bias", f"{t}.{n}_bias") for n in "qkv"]
    if out_bias:
        rules.append(KeyRule(f"{p}.o_proj.bias", f"{t}.o_bias"))
    if qk_norm:
        rules += [KeyRule(f"{p}.{n}_norm.weight", f"{t}.{n}_norm.scale") for n in "qk"]
    return rules


def mlp_rules(hf_prefix: str, target_prefix: str, names=("gate_proj", "up_proj", "down_proj")) -> list[KeyRule]:
    """SwiGLU MLP: HF `{hf_prefix}.{gate,up,down}.weight` -> `{target_prefix}.{gate,up,down}_proj`."""
    ours = ("gate_proj", "up_proj", "down_proj")
    return [KeyRule(f"{hf_prefix}.{n}.weight", f"{target_prefix}.{o}", transpose=True) for n, o in zip(names, ours)]


def expert_rules(hf_prefix: str, names=("gate_proj", "up_proj", "down_proj")) -> list[KeyRule]:
    """Per-expert HF keys `{hf_prefix}.{expert}.{name}.weight` -> stacked rows of our expert weights."""
    ours = ("w_gate", "w_up", "w_down")
    return [
        KeyRule(f"{hf_prefix}.{{expert}}.{n}.weight", f"layers.{{layer}}.moe.experts.{o}", transpose=True)
        for n, o in zip(names, ours)
    ]


def sparse_layer_flags(hf: dict, num_layers: int) -> tuple[bool, ...]:
    """Qwen-style `decoder_sparse_step` / `mlp_only_layers` -> per-layer MoE flags."""
    step = hf.get("decoder_sparse_step") or 1
    dense = set(hf.get("mlp_only_layers") or [])
    return tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers))


def router_rules(hf_prefix: str, bias_key: str | None = None) -> list[KeyRule]:
    """Router `{hf_prefix}.weight` [E, d] -> `layers.{layer}.moe.router` [d, E] (+ selection bias)."""
    rules = [KeyRule(f"{hf_prefix}.weight", "layers.{layer}.moe.router", transpose=True)]
    if bias_key:
        rules.append(KeyRule(f"{hf_prefix}.{bias_key}", "layers.{layer}.moe.router_bias"))
    return rules


def refuse_quantized(hf: dict, hint: str) -> None:
    """A checkpoint with a `quantization_config` (fp8, MXFP4, ...) is refused; `hint` says what to convert instead."""
    if hf.get("quantization_config"):
        method = (hf["quantization_config"] or {}).get("quant_method", "?")
        raise JaxmoeError(f"config.json: quantization_config ({method}) is not supported; {hint}")


def sigmoid_group_routing(fields: dict, family: str, norm_topk_prob: bool) -> dict:
    """DeepSeek-V3's routing ("noaux_tc": sigmoid scores, selection bias, groups scored by their top-2 sum) as
    ModelConfig fields, after checking the groups `fields` holds (n_group, topk_group, num_experts)."""
    check_expert_groups(fields, family)
    if fields["num_experts"] // fields["n_group"] < 2:
        raise JaxmoeError(f"config.json: {family} n_group {fields['n_group']} leaves fewer than 2 experts per group")
    return dict(router_scoring="sigmoid", router_bias=True, norm_topk_prob=norm_topk_prob, group_score="top2_sum")


def check_expert_groups(fields: dict, family: str) -> None:
    """Group-limited routing: n_group must divide the routed experts, 1 <= topk_group <= n_group."""
    n_group, topk_group, num_experts = fields["n_group"], fields["topk_group"], fields["num_experts"]
    if n_group < 1 or num_experts % n_group:
        raise JaxmoeError(f"config.json: {family} n_routed_experts {num_experts} is not divisible by n_group {n_group}")
    if not 1 <= topk_group <= n_group:
        raise JaxmoeError(f"config.json: {family} topk_group {topk_group} must be in [1, n_group={n_group}]")


_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")


def is_mtp_key(cfg: ModelConfig, key: str) -> bool:
    """DeepSeek-V3 and GLM-4.5 checkpoints append `num_nextn_predict_layers` multi-token-prediction layers
    (model.layers.{num_hidden_layers}...); generation does not use them, as in transformers."""
    m = _LAYER_KEY.match(key)
    return m is not None and int(m.group(1)) >= cfg.num_layers
