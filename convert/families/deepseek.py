"""DeepSeek-V2 and DeepSeek-V3: multi-head latent attention, shared experts, group-limited routing.

GLM-4.7-Flash (`glm4_moe_lite`) is V3's architecture under GLM's defaults (routed_scaling_factor 1.8,
q_lora_rank 768, one expert group), with its dense and MoE layers listed in `mlp_layer_types`.

Both: MLA (`q_proj`, or `q_a_proj` + `q_a_layernorm` + `q_b_proj` when `q_lora_rank` is set;
`kv_a_proj_with_mqa` -> latent + rotary key, `kv_a_layernorm`, `kv_b_proj`), interleaved RoPE
over `qk_rope_head_dim` (often YaRN with `mscale_all_dim`), the first `first_k_dense_replace`
layers dense (`intermediate_size`), and `n_shared_experts` shared experts fused into one SwiGLU of
`moe_intermediate_size * n_shared_experts`.

Routing, matching transformers:
  V2: softmax scores; `topk_method` "greedy" (plain top-k) or "group_limited_greedy" (keep the
      `topk_group` groups with the highest max score); no renormalization (transformers ignores
      `norm_topk_prob` for V2); weights times `routed_scaling_factor`.
  V3: sigmoid scores; experts chosen on score + `e_score_correction_bias` within the `topk_group`
      groups with the highest top-2 sum ("noaux_tc"); weights are the unbiased scores, renormalized
      when `norm_topk_prob`, times `routed_scaling_factor`.
"""

from __future__ import annotations

from convert.families.common import (
    check_expert_groups, common_fields, expert_rules, global_rules, layer_norm_rules, mlp_rules, refuse_quantized, require,
    router_rules, sigmoid_group_routing,
)
from convert.keymap import KeyRule
from jaxmoe.config import ModelConfig
from jaxmoe.errors import JaxmoeError

V2, V3, GLM_LITE = "deepseek_v2", "deepseek_v3", "glm4_moe_lite"
V2_TOPK_METHODS = ("greedy", "group_limited_greedy")
V3_TOPK_METHODS = ("noaux_tc",)


# transformers' config-class defaults for fields a config.json may leave out (they differ per family)
DEFAULTS = {
    V2: dict(first_k_dense_replace=0, n_shared_experts=2, routed_scaling_factor=1.0, q_lora_rank=1536,
             n_group=None, topk_group=None),
    V3: dict(first_k_dense_replace=3, n_shared_experts=1, routed_scaling_factor=2.5, q_lora_rank=1536,
             n_group=8, topk_group=4, norm_topk_prob=True, rope_interleave=True),
    GLM_LITE: dict(n_shared_experts=1, routed_scaling_factor=1.8, q_lora_rank=768, n_group=1, topk_group=1,
                   norm_topk_prob=True, rope_interleave=True),
}


def _get(hf: dict, key: str, family: str):
    """hf[key] if present (an explicit null included), else transformers' default for the family."""
    return hf[key] if key in hf else DEFAULTS[family].get(key)


def _int(hf: dict, key: str, family: str, fallback: int) -> int:
    value = _get(hf, key, family)
    return fallback if value is None else int(value)


def _check_choice(hf: dict, key: str, allowed: tuple, default, family: str):
    value = hf.get(key, default)
    if value is None:
        value = default
    if value not in allowed:
        raise JaxmoeError(
            f"config.json: {family} {key} {value!r} is not supported; supported: {', '.join(map(str, allowed))}"
        )
    return value


