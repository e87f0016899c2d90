"""Tiny random Hugging Face MoE checkpoints built locally with transformers (nothing downloaded).

`build_hf_checkpoint(family, directory)` saves a float32 model sharded with an index json, as the Hub
ships them, and returns the directory. Sizes are small enough for CPU tests in well under a second.
"""

from __future__ import annotations

from pathlib import Path

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=256, bos_token_id=1,
              eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)

FAMILY_CONFIGS = {
    "mixtral": dict(num_local_experts=6),
    "qwen2_moe": dict(num_experts=6, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                      norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1]),
    "qwen3_moe": dict(num_experts=6, moe_intermediate_size=16, head_dim=12, norm_topk_prob=True, mlp_only_layers=[0]),
    "olmoe": dict(num_experts=6, intermediate_size=16),
    # MLA: heads = kv heads (MLA expands every head from the latent); v_head_dim != qk_nope_head_dim
    # so a wrong kv_b_proj split shows; 8 experts in 4 groups with only 2 groups kept.
    "deepseek_v2": dict(num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
                        qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=8, moe_intermediate_size=16,
                        n_shared_experts=2, num_experts_per_tok=3, first_k_dense_replace=1,
                        topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5,
                        rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=64,
                                          mscale=0.707, mscale_all_dim=0.707, beta_fast=32, beta_slow=1)),
    "deepseek_v3": dict(num_key_value_heads=4, q_lora_rank=12, kv_lora_rank=16, qk_nope_head_dim=8,
                        qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=8, moe_intermediate_size=16,
                        n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
                        routed_scaling_factor=2.5, norm_topk_prob=True, attention_bias=True, rms_norm_eps=1e-5,
                        rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=64,
                                          mscale=1.0, mscale_all_dim=0.8, beta_fast=32, beta_slow=1)),
    # GLM-4.5: RoPE over the first half of each head only (6 of 12), q/k/v bias and per-head q/k norm,
    # V3 routing (sigmoid, selection bias, 2 of 4 groups kept), a shared expert, one dense first layer
    "glm4_moe": dict(head_dim=12, partial_rotary_factor=0.5, attention_bias=True, use_qk_norm=True,
                     n_routed_experts=8, moe_intermediate_size=16, n_shared_experts=1, num_experts_per_tok=3,
                     first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=1.5,
                     norm_topk_prob=True, rms_norm_eps=1e-5,
                     eos_token_id=[3, 4]),  # a list, as GLM ships; with 2 this random model stops at once
    # GLM-4.7-Flash: DeepSeek-V3 attention (q LoRA, interleaved RoPE) and routing, dense/sparse layers listed
    "glm4_moe_lite": dict(num_key_value_heads=4, q_lora_rank=12, kv_lora_rank=16, qk_nope_head_dim=8,
                          qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=8, moe_intermediate_size=16,
                          n_shared_experts=1, mlp_layer_types=["dense", "sparse", "sparse"], n_group=4,
                          topk_group=2, routed_scaling_factor=1.8, norm_topk_prob=True, rms_norm_eps=1e-5),
    # GPT-OSS: sinks, a 4-token window on layers 0 and 2, q/k/v/o bias, router logit bias, interleaved
    # gate/up with biases; the SwiGLU clamp set low so it bites at this init; YaRN without truncation
    "gpt_oss": dict(num_local_experts=6, intermediate_size=16, head_dim=12, sliding_window=4, swiglu_limit=0.4,
                    rms_norm_eps=1e-5,
                    rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=4.0, beta_fast=32.0,
                                         beta_slow=1.0, truncate=False, original_max_position_embeddings=64)),
    # MiniMax-M2: q/k RMSNorm over the whole projections, RoPE over the first 4 of each 12-wide head (the Hub's
    # absolute `rotary_dim`), sigmoid routing with a selection bias (randomized below: it changes choices),
    # 8 experts top-3, the Hub's Mixtral-style keys (block_sparse_moe.experts.{e}.w1/w2/w3)
    "minimax_m2": dict(num_local_experts=8, num_experts_per_tok=3, intermediate_size=16, head_dim=12, rotary_dim=4,
                       use_qk_norm=True, qk_norm_type="per_layer", scoring_func="sigmoid", use_routing_bias=True,
                       attn_type_list=[1, 1, 1], rope_theta=10000.0),
    # Qwen3-Next: Gated DeltaNet on layers 0, 2, 3 (2 key heads, 4 value heads), gated full attention on
    # layer 1 (RoPE over half of each head), zero-centered norms, a gated shared expert, layer 2 dense
    "qwen3_next": dict(num_hidden_layers=4, head_dim=12, partial_rotary_factor=0.5, num_experts=6,
                       moe_intermediate_size=16, shared_expert_intermediate_size=24, norm_topk_prob=True,
                       mlp_only_layers=[2], linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                       linear_value_head_dim=6, linear_conv_kernel_dim=4,
                       layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"]),
    # Qwen3.5-MoE: the multimodal model as the Hub ships it (text_config, a 1-block vision tower, keys
    # model.language_model.* and model.visual.*); the text model as Qwen3-Next's above but every layer MoE,
    # the Gated DeltaNet projections separate, multimodal RoPE (rotating half of each head)
    "qwen3_5_moe": dict(num_hidden_layers=4, head_dim=12, num_experts=6, moe_intermediate_size=16,
                        shared_expert_intermediate_size=24, linear_num_key_heads=2, linear_num_value_heads=4,
                        linear_key_head_dim=8, linear_value_head_dim=6, linear_conv_kernel_dim=4,
                        layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
                        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5,
                                             mrope_section=[1, 1, 1], mrope_interleaved=True)),
}
# families whose config.json nests the language model under text_config beside a vision tower (built with the
# multimodal class, so the checkpoint has the Hub's keys); COMMON's fields the text configs do not take are dropped
MULTIMODAL = {"qwen3_5_moe": dict(vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2,
                                                     out_hidden_size=32, num_position_embeddings=16, patch_size=4))}
