"""Multi-head latent attention (MLA) of DeepSeek-V2 / DeepSeek-V3, caching the compressed latent.

Per token, MLA projects the hidden state to a small latent `c_kv` (kv_lora_rank wide, RMS-normed)
plus one rotary key `k_pe` shared by every head (qk_rope_head_dim wide). Per-head keys and values
are linear in the latent: `k_nope = c_kv @ W_kb`, `v = c_kv @ W_vb` (the two halves of kv_b_proj),
so the cache holds only `c_kv` and `k_pe`: (kv_lora_rank + qk_rope_head_dim) numbers per token and
layer instead of 2 * heads * head_dim.

Two equivalent ways to attend over that cache (same scores up to float rounding):
  - "expanded": expand k_nope / v for every cached row, then ordinary multi-head attention
    (cheaper for long query blocks: prefill);
  - "absorbed": fold W_kb into the query (`q_nope @ W_kb^T`, kv_lora_rank wide) and W_vb into the
    output, and attend over the latent directly, like multi-query attention with one latent head
    (cheaper for short query blocks: decode). DeepSeek's reference inference does the same.
`MLAttention.mode` "auto" picks by the static query length (see `absorb_is_cheaper`).

Softmax scale: qk_head_dim ** -0.5, times yarn_mscale(factor, mscale_all_dim) ** 2 when the rope
scaling is not "default" and sets mscale_all_dim (as transformers' `yarn_apply_mscale`). The rotary
cos/sin carry YaRN's own attention factor (from `rope_inv_freq`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.attention import causal_attention, write_cache
from jaxmoe.config import ModelConfig
from jaxmoe.layers import RMSNorm, device_zeros, linear, normal_param
from jaxmoe.rope import apply_rope, rope_cos_sin, rope_inv_freq, yarn_mscale

LORA_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm use the RMSNorm default, not config.rms_norm_eps
MLA_MODES = ("auto", "absorbed", "expanded")


def mla_softmax_scale(cfg: ModelConfig) -> float:
    """qk_head_dim ** -0.5, with DeepSeek's YaRN mscale_all_dim correction squared."""
    scale = cfg.qk_head_dim**-0.5
    rs = cfg.rope_scaling
    if rs.kind != "default" and rs.mscale_all_dim:
        m = yarn_mscale(rs.factor, rs.mscale_all_dim)
        scale = scale * m * m
    return scale


def absorb_is_cheaper(query_len: int, kv_lora_rank: int, nope_dim: int, v_dim: int) -> bool:
    """Whether the absorbed form does fewer multiply-adds for `query_len` queries than the expanded one.

    Per cached row and head: absorbed costs T * (2 * kv_lora_rank + rope); expanded costs
    kv_lora_rank * (nope + v) to expand the row plus T * (nope + rope + v) to attend. With
    DeepSeek-V3's sizes (512, 128, 128) absorbing wins below ~170 query tokens.
    """
    return query_len * (2 * kv_lora_rank - nope_dim - v_dim) < kv_lora_rank * (nope_dim + v_dim)