def _moe_layer_flags(hf: dict, num_layers: int, family: str) -> tuple[bool, ...]:
    """MoE iff layer >= first_k_dense_replace and layer % moe_layer_freq == 0 (DeepSeek's rule); GLM-4.7-Flash
    lists them (`mlp_layer_types`, "dense" / "sparse"; transformers' default: the first layer dense)."""
    if family == GLM_LITE:
        kinds = hf.get("mlp_layer_types") or ["dense"] + ["sparse"] * (num_layers - 1)
        if len(kinds) != num_layers or not set(kinds) <= {"dense", "sparse"}:
            raise JaxmoeError(
                f"config.json: {family} mlp_layer_types must list 'dense' or 'sparse' for each of {num_layers} layers"
            )
        return tuple(kind == "sparse" for kind in kinds)
    first_dense = _int(hf, "first_k_dense_replace", family, 0)
    freq = _int(hf, "moe_layer_freq", family, 1)  # not read by transformers; DeepSeek's own code honours it
    if freq < 1:
        raise JaxmoeError(f"config.json: {family} moe_layer_freq must be >= 1, got {freq}")
    return tuple(i >= first_dense and i % freq == 0 for i in range(num_layers))


def _check_common(hf: dict, family: str) -> None:
    refuse_quantized(hf)
    if hf.get("mlp_bias"):
        raise JaxmoeError(f"config.json: {family} mlp_bias true is not supported")
    heads = require(hf, "num_attention_heads", family)
    kv_heads = hf.get("num_key_value_heads") or heads
    if kv_heads != heads:  # MLA expands every head from the latent; transformers would repeat them again
        raise JaxmoeError(
            f"config.json: {family} num_key_value_heads {kv_heads} must equal num_attention_heads {heads}"
        )
    if hf.get("n_routed_experts") is None and hf.get("num_local_experts") is None and hf.get("num_experts") is None:
        raise JaxmoeError(f"config.json: {family} checkpoint lacks required field 'n_routed_experts'")


def _fields(hf: dict, family: str, dtype: str) -> dict:
    _check_common(hf, family)
    fields = common_fields(hf, family, dtype)
    num_experts = int(require(hf, "n_routed_experts", family, "num_local_experts", "num_experts"))
    nope = int(require(hf, "qk_nope_head_dim", family))
    rope = int(require(hf, "qk_rope_head_dim", family))
    moe_intermediate = int(require(hf, "moe_intermediate_size", family))
    n_shared = _int(hf, "n_shared_experts", family, 0)
    q_lora = _get(hf, "q_lora_rank", family)
    bias = bool(hf.get("attention_bias", False))
    n_group = _int(hf, "n_group", family, 1)
    topk_group = _int(hf, "topk_group", family, n_group)
    fields.update(
        num_kv_heads=fields["num_heads"],
        head_dim=nope + rope,
        moe_layers=_moe_layer_flags(hf, fields["num_layers"], family),
        num_experts=num_experts,
        num_experts_per_tok=int(require(hf, "num_experts_per_tok", family)),
        moe_intermediate_size=moe_intermediate,
        dense_intermediate_size=int(hf.get("intermediate_size") or 0),
        attention_kind="mla",
        attention_bias=bias,
        attention_out_bias=bias,
        q_lora_rank=None if q_lora is None else int(q_lora),
        kv_lora_rank=int(require(hf, "kv_lora_rank", family)),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope,
        v_head_dim=int(require(hf, "v_head_dim", family)),
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=float(_get(hf, "routed_scaling_factor", family) or 1.0),
        shared_intermediate_size=moe_intermediate * n_shared,
    )
    if fields["dense_intermediate_size"] == 0 and not all(fields["moe_layers"]):
        raise JaxmoeError(
            f"config.json: {family} checkpoint with dense layers lacks required field 'intermediate_size'"
        )
    return fields


def v2_config_from_hf(hf: dict, dtype: str) -> ModelConfig:
    fields = _fields(hf, V2, dtype)
    _check_choice(hf, "scoring_func", ("softmax",), "softmax", V2)
    method = _check_choice(hf, "topk_method", V2_TOPK_METHODS, "greedy", V2)
    if method == "greedy":  # transformers ignores n_group / topk_group for greedy
        fields.update(n_group=1, topk_group=1)
    elif hf.get("n_group") is None or hf.get("topk_group") is None:
        raise JaxmoeError(f"config.json: {V2} topk_method 'group_limited_greedy' needs n_group and topk_group")
    check_expert_groups(fields, V2)
    return ModelConfig(
        **fields,
        rope_interleaved=True,  # V2 always rotates adjacent pairs (complex multiplication)
        router_scoring="softmax",
        router_bias=False,
        norm_topk_prob=False,  # transformers' DeepseekV2TopkRouter never renormalizes
        group_score="max",
    )


