"""Gated DeltaNet linear attention (Qwen3-Next's "linear_attention" layers), whose cache is a running state.

Per token t and value head (each query/key head serves a group of r = nv / nk consecutive value heads):
  q_t, k_t, v_t   a causal depthwise convolution of width K over the projected q | k | v channels, then SiLU;
                  q_t and k_t L2-normalized over their head dim, q_t scaled by dk ** -0.5
  g_t = -exp(A_log) * softplus(a_t + dt_bias)  (log decay, <= 0),   beta_t = sigmoid(b_t)
  S_t = exp(g_t) S_{t-1},  then  S_t += k_t (beta_t (v_t - S_t^T k_t))^T      (the gated delta rule; S: [dk, dv])
  o_t = S_t^T q_t
then a gated RMSNorm per value head, RMSNorm(o_t) * weight * silu(z_t), and out_proj.

Cache per layer (its size does not depend on the sequence length):
  conv       [B, conv_dim, K-1]     the last K-1 convolution inputs (model dtype); conv_dim = 2 nk dk + nv dv
  recurrent  float32[B, nv, dk, dv] S after the last real token (float32, as transformers keeps it)
Padding (right padding, position -1: jaxmoe.attention): a padding token's decay is 0 and its beta 0, so it
leaves S exactly as it was, and the conv state is taken at the last real token; the state after a padded
prefill is the state after exactly its real tokens. A KV cache tolerates a token written twice; this state
does not (`recurrent_cache`): the offloaded engine's whole-token decode program keeps the pre-step state of
the layers it hands back to the layer path (jaxmoe.offload.decode_token_over_slots).

Prefill and decode run the same recurrence, a `jax.lax.scan` over the tokens in float32 (transformers'
torch fallback computes the same rule in float32, chunked for prompts and token by token for decode).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.config import ModelConfig
from jaxmoe.layers import device_zeros, linear, normal_param

L2_NORM_EPS = 1e-6  # transformers' l2norm (as the flash-linear-attention kernels)


def l2_normalize(x):
    """x: float32[..., n] -> x / sqrt(sum(x^2) + eps) over the last axis."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2_NORM_EPS)


def causal_conv(inputs, state, weight, num_real):
    """Causal depthwise convolution continuing from a state.

    inputs: [B, T, C]; state: [B, C, K-1] (the inputs before these); weight: [C, 1, K] (torch Conv1d layout);
    num_real: int32[B], the real tokens among the T (the rest are padding)
    -> (outputs [B, T, C] in inputs' dtype, before the activation; the new state [B, C, K-1]: the last K-1
    inputs up to the last real token). out[t] = sum_j weight[:, 0, j] * window[t + j], window = state ++ inputs.
    """
    width, t = weight.shape[-1], inputs.shape[1]
    window = jnp.concatenate([jnp.swapaxes(state, 1, 2).astype(inputs.dtype), inputs], axis=1)  # [B, K-1+T, C]
    w = weight[:, 0, :].astype(jnp.float32)  # [C, K]
    x32 = window.astype(jnp.float32)
    out = sum(x32[:, j : j + t, :] * w[:, j] for j in range(width))  # [B, T, C]
    last = jax.vmap(lambda win, n: jax.lax.dynamic_slice_in_dim(win, n, width - 1, axis=0))(window, num_real)
    return out.astype(inputs.dtype), jnp.swapaxes(last, 1, 2).astype(state.dtype)


def gated_delta_rule(q, k, v, g, beta, state):
    """The gated delta rule over T tokens (module docstring), one `lax.scan` step per token.

    q, k: float32[B, T, H, dk] (normalized; q scaled); v: float32[B, T, H, dv]; g, beta: float32[B, T, H];
    state: float32[B, H, dk, dv] -> (outputs float32[B, T, H, dv], state after the T tokens).
    Products are elementwise multiplies and sums (no matmul whose float32 precision a backend may lower).
    """

    def step(s, token):
        q_t, k_t, v_t, g_t, beta_t = token  # [B, H, dk], [B, H, dk], [B, H, dv], [B, H], [B, H]
        s = s * jnp.exp(g_t)[..., None, None]
        remembered = jnp.sum(s * k_t[..., :, None], axis=-2)  # [B, H, dv]: S^T k
        delta = (v_t - remembered) * beta_t[..., None]
        s = s + k_t[..., :, None] * delta[..., None, :]
        return s, jnp.sum(s * q_t[..., :, None], axis=-2)

    tokens = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, g, beta))
    state, out = jax.lax.scan(step, state, tokens)
    return jnp.moveaxis(out, 0, 1), state


class GatedRMSNorm(nnx.Module):
    """RMSNorm over the last axis with a plain weight, then times silu(gate) in float32 (transformers'
    Qwen3NextRMSNormGated: normalized in float32, rounded, scaled in x's dtype, gated, rounded)."""

    def __init__(self, size: int, eps: float, dtype):
        self.scale = nnx.Param(jnp.ones((size,), dtype))
        self.eps = eps

    def __call__(self, x, gate):
        """x, gate: [..., size] -> [..., size] in x's dtype."""
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        y = self.scale[...].astype(dtype) * x32.astype(dtype)
        return (y.astype(jnp.float32) * jax.nn.silu(gate.astype(jnp.float32))).astype(dtype)


