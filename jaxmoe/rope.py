"""Rotary position embeddings with the scaling variants our families use (default, linear, YaRN, llama3).

Frequencies are computed once on the host in float64/float32 exactly as Hugging Face computes them;
`apply_rope` rotates either halves (Llama/Mixtral/Qwen style) or adjacent pairs (DeepSeek style).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxmoe.config import RopeScaling
from jaxmoe.errors import JaxmoeError

ROPE_KINDS = ("default", "linear", "yarn", "llama3")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN magnitude correction `0.1 * mscale * ln(scale) + 1` (1 when scale <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(rotary_dim: int, theta: float, scaling: RopeScaling, max_position_embeddings: int):
    """Returns (inv_freq: float32[rotary_dim // 2], attention_scaling: float applied to cos/sin)."""
    pos_freqs = theta ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / rotary_dim)
    inv_freq = (1.0 / pos_freqs).astype(np.float32)
    kind = scaling.kind
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return (inv_freq / scaling.factor).astype(np.float32), 1.0
    if kind == "llama3":
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    if kind == "yarn":
        factor = scaling.factor
        original = scaling.original_max_position_embeddings or max_position_embeddings
        attention_factor = scaling.attention_factor
        if attention_factor is None:
            if scaling.mscale and scaling.mscale_all_dim:
                attention_factor = yarn_mscale(factor, scaling.mscale) / yarn_mscale(factor, scaling.mscale_all_dim)
            else:
                attention_factor = yarn_mscale(factor)

        def correction_dim(num_rotations):
            return (rotary_dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

        low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
        if scaling.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, rotary_dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(rotary_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        extrapolation_weight = 1 - ramp
        interpolation = 1.0 / (factor * pos_freqs)
        inv_freq = interpolation * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
        return inv_freq.astype(np.float32), float(attention_factor)
    raise JaxmoeError(f"unsupported rope scaling {kind!r}; supported: {', '.join(ROPE_KINDS)}")


def rope_cos_sin(positions, inv_freq, attention_scaling: float):
    """positions: int32[B, T] -> (cos, sin): float32[B, T, rotary_dim // 2]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    return jnp.cos(angles) * attention_scaling, jnp.sin(angles) * attention_scaling


def apply_rope(x, cos, sin, interleaved: bool):
    """x: [B, T, heads, rotary_dim]; cos/sin: [B, T, rotary_dim // 2] -> same shape/dtype as x.

    interleaved=False rotates (x[:d/2], x[d/2:]) pairs; True rotates (x[0::2], x[1::2]) pairs and
    returns them in the half-split order, as DeepSeek's reference implementation does before the
    dot product (the order is irrelevant to q.k as long as q and k agree).
    """
    dtype = x.dtype
    x = x.astype(jnp.float32)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(dtype)
