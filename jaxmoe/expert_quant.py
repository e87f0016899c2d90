"""Weight-only int8 quantization of routed experts: half the bytes over the host-to-device link.

Offloaded decoding is bound by the link wherever the cache is small (bench/results/h100: 0.5 ms to move
one 9.4 MB Qwen3-30B-A3B expert, against ~25 us to compute with it). Quantized, an expert moves as int8
codes plus one float32 scale per output channel, and is dequantized where the kernel reads it.

Scheme (symmetric, per output channel): for a weight w [a, b] (input dim a, output dim b),
scale[j] = max_i |w[i, j]| / 127 and codes = round(w / scale) in [-127, 127]; the weight used is
dequantize(codes, scale) = (float32(codes) * scale[None, :]) rounded to the compute dtype. The resident
engine uses exactly these dequantized weights, so offloaded and resident runs of a quantized model agree
as they do unquantized; against the unquantized model the outputs differ by the quantization error
(tests/test_expert_quant.py bounds it).

`Int8Stack` holds quantized weights stacked over slots on the device; the expert kernels index it as an
array (`stack[ids]` -> dequantized weights). Imports nothing from the runtime or the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

QUANTIZE_MODES = ("int8",)
CODE_MAX = 127


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w: [..., a, b] (any float dtype) -> (codes int8[..., a, b], scale float32[..., b]), per output column.
    An all-zero column gets scale 1 (its codes are 0)."""
    w32 = np.asarray(w, np.float32)
    absmax = np.max(np.abs(w32), axis=-2)  # [..., b]
    scale = np.where(absmax > 0, absmax / CODE_MAX, 1.0).astype(np.float32)
    codes = np.clip(np.rint(w32 / scale[..., None, :]), -CODE_MAX, CODE_MAX).astype(np.int8)
    return codes, scale


def dequantize_int8(codes: np.ndarray, scale: np.ndarray, dtype) -> np.ndarray:
    """The weight the kernels use: (float32(codes) * scale) rounded to `dtype` -> [..., a, b] numpy."""
    return (codes.astype(np.float32) * scale[..., None, :]).astype(dtype)


def check_quantize(mode: str | None) -> None:
    """Raises ValueError naming the flag when `mode` is not None and not a known quantization."""
    if mode is not None and mode not in QUANTIZE_MODES:
        raise ValueError(f"--quantize-experts {mode!r}: expected one of {', '.join(QUANTIZE_MODES)}")


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Int8Stack:
    """Quantized weights stacked over a leading slot axis: codes int8[S, a, b], scale float32[S, b].
    dtype (static): the compute dtype the weights dequantize to. Indexing the leading axis, as the kernels
    index a weight array, returns dequantized weights of that dtype: stack[ids] -> [*ids.shape, a, b]."""

    codes: jax.Array
    scale: jax.Array
    dtype: str = field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.codes.shape

    def __getitem__(self, index):
        scale = self.scale[index]
        return (self.codes[index].astype(jnp.float32) * scale[..., None, :]).astype(self.dtype)

    def row(self, slot):
        """One slot (traced int32 scalar) -> dequantized [a, b]."""
        codes = jax.lax.dynamic_index_in_dim(self.codes, slot, 0, keepdims=False)
        scale = jax.lax.dynamic_index_in_dim(self.scale, slot, 0, keepdims=False)
        return (codes.astype(jnp.float32) * scale[None, :]).astype(self.dtype)


def weight_row(w, slot):
    """w: a stacked weight array [S, a, b] or an `Int8Stack`; slot: traced int32 scalar -> [a, b]."""
    if isinstance(w, Int8Stack):
        return w.row(slot)
    return jax.lax.dynamic_index_in_dim(w, slot, 0, keepdims=False)