def v3_config_from_hf(hf: dict, dtype: str) -> ModelConfig:
    fields = _fields(hf, V3, dtype)
    _check_choice(hf, "scoring_func", ("sigmoid",), "sigmoid", V3)
    _check_choice(hf, "topk_method", V3_TOPK_METHODS, "noaux_tc", V3)
    return ModelConfig(
        **fields,
        rope_interleaved=bool(_get(hf, "rope_interleave", V3)),
        **sigmoid_group_routing(fields, V3, bool(_get(hf, "norm_topk_prob", V3))),
    )


def glm_lite_config_from_hf(hf: dict, dtype: str) -> ModelConfig:
    """GLM-4.7-Flash (`glm4_moe_lite`): DeepSeek-V3's attention and routing under GLM's defaults."""
    factor = (hf.get("rope_parameters") or {}).get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if factor not in (None, 1, 1.0):
        raise JaxmoeError(f"config.json: {GLM_LITE} partial_rotary_factor {factor} is not supported (only 1.0)")
    fields = _fields(hf, GLM_LITE, dtype)
    return ModelConfig(
        **fields,
        rope_interleaved=bool(_get(hf, "rope_interleave", GLM_LITE)),
        **sigmoid_group_routing(fields, GLM_LITE, bool(_get(hf, "norm_topk_prob", GLM_LITE))),
    )


def _mla_rules(cfg: ModelConfig) -> list[KeyRule]:
    p, t = "model.layers.{layer}.self_attn", "layers.{layer}.attn"
    rules = [
        KeyRule(f"{p}.kv_a_proj_with_mqa.weight", f"{t}.kv_a_proj", transpose=True),
        KeyRule(f"{p}.kv_a_layernorm.weight", f"{t}.kv_a_norm.scale"),
        KeyRule(f"{p}.kv_b_proj.weight", f"{t}.kv_b_proj", transpose=True),
        KeyRule(f"{p}.o_proj.weight", f"{t}.o_proj", transpose=True),
    ]
    if cfg.q_lora_rank is None:
        rules.append(KeyRule(f"{p}.q_proj.weight", f"{t}.q_proj", transpose=True))
    else:
        rules += [
            KeyRule(f"{p}.q_a_proj.weight", f"{t}.q_a_proj", transpose=True),
            KeyRule(f"{p}.q_a_layernorm.weight", f"{t}.q_a_norm.scale"),
            KeyRule(f"{p}.q_b_proj.weight", f"{t}.q_b_proj", transpose=True),
        ]
    if cfg.attention_bias:
        rules.append(KeyRule(f"{p}.kv_a_proj_with_mqa.bias", f"{t}.kv_a_bias"))
        if cfg.q_lora_rank is not None:
            rules.append(KeyRule(f"{p}.q_a_proj.bias", f"{t}.q_a_bias"))
    if cfg.attention_out_bias:
        rules.append(KeyRule(f"{p}.o_proj.bias", f"{t}.o_bias"))
    return rules


def key_rules(cfg: ModelConfig) -> list[KeyRule]:
    mlp = "model.layers.{layer}.mlp"
    rules = global_rules(cfg.tie_word_embeddings) + layer_norm_rules() + _mla_rules(cfg)
    rules += router_rules(f"{mlp}.gate", "e_score_correction_bias" if cfg.router_bias else None)
    rules += expert_rules(f"{mlp}.experts")
    if cfg.shared_intermediate_size:
        rules += mlp_rules(f"{mlp}.shared_experts", "layers.{layer}.moe.shared")
    if not all(cfg.moe_layers):
        rules += mlp_rules(mlp, "layers.{layer}.mlp")
    return rules