class GatedDeltaNet(nnx.Module):
    """Gated DeltaNet token mixer; same interface as `GQAttention` (x, cache, positions).

    Parameters (nk key heads of width dk, nv value heads of width dv, r = nv / nk, K the conv width):
      in_proj_qkvz [d, nk * (2 dk + 2 r dv)]   per key head: q [dk], k [dk], v [r dv], z [r dv] (the Hub's layout)
      in_proj_ba [d, nk * 2 r]                  per key head: b [r] (beta logits), a [r] (decay inputs)
      conv_weight [conv_dim, 1, K]              depthwise kernel over the channels q | k | v (torch Conv1d layout)
      A_log [nv], dt_bias [nv]                  decay parameters
      norm.scale [dv]                           the gated RMSNorm's weight
      out_proj [nv dv, d]
    """

    recurrent_cache = True  # the cache is a running state: a token applied twice is not applied once

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs | None):
        d = cfg.hidden_size
        nk, nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.num_key_heads, self.num_value_heads, self.key_dim, self.value_dim = nk, nv, dk, dv
        self.group = nv // nk
        self.in_proj_qkvz = normal_param(rngs, (d, nk * (2 * dk + 2 * self.group * dv)), dtype)
        self.in_proj_ba = normal_param(rngs, (d, nk * 2 * self.group), dtype)
        self.conv_weight = normal_param(rngs, (self.conv_dim(cfg), 1, cfg.linear_conv_kernel), dtype)
        self.A_log = nnx.Param(jnp.zeros((nv,), dtype))
        self.dt_bias = nnx.Param(jnp.ones((nv,), dtype))
        self.norm = GatedRMSNorm(dv, cfg.rms_norm_eps, dtype)
        self.out_proj = normal_param(rngs, (nv * dv, d), dtype)

    @staticmethod
    def conv_dim(cfg: ModelConfig) -> int:
        """Channels of the convolution: q and k (nk * dk each), v (nv * dv)."""
        return 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + cfg.linear_num_value_heads * cfg.linear_value_head_dim

    @staticmethod
    def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype) -> dict:
        """{'conv': [B, conv_dim, K-1] zeros of dtype, 'recurrent': float32[B, nv, dk, dv] zeros}; max_len unused."""
        return {
            "conv": device_zeros((batch, GatedDeltaNet.conv_dim(cfg), cfg.linear_conv_kernel - 1), dtype),
            "recurrent": device_zeros((batch, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                       cfg.linear_value_head_dim), jnp.float32),
        }

    def _project(self, x):
        """x: [B, T, d] -> (q | k | v channels [B, T, conv_dim], z [B, T, nv, dv], b [B, T, nv], a [B, T, nv])."""
        b, t, _ = x.shape
        nk, dk, dv, r = self.num_key_heads, self.key_dim, self.value_dim, self.group
        qkvz = linear(x, self.in_proj_qkvz[...]).reshape(b, t, nk, 2 * dk + 2 * r * dv)
        q, k, v, z = jnp.split(qkvz, [dk, 2 * dk, 2 * dk + r * dv], axis=-1)
        ba = linear(x, self.in_proj_ba[...]).reshape(b, t, nk, 2 * r)
        beta_logits, decay_in = ba[..., :r].reshape(b, t, -1), ba[..., r:].reshape(b, t, -1)
        channels = jnp.concatenate([q.reshape(b, t, -1), k.reshape(b, t, -1), v.reshape(b, t, -1)], axis=-1)
        return channels, z.reshape(b, t, -1, dv), beta_logits, decay_in

    def __call__(self, x, cache: dict, positions):
        """x: [B, T, d]; cache: see `init_cache`; positions: int32[B, T], -1 for padding -> ([B, T, d], cache)."""
        b, t, _ = x.shape
        nk, dk, dv, r = self.num_key_heads, self.key_dim, self.value_dim, self.group
        real = positions >= 0  # [B, T]
        channels, z, beta_logits, decay_in = self._project(x)
        conv_out, conv_state = causal_conv(channels, cache["conv"], self.conv_weight[...],
                                           jnp.sum(real, axis=1, dtype=jnp.int32))
        mixed = jax.nn.silu(conv_out)  # [B, T, conv_dim]
        q, k, v = jnp.split(mixed, [nk * dk, 2 * nk * dk], axis=-1)
        q = l2_normalize(q.reshape(b, t, nk, dk).astype(jnp.float32)) * dk**-0.5
        k = l2_normalize(k.reshape(b, t, nk, dk).astype(jnp.float32))
        q, k = jnp.repeat(q, r, axis=2), jnp.repeat(k, r, axis=2)  # [B, T, nv, dk]: value head i reads key head i // r
        v = v.reshape(b, t, -1, dv).astype(jnp.float32)
        beta = jax.nn.sigmoid(beta_logits).astype(jnp.float32)  # [B, T, nv]
        g = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(
            decay_in.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
        beta = jnp.where(real[..., None], beta, 0.0)  # padding: no write, no decay
        g = jnp.where(real[..., None], g, 0.0)
        out, state = gated_delta_rule(q, k, v, g, beta, cache["recurrent"])  # [B, T, nv, dv]
        out = self.norm(out.astype(x.dtype), z)
        return linear(out.reshape(b, t, -1), self.out_proj[...]), {"conv": conv_state, "recurrent": state}
