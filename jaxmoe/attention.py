"""Grouped-query attention with a preallocated KV cache, plus the cache/mask helpers MLA reuses.

Cache convention: every sequence b owns rows [0, S) of its cache; the tokens of one call sit at
contiguous positions `positions[b, 0] + arange(T)`. A query at position p attends to cache rows
j <= p, so rows holding padding beyond a sequence's length are never read before being overwritten.

Padding: prefill right-pads prompts to a bucket length and marks the padding tokens with position -1
(`padded_positions`); their first token is always real. A KV cache needs nothing more (a padding query
sees no row; its row is overwritten before any real query reads it), but a layer whose cache is a running
state (jaxmoe.gated_delta) must not let a token at position < 0 change that state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.config import ModelConfig
from jaxmoe.inplace import update_in_dim
from jaxmoe.layers import RMSNorm, device_zeros, linear, normal_param
from jaxmoe.rope import apply_rope, rope_cos_sin, rope_inv_freq


def padded_positions(length, total: int, start=0):
    """Positions start + arange(total) as int32[total], -1 from index `length` on (right padding; see above).
    length: traced or static int, the number of real tokens among the `total`."""
    index = jnp.arange(total, dtype=jnp.int32)
    return jnp.where(index < length, start + index, -1)


def write_cache(cache, new, start):
    """cache: [B, S, ...]; new: [B, T, ...]; start: int32[B] -> cache with rows start[b]+t replaced."""

    def one(c, n, s):
        return update_in_dim(c, n, s, axis=0)

    return jax.vmap(one)(cache, new, start)


def causal_attention(q, k, v, positions, scale: float, window: int | None = None, sinks=None):
    """Attention of new queries over the whole cache.

    q: [B, T, H, dk]; k: [B, S, KV, dk]; v: [B, S, KV, dv] with H % KV == 0;
    positions: int32[B, T] (query positions) -> [B, T, H, dv] in q's dtype.
    A query at position p sees cache rows j <= p, and with `window` only p - window < j <= p.
    sinks: [H] or None (GPT-OSS): one more logit per head in each softmax's denominator, attending to nothing.
    """
    b, t, h, dk = q.shape
    s, kv = k.shape[1], k.shape[2]
    q = q.reshape(b, t, kv, h // kv, dk)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype)).astype(jnp.float32) * scale
    rows = jnp.arange(s)[None, None, :]
    visible = rows <= positions[:, :, None]  # [B, T, S]
    if window is not None:
        visible = visible & (rows > positions[:, :, None] - window)
    scores = jnp.where(visible[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    if sinks is None:
        probs = jax.nn.softmax(scores, axis=-1)
    else:
        sink = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(1, kv, h // kv, 1, 1), (*scores.shape[:-1], 1))
        probs = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(q.dtype), v.astype(q.dtype))
    return out.reshape(b, t, h, v.shape[-1])


class GQAttention(nnx.Module):
    """Multi-head attention with grouped KV heads, optional q/k/v bias, q/k RMSNorm, partial RoPE, attention
    sinks, a sliding window (`window`: this layer's, `ModelConfig.layer_window`) and an output gate.

    With cfg.attention_output_gate (Qwen3-Next) q_proj is [d, H * 2 * hd]: per head its query, then a gate
    of the same width, and the heads' outputs are multiplied by sigmoid(gate) before o_proj."""

    recurrent_cache = False  # writing a token's KV rows twice is writing them once (see jaxmoe.gated_delta)

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs, window: int | None = None):
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
        self.output_gate = cfg.attention_output_gate
        q_width = h * hd * (2 if self.output_gate else 1)
        self.q_proj = normal_param(rngs, (d, q_width), dtype)
        self.k_proj = normal_param(rngs, (d, kv * hd), dtype)
        self.v_proj = normal_param(rngs, (d, kv * hd), dtype)
        self.o_proj = normal_param(rngs, (h * hd, d), dtype)
        if cfg.attention_bias:
            self.q_bias = nnx.Param(jnp.zeros((q_width,), dtype))
            self.k_bias = nnx.Param(jnp.zeros((kv * hd,), dtype))
            self.v_bias = nnx.Param(jnp.zeros((kv * hd,), dtype))
        if cfg.attention_out_bias:
            self.o_bias = nnx.Param(jnp.zeros((d,), dtype))
        if cfg.attention_sinks:
            self.sinks = nnx.Param(jnp.zeros((h,), dtype))
        self.window = window
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm == "head":
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype, unit_offset=cfg.norm_unit_offset)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype, unit_offset=cfg.norm_unit_offset)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(h * hd, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(kv * hd, cfg.rms_norm_eps, dtype)
        self.rotary_dim = cfg.rotary_dim or hd
        inv_freq, self.rope_scaling = rope_inv_freq(self.rotary_dim, cfg.rope_theta, cfg.rope_scaling,
                                                    cfg.max_position_embeddings)
        self.inv_freq = tuple(float(f) for f in inv_freq)  # static, hashable
        self.rope_interleaved = cfg.rope_interleaved
        self.scale = hd**-0.5

    def _rope(self, x, cos, sin):
        """x: [B, T, heads, head_dim]: the first rotary_dim of each head rotated, the rest passed through."""
        if self.rotary_dim == self.head_dim:
            return apply_rope(x, cos, sin, self.rope_interleaved)
        rotated = apply_rope(x[..., : self.rotary_dim], cos, sin, self.rope_interleaved)
        return jnp.concatenate([rotated, x[..., self.rotary_dim :]], axis=-1)

    @staticmethod
    def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype) -> dict:
        """{'k', 'v'}: [B, max_len, kv_heads, head_dim] zeros."""
        shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        return {"k": device_zeros(shape, dtype), "v": device_zeros(shape, dtype)}

    def __call__(self, x, cache: dict, positions):
        """x: [B, T, d]; positions: int32[B, T] -> ([B, T, d], updated cache)."""
        b, t, _ = x.shape
        bias = (self.q_bias[...], self.k_bias[...], self.v_bias[...]) if hasattr(self, "q_bias") else (None,) * 3
        q = linear(x, self.q_proj[...], bias[0])  # [B, T, H*hd], or [B, T, H*2*hd] with the output gate
        gate = None
        if self.output_gate:
            q = q.reshape(b, t, self.num_heads, 2 * self.head_dim)
            q, gate = q[..., : self.head_dim], q[..., self.head_dim :].reshape(b, t, -1)  # [B, T, H, hd], [B, T, H*hd]
        k = linear(x, self.k_proj[...], bias[1])  # [B, T, KV*hd]
        v = linear(x, self.v_proj[...], bias[2])
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(b, t, self.num_heads, self.head_dim)
        k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
        v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.rope_scaling)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        start = positions[:, 0]
        cache = {"k": write_cache(cache["k"], k, start), "v": write_cache(cache["v"], v, start)}
        sinks = self.sinks[...] if hasattr(self, "sinks") else None
        out = causal_attention(q, cache["k"], cache["v"], positions, self.scale, self.window, sinks)  # [B, T, H, hd]
        out = out.reshape(b, t, -1)  # [B, T, H*hd]
        if gate is not None:
            out = out * jax.nn.sigmoid(gate)
        o_bias = self.o_bias[...] if hasattr(self, "o_bias") else None
        return linear(out, self.o_proj[...], o_bias), cache
