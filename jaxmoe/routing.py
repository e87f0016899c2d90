"""Top-k expert routing: softmax or sigmoid scores, optional selection bias, group-limited top-k.

One function covers Mixtral / Qwen / OLMoE (softmax top-k, optional renorm), DeepSeek-V2
(softmax, group max) and DeepSeek-V3 (sigmoid + e_score_correction_bias, group top-2 sum); the
differences are config fields, not branches on the family.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxmoe.config import ModelConfig


@dataclass(frozen=True, slots=True)
class RouterSpec:
    """The static routing rule of one model (hashable: usable as a jit static argument)."""

    top_k: int
    scoring: str = "softmax"
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"
    routed_scaling_factor: float = 1.0

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "RouterSpec":
        return cls(
            top_k=cfg.num_experts_per_tok,
            scoring=cfg.router_scoring,
            norm_topk_prob=cfg.norm_topk_prob,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            group_score=cfg.group_score,
            routed_scaling_factor=cfg.routed_scaling_factor,
        )


def router_logits(x, router_kernel, logit_bias=None):
    """x: [N, d]; router_kernel: [d, E]; logit_bias: [E] or None (GPT-OSS) -> float32[N, E] (computed in
    float32)."""
    logits = x.astype(jnp.float32) @ router_kernel.astype(jnp.float32)
    return logits if logit_bias is None else logits + logit_bias.astype(jnp.float32)


def select_experts(logits, spec: RouterSpec, selection_bias=None):
    """logits: float32[N, E] -> (expert_ids: int32[N, k], expert_weights: float32[N, k]).

    selection_bias (float32[E], DeepSeek-V3's e_score_correction_bias) shifts which experts are
    chosen but not their weights.
    """
    n, num_experts = logits.shape
    scores = jax.nn.softmax(logits, axis=-1) if spec.scoring == "softmax" else jax.nn.sigmoid(logits)
    choice = scores if selection_bias is None else scores + selection_bias.astype(jnp.float32)
    if spec.n_group > 1 and spec.topk_group < spec.n_group:
        grouped = choice.reshape(n, spec.n_group, num_experts // spec.n_group)
        if spec.group_score == "top2_sum":
            group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)
        else:
            group_scores = grouped.max(-1)
        _, top_groups = jax.lax.top_k(group_scores, spec.topk_group)  # [N, topk_group]
        group_keep = jnp.zeros((n, spec.n_group), bool).at[jnp.arange(n)[:, None], top_groups].set(True)
        keep = jnp.repeat(group_keep, num_experts // spec.n_group, axis=1)
        choice = jnp.where(keep, choice, -jnp.inf)
    _, expert_ids = jax.lax.top_k(choice, spec.top_k)
    weights = jnp.take_along_axis(scores, expert_ids, axis=-1)
    if spec.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    weights = weights * spec.routed_scaling_factor
    return expert_ids.astype(jnp.int32), weights