def latent_attention(q_lat, q_pe, c_kv, k_pe, positions, scale: float):
    """Attention of absorbed queries over the latent cache.

    q_lat: [B, T, H, L]; q_pe: [B, T, H, R]; c_kv: [B, S, L]; k_pe: [B, S, R];
    positions: int32[B, T] -> latent outputs [B, T, H, L] in q_lat's dtype (still to multiply by W_vb).
    A query at position p sees cache rows j <= p.
    """
    s = c_kv.shape[1]
    scores = jnp.einsum("bthl,bsl->bhts", q_lat, c_kv.astype(q_lat.dtype)).astype(jnp.float32)
    scores = scores + jnp.einsum("bthr,bsr->bhts", q_pe, k_pe.astype(q_pe.dtype)).astype(jnp.float32)
    scores = scores * scale
    visible = jnp.arange(s)[None, None, :] <= positions[:, :, None]  # [B, T, S]
    scores = jnp.where(visible[:, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q_lat.dtype)
    return jnp.einsum("bhts,bsl->bthl", probs, c_kv.astype(q_lat.dtype))


class MLAttention(nnx.Module):
    """DeepSeek multi-head latent attention; same interface as `GQAttention`.

    Parameters ([in, out]; H heads, N = qk_nope_head_dim, R = qk_rope_head_dim, V = v_head_dim,
    L = kv_lora_rank, Q = q_lora_rank):
      q_proj [d, H*(N+R)]                               when q_lora_rank is None, else
      q_a_proj [d, Q] (+ q_a_bias [Q]), q_a_norm.scale [Q], q_b_proj [Q, H*(N+R)]
      kv_a_proj [d, L+R] (+ kv_a_bias [L+R])            (HF kv_a_proj_with_mqa: latent, then k_pe)
      kv_a_norm.scale [L]
      kv_b_proj [L, H*(N+V)]                            (per head: k_nope columns, then v columns)
      o_proj [H*V, d] (+ o_bias [d])
    Biases exist when cfg.attention_bias (q_a / kv_a) and cfg.attention_out_bias (o), mirroring
    transformers' `attention_bias`.
    """

    recurrent_cache = False  # writing a token's cache rows twice is writing them once

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        d, h = cfg.hidden_size, cfg.num_heads
        nope, rope, v, lora = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        self.num_heads, self.nope_dim, self.rope_dim, self.v_dim, self.kv_lora_rank = h, nope, rope, v, lora
        self.q_lora_rank = cfg.q_lora_rank
        if cfg.q_lora_rank is None:
            self.q_proj = normal_param(rngs, (d, h * (nope + rope)), dtype)
        else:
            self.q_a_proj = normal_param(rngs, (d, cfg.q_lora_rank), dtype)
            if cfg.attention_bias:
                self.q_a_bias = nnx.Param(jnp.zeros((cfg.q_lora_rank,), dtype))
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, LORA_NORM_EPS, dtype)
            self.q_b_proj = normal_param(rngs, (cfg.q_lora_rank, h * (nope + rope)), dtype)
        self.kv_a_proj = normal_param(rngs, (d, lora + rope), dtype)
        if cfg.attention_bias:
            self.kv_a_bias = nnx.Param(jnp.zeros((lora + rope,), dtype))
        self.kv_a_norm = RMSNorm(lora, LORA_NORM_EPS, dtype)
        self.kv_b_proj = normal_param(rngs, (lora, h * (nope + v)), dtype)
        self.o_proj = normal_param(rngs, (h * v, d), dtype)
        if cfg.attention_out_bias:
            self.o_bias = nnx.Param(jnp.zeros((d,), dtype))
        inv_freq, self.rope_scaling = rope_inv_freq(rope, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
        self.inv_freq = tuple(float(f) for f in inv_freq)  # static, hashable
        self.rope_interleaved = cfg.rope_interleaved
        self.scale = mla_softmax_scale(cfg)
        self.mode = "auto"  # "auto" | "absorbed" | "expanded" (static; tests force each)

    @staticmethod
    def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype) -> dict:
        """{'c_kv': [B, max_len, kv_lora_rank] (normed latent), 'k_pe': [B, max_len, qk_rope_head_dim] (roped)}."""
        return {
            "c_kv": device_zeros((batch, max_len, cfg.kv_lora_rank), dtype),
            "k_pe": device_zeros((batch, max_len, cfg.qk_rope_head_dim), dtype),
        }

    def _bias(self, name):
        return getattr(self, name)[...] if hasattr(self, name) else None

    def __call__(self, x, cache: dict, positions):
        """x: [B, T, d]; cache: see `init_cache`; positions: int32[B, T] -> ([B, T, d], updated cache)."""
        b, t, _ = x.shape
        h, nope, rope, vd, lora = self.num_heads, self.nope_dim, self.rope_dim, self.v_dim, self.kv_lora_rank
        if self.q_lora_rank is None:
            q = linear(x, self.q_proj[...])
        else:
            q = linear(self.q_a_norm(linear(x, self.q_a_proj[...], self._bias("q_a_bias"))), self.q_b_proj[...])
        q = q.reshape(b, t, h, nope + rope)
        q_nope, q_pe = q[..., :nope], q[..., nope:]  # [B, T, H, N], [B, T, H, R]

        kv = linear(x, self.kv_a_proj[...], self._bias("kv_a_bias"))  # [B, T, L + R]
        c_kv = self.kv_a_norm(kv[..., :lora])  # [B, T, L]
        k_pe = kv[..., lora:][:, :, None, :]  # [B, T, 1, R]: one rotary key shared by all heads

        cos, sin = rope_cos_sin(positions, self.inv_freq, self.rope_scaling)
        q_pe = apply_rope(q_pe, cos, sin, self.rope_interleaved)
        k_pe = apply_rope(k_pe, cos, sin, self.rope_interleaved)[:, :, 0, :]  # [B, T, R]

        start = positions[:, 0]
        cache = {"c_kv": write_cache(cache["c_kv"], c_kv, start), "k_pe": write_cache(cache["k_pe"], k_pe, start)}
        c_all, pe_all = cache["c_kv"], cache["k_pe"]  # [B, S, L], [B, S, R]

        w_kv = self.kv_b_proj[...].reshape(lora, h, nope + vd)
        w_kb, w_vb = w_kv[..., :nope], w_kv[..., nope:]  # [L, H, N], [L, H, V]
        mode = self.mode
        if mode == "auto":
            mode = "absorbed" if absorb_is_cheaper(t, lora, nope, vd) else "expanded"
        if mode == "absorbed":
            q_lat = jnp.einsum("bthn,lhn->bthl", q_nope, w_kb.astype(q.dtype))  # [B, T, H, L]
            out_lat = latent_attention(q_lat, q_pe, c_all, pe_all, positions, self.scale)
            out = jnp.einsum("bthl,lhv->bthv", out_lat, w_vb.astype(q.dtype))  # [B, T, H, V]
        elif mode == "expanded":
            s = c_all.shape[1]
            c = c_all.astype(q.dtype)
            k_nope = jnp.einsum("bsl,lhn->bshn", c, w_kb.astype(q.dtype))  # [B, S, H, N]
            v = jnp.einsum("bsl,lhv->bshv", c, w_vb.astype(q.dtype))  # [B, S, H, V]
            k_rot = jnp.broadcast_to(pe_all.astype(q.dtype)[:, :, None, :], (b, s, h, rope))
            k = jnp.concatenate([k_nope, k_rot], axis=-1)
            q_full = jnp.concatenate([q_nope, q_pe], axis=-1)
            out = causal_attention(q_full, k, v, positions, self.scale)  # [B, T, H, V]
        else:
            raise ValueError(f"MLAttention.mode must be one of {MLA_MODES}, got {mode!r}")
        return linear(out.reshape(b, t, h * vd), self.o_proj[...], self._bias("o_bias")), cache
