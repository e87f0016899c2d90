"""The normalized model configuration: one frozen dataclass for every supported family.

Per-family differences are expressed as plain fields here (filled in by the family adapters in
`convert/families/`), so the shared layers never branch on the family name.
Stored next to the converted weights as `jaxmoe.json`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from jaxmoe.errors import JaxmoeError

CONFIG_FILE = "jaxmoe.json"
FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """RoPE frequency scaling (Hugging Face `rope_scaling` / `rope_parameters`).

    kind: "default" | "linear" | "yarn" | "llama3".
    """

    kind: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    # YaRN
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Architecture of one MoE decoder-only language model.

    Sizes are element counts; `moe_layers[l]` says whether layer l has a routed-expert block
    (otherwise a dense SwiGLU MLP of `dense_intermediate_size`).
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    moe_layers: tuple[bool, ...]
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    dense_intermediate_size: int = 0
    rope_scaling: RopeScaling = RopeScaling()
    rope_interleaved: bool = False  # rotate adjacent pairs (DeepSeek) instead of halves
    rotary_dim: int | None = None  # GQA: RoPE rotates only the first rotary_dim of each head (GLM-4.5); None: all
    tie_word_embeddings: bool = False
    norm_float32_scale: bool = False  # layer and final RMSNorm weights float32, applied before rounding (GPT-OSS)
    norm_unit_offset: bool = False  # every RMSNorm but the gated one scales by (1 + weight), in float32 (Qwen3-Next)
    # attention
    attention_kind: str = "gqa"  # "gqa" | "mla"
    attention_bias: bool = False  # bias on q/k/v projections
    attention_out_bias: bool = False  # bias on the output projection
    qk_norm: str = "none"  # "none" | "head" (per head_dim, Qwen3) | "full" (over all heads, OLMoE)
    attention_sinks: bool = False  # a learned per-head logit in every softmax's denominator (GPT-OSS)
    attention_output_gate: bool = False  # q_proj also emits a per-head gate: o_proj(sigmoid(gate) * attn) (Qwen3-Next)
    sliding_window: int | None = None  # keys within this many positions of the query, on the layers below
    sliding_layers: tuple[bool, ...] = ()  # per layer: windowed (True) or full attention; () = all full
    # Gated DeltaNet linear attention (Qwen3-Next, jaxmoe.gated_delta) on the layers below, attention_kind elsewhere
    linear_layers: tuple[bool, ...] = ()  # per layer: Gated DeltaNet (True) or attention_kind; () = none
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0  # a multiple of linear_num_key_heads (each q/k head serves a group of v heads)
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel: int = 0  # width of the causal depthwise convolution over q, k, v
    # multi-head latent attention (DeepSeek)
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # routing
    router_scoring: str = "softmax"  # "softmax" | "sigmoid"
    router_bias: bool = False  # e_score_correction_bias added for selection only
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"  # "max" (DeepSeek-V2) | "top2_sum" (DeepSeek-V3)
    routed_scaling_factor: float = 1.0
    router_logit_bias: bool = False  # a bias added to the router logits (GPT-OSS), unlike router_bias
    # routed experts' FFN
    expert_activation: str = "swiglu"  # "swiglu" | "gpt_oss" (clamped SwiGLU, see jaxmoe.moe.ExpertFFN)
    expert_bias: bool = False  # biases on the experts' gate, up and down projections
    swiglu_alpha: float = 1.702  # gpt_oss: sigmoid gain
    swiglu_limit: float = 7.0  # gpt_oss: clamp of the gate (above) and up (both sides) projections
    # shared experts
    shared_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gated: bool = False  # sigmoid gate on the shared expert (Qwen2-MoE)
    # tokens
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "bfloat16"  # parameter dtype of the converted checkpoint

    def __post_init__(self):
        if len(self.moe_layers) != self.num_layers:
            raise JaxmoeError(f"moe_layers has {len(self.moe_layers)} entries, num_layers is {self.num_layers}")
        if self.num_experts_per_tok > self.num_experts:
            raise JaxmoeError("num_experts_per_tok exceeds num_experts")
        if self.attention_kind not in ("gqa", "mla"):
            raise JaxmoeError(f"attention_kind must be 'gqa' or 'mla', got {self.attention_kind!r}")
        if self.expert_activation not in ("swiglu", "gpt_oss"):
            raise JaxmoeError(f"expert_activation must be 'swiglu' or 'gpt_oss', got {self.expert_activation!r}")
        if self.sliding_layers and len(self.sliding_layers) != self.num_layers:
            raise JaxmoeError(f"sliding_layers has {len(self.sliding_layers)} entries, num_layers is {self.num_layers}")
        if (any(self.sliding_layers) or self.attention_sinks) and self.attention_kind != "gqa":
            raise JaxmoeError("sliding-window attention and attention sinks need attention_kind 'gqa'")
        if any(self.sliding_layers) and not (self.sliding_window and self.sliding_window > 0):
            raise JaxmoeError(f"sliding_layers needs a positive sliding_window, got {self.sliding_window}")
        if self.linear_layers:
            self._check_linear_layers()
        if self.rotary_dim is not None and not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise JaxmoeError(f"rotary_dim must be even and in (0, head_dim={self.head_dim}], got {self.rotary_dim}")

    def _check_linear_layers(self) -> None:
        if len(self.linear_layers) != self.num_layers:
            raise JaxmoeError(f"linear_layers has {len(self.linear_layers)} entries, num_layers is {self.num_layers}")
        sizes = (self.linear_num_key_heads, self.linear_num_value_heads, self.linear_key_head_dim,
                 self.linear_value_head_dim, self.linear_conv_kernel)
        if min(sizes) < 1:
            raise JaxmoeError(f"linear attention needs positive head counts, head dims and conv kernel, got {sizes}")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise JaxmoeError(f"linear_num_value_heads {self.linear_num_value_heads} is not a multiple of "
                              f"linear_num_key_heads {self.linear_num_key_heads}")

    def layer_attention_kind(self, layer: int) -> str:
        """The token mixer of layer `layer`: "gated_delta" (linear attention) or `attention_kind`."""
        return "gated_delta" if self.linear_layers and self.linear_layers[layer] else self.attention_kind

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i, is_moe in enumerate(self.moe_layers) if is_moe)

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width: MLA splits it into nope + rope parts."""
        if self.attention_kind == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim

    def layer_window(self, layer: int) -> int | None:
        """The attention window of layer `layer` (keys p - window < j <= p), None for full causal attention."""
        return self.sliding_window if self.sliding_layers and self.sliding_layers[layer] else None

    @property
    def expert_param_count(self) -> int:
        """Elements of one routed expert (gate + up + down, and their biases if any)."""
        d, f = self.hidden_size, self.moe_intermediate_size
        return 3 * d * f + (2 * f + d if self.expert_bias else 0)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["format_version"] = FORMAT_VERSION
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d.pop("format_version", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise JaxmoeError(f"{CONFIG_FILE}: unknown fields {unknown}")
        d["rope_scaling"] = RopeScaling(**d.get("rope_scaling", {}))
        d["moe_layers"] = tuple(d["moe_layers"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        d["sliding_layers"] = tuple(d.get("sliding_layers", ()))
        d["linear_layers"] = tuple(d.get("linear_layers", ()))
        return cls(**d)


def save_config(cfg: ModelConfig, directory: Path) -> None:
    (Path(directory) / CONFIG_FILE).write_text(json.dumps(cfg.to_json(), indent=2) + "\n")


def load_config(directory: Path) -> ModelConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise JaxmoeError(f"{path}: not found; is {directory} a model converted with `python -m convert`?")
    try:
        raw = json.loads(path.read_text())
        return ModelConfig.from_json(raw)
    except (ValueError, TypeError, KeyError) as e:
        raise JaxmoeError(f"{path}: invalid config ({e})") from None
