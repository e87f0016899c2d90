"""Exact shapes of public MoE checkpoints, for benchmarks at real model sizes without downloading them.

Each entry is the architecture part of the model's public Hugging Face `config.json` (values copied
from the Hub release named in the comment; tokenizer/training-only fields left out). The ModelConfig
is made by the same family adapter `python -m convert` uses on a real checkpoint, so a synthetic
model here has exactly the parameter shapes of the converted release (bfloat16).

`model_config(name, num_layers=None, scale=1.0)`:
  num_layers  keep only the first N decoder layers (quick runs; per-layer sizes stay real)
  scale < 1   CPU smoke runs: widths (hidden, intermediate, MLA ranks, vocabulary) shrink by about
              `scale`, head counts and head widths by about sqrt(scale); routing shape (experts,
              top-k, dense/MoE layer pattern) is unchanged.
"""

from __future__ import annotations

import math

from jaxmoe.config import ModelConfig
from jaxmoe.errors import JaxmoeError

DTYPE = "bfloat16"

SHAPES: dict[str, dict] = {
    # mistralai/Mixtral-8x7B-v0.1 config.json: 32 layers, d=4096, 32 heads / 8 KV heads (head_dim 128),
    # 8 experts top-2 of intermediate 14336 in every layer, vocab 32000, rope_theta 1e6.
    # 46.7B parameters; one expert = 3*4096*14336*2 B = 352 MB; all routed experts 90.2 GB.
    "mixtral-8x7b": dict(
        model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6,
        hidden_act="silu", sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    ),
    # Qwen/Qwen3-30B-A3B config.json: 48 layers, d=2048, 32 heads / 4 KV heads with head_dim 128 (q width
    # 4096 != d), per-head q/k RMSNorm, 128 experts top-8 of moe_intermediate 768 in every layer
    # (decoder_sparse_step 1, mlp_only_layers []), norm_topk_prob true, vocab 151936, rope_theta 1e6.
    # 30.5B parameters; one expert = 3*2048*768*2 B = 9.4 MB; all routed experts 58.0 GB.
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1e6, rope_scaling=None,
        attention_bias=False, hidden_act="silu", tie_word_embeddings=False, bos_token_id=151643,
        eos_token_id=151645,
    ),
    # deepseek-ai/DeepSeek-V2-Lite config.json: 27 layers (first_k_dense_replace 1: layer 0 dense with
    # intermediate 10944), d=2048, MLA with 16 heads, q_lora_rank null, kv_lora_rank 512,
    # qk_nope 128 + qk_rope 64, v_head_dim 128; 64 routed experts top-6 (greedy, softmax, no renorm,
    # routed_scaling_factor 1.0) of moe_intermediate 1408 + 2 shared experts; YaRN (factor 40 over 4096);
    # vocab 102400. 15.7B parameters; one expert = 3*2048*1408*2 B = 17.3 MB; all routed experts 28.8 GB.
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
        n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6, routed_scaling_factor=1.0,
        kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
        topk_method="greedy", n_group=1, topk_group=1, scoring_func="softmax", norm_topk_prob=False,
        first_k_dense_replace=1, moe_layer_freq=1, max_position_embeddings=163840, rms_norm_eps=1e-6,
        rope_theta=10000.0, attention_bias=False, hidden_act="silu", tie_word_embeddings=False,
        rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                          beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
        bos_token_id=100000, eos_token_id=100001,
    ),
    # allenai/OLMoE-1B-7B-0924 config.json: 16 layers, d=2048, 16 heads (head_dim 128), q/k RMSNorm over
    # the full projections, 64 experts top-8 of intermediate 1024 in every layer, norm_topk_prob false,
    # vocab 50304, rope_theta 10000. 6.9B parameters; one expert = 3*2048*1024*2 B = 12.6 MB;
    # all routed experts 12.9 GB.
    "olmoe-1b-7b": dict(
        model_type="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
        norm_topk_prob=False, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
        rope_scaling=None, attention_bias=False, clip_qkv=None, hidden_act="silu", tie_word_embeddings=False,
        pad_token_id=1, eos_token_id=50279,
    ),
    # zai-org/GLM-4.5-Air config.json: 46 layers (first_k_dense_replace 1: layer 0 dense with intermediate
    # 10944), d=4096, 96 heads / 8 KV heads with head_dim 128 (q width 12288 != d), q/k/v bias, RoPE over
    # half of each head (partial_rotary_factor 0.5, theta 1e6), no q/k norm; 128 routed experts top-8 of
    # moe_intermediate 1408 (sigmoid, selection bias, n_group 1, renormalized, scale 1.0) + 1 shared expert;
    # vocab 151552; one multi-token-prediction layer (not loaded). 106.9B parameters; one expert =
    # 3*4096*1408*2 B = 34.6 MB; all routed experts 199 GB.
    "glm-4.5-air": dict(
        model_type="glm4_moe", vocab_size=151552, hidden_size=4096, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=46, num_attention_heads=96, num_key_value_heads=8,
        head_dim=128, partial_rotary_factor=0.5, n_routed_experts=128, n_shared_experts=1, num_experts_per_tok=8,
        first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0,
        attention_bias=True, use_qk_norm=False, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_theta=1e6, rope_scaling=None, num_nextn_predict_layers=1, hidden_act="silu",
        tie_word_embeddings=False, pad_token_id=151329, eos_token_id=[151329, 151336, 151338],
    ),
    # openai/gpt-oss-20b config.json: 24 layers alternating a 128-token sliding window (layer 0) and full
    # attention, d=2880, 64 heads / 8 KV heads with head_dim 64 (q width 4096 != d), q/k/v/o bias, attention
    # sinks, YaRN (factor 32 over 4096, theta 150000, no truncation); 32 experts top-4 of intermediate 2880 in
    # every layer, router logit bias, biased clamped SwiGLU (limit 7); vocab 201088. The Hub ships the experts
    # as MXFP4; here they are bfloat16, as `python -m convert` writes them. 20.9B parameters; one expert =
    # 3*2880*2880*2 B + biases = 49.8 MB; all routed experts 38.2 GB.
    "gpt-oss-20b": dict(
        model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4,
        sliding_window=128, layer_types=["sliding_attention", "full_attention"] * 12, attention_bias=True,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=150000,
        rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                          original_max_position_embeddings=4096),
        swiglu_limit=7.0, hidden_act="silu", tie_word_embeddings=False, pad_token_id=199999, eos_token_id=200002,
    ),
    # openai/gpt-oss-120b config.json: gpt-oss-20b's layers, 36 of them, with 128 experts top-4.
    # 116.8B parameters; one expert 49.8 MB; all routed experts 229 GB.
    "gpt-oss-120b": dict(
        model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=36,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=128, num_experts_per_tok=4,
        sliding_window=128, layer_types=["sliding_attention", "full_attention"] * 18, attention_bias=True,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=150000,
        rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                          original_max_position_embeddings=4096),
        swiglu_limit=7.0, hidden_act="silu", tie_word_embeddings=False, pad_token_id=199999, eos_token_id=200002,
    ),
    # MiniMaxAI/MiniMax-M2 config.json: 62 layers of full softmax attention (attn_type_list all 1), d=3072,
    # 48 heads / 8 KV heads with head_dim 128 (q width 6144 != d), q/k RMSNorm over the whole projections
    # (qk_norm_type per_layer), RoPE over the first 64 of each head (rotary_dim, theta 5e6); 256 experts top-8 of
    # intermediate 1536 in every layer, sigmoid scores with a selection bias, renormalized, no shared expert;
    # vocab 200064; 3 multi-token-prediction modules (not loaded). The Hub ships FP8 weights; here they are
    # bfloat16. 228.7B parameters (the model card: 230B total, 10B active); one expert = 3*3072*1536*2 B =
    # 28.3 MB; all routed experts 449 GB.
    "minimax-m2": dict(
        model_type="minimax_m2", vocab_size=200064, hidden_size=3072, intermediate_size=1536, num_hidden_layers=62,
        num_attention_heads=48, num_key_value_heads=8, head_dim=128, rotary_dim=64, attn_type_list=[1] * 62,
        num_local_experts=256, num_experts_per_tok=8, scoring_func="sigmoid", use_routing_bias=True,
        use_qk_norm=True, qk_norm_type="per_layer", shared_intermediate_size=0, max_position_embeddings=196608,
        rms_norm_eps=1e-6, rope_theta=5000000, use_mtp=True, num_mtp_modules=3, mtp_transformer_layers=1,
        hidden_act="silu", tie_word_embeddings=False,
    ),
    # Qwen/Qwen3-Next-80B-A3B-Instruct config.json: 48 layers, every 4th full attention (full_attention_interval 4:
    # 16 heads / 2 KV heads of head_dim 256 with an output gate, per-head q/k norm, RoPE over a quarter of each
    # head, theta 1e7), the other 36 Gated DeltaNet (16 key heads / 32 value heads of width 128, conv width 4);
    # d=2048; 512 experts top-10 of moe_intermediate 512 in every layer plus a gated shared expert of 512;
    # vocab 151936; a multi-token-prediction module (not loaded). 79.67B parameters without it (the Hub counts
    # 81.3B with it; the model card: 80B total, 3B active); one expert = 3*2048*512*2 B = 6.3 MB; all routed
    # experts 155 GB.
    "qwen3-next-80b-a3b": dict(
        model_type="qwen3_next", vocab_size=151936, hidden_size=2048, intermediate_size=5120,
        moe_intermediate_size=512, shared_expert_intermediate_size=512, num_hidden_layers=48, num_attention_heads=16,
        num_key_value_heads=2, head_dim=256, partial_rotary_factor=0.25, full_attention_interval=4,
        linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16,
        linear_num_value_heads=32, num_experts=512, num_experts_per_tok=10, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=262144, rms_norm_eps=1e-6,
        rope_theta=10000000, rope_scaling=None, attention_bias=False, hidden_act="silu", tie_word_embeddings=False,
        bos_token_id=151643, eos_token_id=151645,
    ),
    # Qwen/Qwen3.5-35B-A3B's language model (the release's config.json nests it under text_config beside a vision
    # tower; here flat, as the text-only Qwen3_5MoeForCausalLM's config, same adapter): transformers'
    # Qwen3_5MoeTextConfig defaults, which are this release's sizes. 40 layers, every 4th full attention (16 heads /
    # 2 KV heads of head_dim 256 with an output gate, per-head q/k norm, RoPE over a quarter of each head), the
    # other 30 Gated DeltaNet (16 key / 32 value heads of width 128, conv width 4); d=2048; 256 experts top-8 of
    # moe_intermediate 512 in every layer plus a gated shared expert of 512; vocab 248320. 34.66B parameters
    # without the vision tower and the multi-token-prediction module (the model card: 35B total, 3B active);
    # one expert = 3*2048*512*2 B = 6.3 MB; all routed experts 64.4 GB. rope_theta is not in transformers' defaults
    # (1e7 as Qwen3-Next; it changes no shape), nor are the special token ids (left out).
    "qwen3.5-35b-a3b": dict(
        model_type="qwen3_5_moe_text", vocab_size=248320, hidden_size=2048, moe_intermediate_size=512,
        shared_expert_intermediate_size=512, num_hidden_layers=40, num_attention_heads=16, num_key_value_heads=2,
        head_dim=256, partial_rotary_factor=0.25, full_attention_interval=4, linear_conv_kernel_dim=4,
        linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=32,
        num_experts=256, num_experts_per_tok=8, max_position_embeddings=262144, rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="default", rope_theta=10000000, mrope_section=[11, 11, 10],
                             mrope_interleaved=True),
        attention_bias=False, hidden_act="silu", tie_word_embeddings=False,
    ),
}