NOT_TEXT_FIELDS = ("intermediate_size",)

FAMILIES = tuple(FAMILY_CONFIGS)


def hf_config(family: str, **overrides):
    from transformers import AutoConfig

    fields = {**COMMON, **FAMILY_CONFIGS[family], **overrides}
    if family not in MULTIMODAL:
        return AutoConfig.for_model(family, **fields)
    text = {k: v for k, v in fields.items() if k not in NOT_TEXT_FIELDS}
    return AutoConfig.for_model(family, text_config=text, tie_word_embeddings=text["tie_word_embeddings"],
                                **MULTIMODAL[family])


def model_class(family: str):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if family in MULTIMODAL else AutoModelForCausalLM


def build_hf_model(family: str, seed: int = 0, **overrides):
    import torch

    torch.manual_seed(seed)
    model = model_class(family).from_config(hf_config(family, **overrides)).float().eval()
    with torch.no_grad():  # random init is too flat to exercise routing: widen the weights a bit
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.08)
            elif "bias" in name:
                p.normal_(0.0, 0.02)
            else:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
        for name, p in model.named_parameters():  # Gated DeltaNet: per-token decays ~0.8-0.97, a long memory
            if name.endswith("A_log"):
                p.copy_(torch.log(0.04 + 0.3 * torch.rand_like(p)))
        for name, b in model.named_buffers():  # DeepSeek-V3's / MiniMax-M2's selection bias: a buffer, zero at init
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    return model


def build_hf_checkpoint(family: str, directory: Path, seed: int = 0, **overrides) -> Path:
    model = build_hf_model(family, seed, **overrides)
    directory = Path(directory)
    model.save_pretrained(directory, max_shard_size="40KB")
    return directory


def assert_config_refused(hf: dict, words) -> None:
    """Converting config.json `hf` stops with one JaxmoeError line that starts with config.json and names
    every one of `words`."""
    import pytest

    from convert.converter import model_config_from_hf
    from jaxmoe.errors import JaxmoeError

    with pytest.raises(JaxmoeError) as err:
        model_config_from_hf(hf, None)
    message = str(err.value)
    assert message.startswith("config.json") and "\n" not in message and all(w in message for w in words), message


def add_tensors(hf_dir: Path, tensors: dict, file_name: str = "extra.safetensors") -> None:
    """Adds `tensors` (name -> torch tensor) to the sharded checkpoint `hf_dir` as one more shard, listed in its
    index (e.g. the multi-token-prediction tensors the Hub's checkpoints carry and the converter must skip)."""
    import json

    from safetensors.torch import save_file

    save_file(tensors, str(hf_dir / file_name))
    index_path = hf_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"].update({key: file_name for key in tensors})
    index_path.write_text(json.dumps(index))