SHAPE_NAMES = tuple(SHAPES)


def _width(x: int, scale: float, multiple: int = 8) -> int:
    return max(multiple, int(round(x * scale / multiple)) * multiple)


def _even(x: float, minimum: int = 8) -> int:
    return max(minimum, 2 * int(round(x / 2)))


def hf_config_dict(name: str, num_layers: int | None = None, scale: float = 1.0) -> dict:
    """The shape's config.json dict, with the `num_layers` / `scale` reductions applied."""
    if name not in SHAPES:
        raise JaxmoeError(f"--shape {name!r}: unknown; available: {', '.join(SHAPES)}, all")
    hf = dict(SHAPES[name])
    if num_layers is not None:
        if not 1 <= num_layers <= hf["num_hidden_layers"]:
            raise JaxmoeError(f"--layers must be in [1, {hf['num_hidden_layers']}] for {name}")
        if num_layers <= hf.get("first_k_dense_replace", 0):
            raise JaxmoeError(f"--layers {num_layers}: {name} needs > {hf['first_k_dense_replace']} layers to have a MoE layer")
        hf["num_hidden_layers"] = num_layers
        for per_layer in ("layer_types", "attn_type_list"):
            if per_layer in hf:
                hf[per_layer] = hf[per_layer][:num_layers]
    if not 0 < scale <= 1:
        raise JaxmoeError("--scale must be in (0, 1]")
    if scale == 1:
        return hf
    root = math.sqrt(scale)
    heads, kv = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
    group = heads // kv
    new_kv = max(1, round(kv * root / group) if group > 1 else round(kv * root))
    new_kv = max(new_kv, 1)
    new_heads = new_kv * group if group > 1 else max(1, round(heads * root))
    if group == 1:
        new_kv = new_heads
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    hf.update(num_attention_heads=new_heads, num_key_value_heads=new_kv, vocab_size=_width(hf["vocab_size"], scale, 64))
    if hf["model_type"] == "deepseek_v2":
        hf.update(hidden_size=_width(hf["hidden_size"], scale), kv_lora_rank=_width(hf["kv_lora_rank"], scale),
                  qk_nope_head_dim=_even(hf["qk_nope_head_dim"] * root), qk_rope_head_dim=_even(hf["qk_rope_head_dim"] * root),
                  v_head_dim=_even(hf["v_head_dim"] * root))
    else:
        new_head_dim = _even(head_dim * root)
        # GLM, MiniMax-M2: the rotated part of each head (a factor, or MiniMax's absolute rotary_dim) must stay even
        factor = hf.get("partial_rotary_factor", hf["rotary_dim"] / head_dim if "rotary_dim" in hf else 1.0)
        while int(new_head_dim * factor) % 2:
            new_head_dim += 2
        if "rotary_dim" in hf:
            hf["rotary_dim"] = int(new_head_dim * factor)
        if hf["hidden_size"] == heads * head_dim:  # keep d = heads * head_dim where the release has it
            hf.update(hidden_size=new_heads * new_head_dim)
        else:
            hf.update(hidden_size=_width(hf["hidden_size"], scale))
        hf["head_dim"] = new_head_dim
    for key in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
        if key in hf:
            hf[key] = _width(hf[key], scale)
    if "linear_num_key_heads" in hf:  # Gated DeltaNet (Qwen3-Next): heads and head widths as attention's
        key_heads = max(1, round(hf["linear_num_key_heads"] * root))
        hf.update(linear_num_value_heads=key_heads * (hf["linear_num_value_heads"] // hf["linear_num_key_heads"]),
                  linear_num_key_heads=key_heads, linear_key_head_dim=_even(hf["linear_key_head_dim"] * root),
                  linear_value_head_dim=_even(hf["linear_value_head_dim"] * root))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # special ids past the shrunk vocabulary
        ids = hf.get(key)
        if isinstance(ids, list):
            hf[key] = [i for i in ids if i < hf["vocab_size"]] or None
        elif ids is not None and ids >= hf["vocab_size"]:
            hf[key] = None
    return hf


def model_config(name: str, num_layers: int | None = None, scale: float = 1.0) -> ModelConfig:
    """The normalized (bfloat16) ModelConfig of the shape, via the family adapter of `convert`."""
    from convert.families import FAMILIES

    hf = hf_config_dict(name, num_layers, scale)
    return FAMILIES[hf["model_type"]].config_from_hf(hf, DTYPE)


def describe(cfg: ModelConfig) -> dict:
    """Sizes of the model in bytes (bfloat16): one expert, all routed experts, everything else."""
    import dataclasses

    from jaxmoe.checkpoint import abstract_model, split_layer

    # one layer of each kind (dense / MoE, attention / Gated DeltaNet) stands for all of that kind: abstract
    # models of 48 layers are slow
    linear = cfg.linear_layers or (False,) * cfg.num_layers
    layer_kinds = list(zip(cfg.moe_layers, linear))
    kinds = tuple(sorted(set(layer_kinds)))
    _, state = abstract_model(dataclasses.replace(
        cfg, num_layers=len(kinds), moe_layers=tuple(m for m, _ in kinds), sliding_layers=(),
        linear_layers=tuple(lin for _, lin in kinds) if cfg.linear_layers else ()))
    pure = state.to_pure_dict()
    leaf_bytes = lambda tree: sum(int(math.prod(x.shape)) * x.dtype.itemsize for x in _leaves(tree))  # noqa: E731
    leaf_count = lambda tree: sum(int(math.prod(x.shape)) for x in _leaves(tree))  # noqa: E731
    expert = expert_count = 0
    globals_tree = {k: v for k, v in pure.items() if k != "layers"}
    non_expert, non_expert_count = leaf_bytes(globals_tree), leaf_count(globals_tree)
    for i, tree in pure["layers"].items():
        count = layer_kinds.count(kinds[i])
        dense, experts = split_layer(tree)
        non_expert += count * leaf_bytes(dense)
        non_expert_count += count * leaf_count(dense)
        if experts is not None:
            expert += count * leaf_bytes(experts)
            expert_count += count * leaf_count(experts)
    moe_layers = len(cfg.moe_layer_ids)
    one = cfg.expert_param_count * 2
    return {
        "layers": cfg.num_layers,
        "moe_layers": moe_layers,
        "experts_per_layer": cfg.num_experts,
        "top_k": cfg.num_experts_per_tok,
        "expert_bytes": one,
        "routed_expert_bytes": expert,
        "non_expert_bytes": non_expert,
        "total_params": expert_count + non_expert_count,
        "active_params_per_token": non_expert_count + moe_layers * cfg.num_experts_per_tok * cfg.expert_param_count,
    }


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree
