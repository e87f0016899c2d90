"""Weight-only int8 / int4 / MXFP4 quantization of routed experts: fewer bytes over the host-to-device link.

Offloaded decoding is bound by the link wherever the cache is small (bench/results/h100: 0.5 ms to move
one 9.4 MB Qwen3-30B-A3B expert, against ~25 us to compute with it). Quantized, an expert moves as codes
plus float32 scales, and is dequantized where the kernel reads it.

Schemes (symmetric, round to nearest), for a weight w [a, b] (input dim a, output dim b):
  int8  one scale per output column: scale[j] = max_i |w[i, j]| / 127, codes round(w / scale) in
        [-127, 127]; 0.50x the bytes of bfloat16 (plus 4 bytes per column).
  int4  one scale per output column and group of 64 input rows (`int4_group`), codes in [-7, 7], two per
        byte; 0.28x the bytes of bfloat16. Coarser: the model changes more (the default model's
        next-token KL against bfloat16 is ~9x int8's; see the README).
  mxfp4 the OCP microscaling format GPT-OSS ships its experts in: per output column and group of 32 input rows
        one power-of-two scale (an E8M0 byte, 2**(s - 127)) and FP4 E2M1 codes (values 0, 0.5, 1, 1.5, 2, 3, 4, 6
        and their negatives), two per byte; 0.27x the bytes of bfloat16. The scale puts the group's largest
        magnitude in [4, 8) (larger values clip to 6), so weights that are MXFP4 values already -- a checkpoint
        converted from the Hub's MXFP4 tensors (`convert.mxfp4`), whose groups are the same 32 input rows --
        quantize back to exactly themselves: for GPT-OSS this mode is lossless.
The weight used is dequantize(codes, scale) = float32(code) * its scale, rounded to the compute dtype. The
resident engine uses exactly these dequantized weights, so offloaded and resident runs of a quantized
model agree as they do unquantized; against the unquantized model the outputs differ by the quantization
error (tests/test_expert_quant.py bounds it).

`QuantizedStack` holds quantized weights stacked over slots on the device; the expert kernels index it as
an array (`stack[ids]` -> dequantized weights). Imports nothing from the runtime or the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.errors import JaxmoeError

QUANTIZE_MODES = ("int8", "int4", "mxfp4")
INT8_MAX = 127
INT4_MAX = 7
INT4_GROUP = 64  # input rows sharing one int4 scale (fewer where the input dim is not a multiple)
MXFP4_GROUP = 32  # input rows sharing one MXFP4 scale
FP4_MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)  # E2M1 codes 0..7; 8..15 negative
FP4_VALUES = np.concatenate([FP4_MAGNITUDES, -FP4_MAGNITUDES])


def int4_group(rows: int) -> int:
    """The int4 scale group along an input dim of `rows` (even): INT4_GROUP, or the largest power of two
    below it that divides `rows`."""
    if rows % 2:
        raise ValueError(f"int4 experts need an even input dimension, got {rows}")
    group = INT4_GROUP
    while rows % group:
        group //= 2
    return group


def quantize(w: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """w: [..., a, b] (any float dtype) -> (codes, scale float32), symmetric round-to-nearest:
    int8: codes int8[..., a, b], scale [..., b] (per output column);
    int4: codes uint8[..., a/2, b] (rows 2i and 2i+1 as the low and high nibble of byte i, each code + 8),
          scale [..., a/g, b] (per output column and group of g = `int4_group(a)` input rows).
    mxfp4: codes uint8[..., a/2, b] (E2M1 codes, rows paired as int4), scale uint8[..., a/32, b] (E8M0 bytes).
    An all-zero column (group) gets scale 1 (its codes are 0)."""
    w32 = np.asarray(w, np.float32)
    *lead, a, b = w32.shape
    if mode == "mxfp4":
        return _quantize_mxfp4(w32)
    if mode == "int8":
        groups, top = w32[..., None, :, :], INT8_MAX  # one group of all a rows
    elif mode == "int4":
        g = int4_group(a)
        groups, top = w32.reshape(*lead, a // g, g, b), INT4_MAX
    else:
        raise ValueError(f"unknown quantization {mode!r}")
    absmax = np.max(np.abs(groups), axis=-2)  # [..., groups, b]
    scale = np.where(absmax > 0, absmax / top, 1.0).astype(np.float32)
    codes = np.clip(np.rint(groups / scale[..., None, :]), -top, top).astype(np.int8).reshape(*lead, a, b)
    if mode == "int8":
        return codes, scale[..., 0, :]
    nibbles = (codes + 8).astype(np.uint8)
    return nibbles[..., 0::2, :] | (nibbles[..., 1::2, :] << 4), scale


def _quantize_mxfp4(w32: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    *lead, a, b = w32.shape
    groups = w32.reshape(*lead, a // MXFP4_GROUP, MXFP4_GROUP, b)
    absmax = np.max(np.abs(groups), axis=-2)  # [..., a/32, b]
    # the exponent e with absmax / 2**e in [4, 8): floor(log2(absmax)) - 2, from the float's own exponent field
    exponent = np.frexp(np.where(absmax > 0, absmax, 1.0))[1].astype(np.int32) - 1 - 2
    exponent = np.clip(np.where(absmax > 0, exponent, 0), -127, 127)
    scaled = np.abs(groups) / np.ldexp(np.float32(1.0), exponent)[..., None, :]  # exact: a power of two
    midpoints = (FP4_MAGNITUDES[1:] + FP4_MAGNITUDES[:-1]) / 2
    magnitude = np.searchsorted(midpoints, np.minimum(scaled, 6.0)).astype(np.uint8)  # nearest code, clipped at 6
    codes = np.where((groups < 0) & (magnitude > 0), magnitude + 8, magnitude).astype(np.uint8).reshape(*lead, a, b)
    return codes[..., 0::2, :] | (codes[..., 1::2, :] << 4), (exponent + 127).astype(np.uint8)


def _e8m0(scale, xp):
    """E8M0 bytes -> float32 2**(s - 127), exactly (s = 0: the subnormal 2**-127), from the float's bits."""
    bits = xp.where(scale == 0, np.uint32(1 << 22), scale.astype(xp.uint32) << 23)
    return bits.view(np.float32) if xp is np else jax.lax.bitcast_convert_type(bits, jnp.float32)


def dequantize(codes, scale, dtype, mode: str, xp=np):
    """The weight the kernels use: float32(code) * its scale, rounded to `dtype` -> [..., a, b]. xp: numpy
    (the resident engine's weights) or jax.numpy (the kernels): the same operations, the same result."""
    if mode == "mxfp4":
        pairs = xp.stack([codes & 15, codes >> 4], axis=-2)  # [..., a/2, 2, b]
        *lead, half, _, b = pairs.shape
        values = xp.asarray(FP4_VALUES)[pairs.astype(xp.int32)]
        groups = values.reshape(*lead, scale.shape[-2], 2 * half // scale.shape[-2], b)
        return (groups * _e8m0(scale, xp)[..., :, None, :]).reshape(*lead, 2 * half, b).astype(dtype)
    if mode == "int4":
        low = (codes & 15).astype(xp.int8) - 8
        high = (codes >> 4).astype(xp.int8) - 8
        values = xp.stack([low, high], axis=-2)  # [..., a/2, 2, b]
        *lead, half, _, b = values.shape
        groups = values.reshape(*lead, scale.shape[-2], 2 * half // scale.shape[-2], b)
        return (groups.astype(xp.float32) * scale[..., :, None, :]).reshape(*lead, 2 * half, b).astype(dtype)
    return (codes.astype(xp.float32) * scale[..., None, :]).astype(dtype)


def quantized_shapes(shape: tuple[int, int], mode: str) -> tuple[tuple[tuple[int, ...], object], tuple[int, ...]]:
    """One weight's (a, b) -> ((codes shape, codes dtype), scale shape) as `quantize` returns them."""
    a, b = shape
    if mode == "int8":
        return ((a, b), np.int8), (b,)
    if mode == "mxfp4":
        return ((a // 2, b), np.uint8), (a // MXFP4_GROUP, b)
    return ((a // 2, b), np.uint8), (a // int4_group(a), b)


def scale_dtype(mode: str):
    """The dtype of a mode's scales: E8M0 bytes for mxfp4, float32 otherwise."""
    return np.uint8 if mode == "mxfp4" else np.float32


def check_quantize(mode: str | None, hidden_size: int | None = None, intermediate_size: int | None = None) -> None:
    """Raises JaxmoeError naming the flag when `mode` is not None and not a known quantization, or (given the
    experts' dimensions) cannot quantize them: int4 packs pairs of input rows, so both must be even."""
    if mode is None:
        return
    if mode not in QUANTIZE_MODES:
        raise JaxmoeError(f"--quantize-experts {mode!r}: expected one of {', '.join(QUANTIZE_MODES)}")
    if mode == "int4" and any(n is not None and n % 2 for n in (hidden_size, intermediate_size)):
        raise JaxmoeError(f"--quantize-experts int4: needs even expert dimensions; the model has hidden size "
                          f"{hidden_size} and expert intermediate size {intermediate_size} (int8 has no such limit)")
    if mode == "mxfp4" and any(n is not None and n % MXFP4_GROUP for n in (hidden_size, intermediate_size)):
        raise JaxmoeError(f"--quantize-experts mxfp4: needs expert dimensions that are multiples of {MXFP4_GROUP}; the "
                          f"model has hidden size {hidden_size} and expert intermediate size {intermediate_size}")


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class QuantizedStack:
    """Quantized weights stacked over a leading slot axis, as `quantize` lays them out per slot: codes
    [S, ...] and scale [S, ...] (float32, E8M0 bytes for mxfp4). dtype (static): the compute dtype they
    dequantize to; mode (static): int8, int4 or mxfp4. Indexing the leading axis, as the kernels index a weight array, returns dequantized
    weights of that dtype: stack[ids] -> [*ids.shape, a, b]."""

    codes: jax.Array
    scale: jax.Array
    dtype: str = field(metadata=dict(static=True))
    mode: str = field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        """[S, a, b]: the shape of the dequantized stack."""
        s, a, b = self.codes.shape
        return (s, a if self.mode == "int8" else 2 * a, b)

    def __getitem__(self, index):
        return dequantize(self.codes[index], self.scale[index], self.dtype, self.mode, jnp)

    def row(self, slot):
        """One slot (traced int32 scalar) -> dequantized [a, b]."""
        take = lambda x: jax.lax.dynamic_index_in_dim(x, slot, 0, keepdims=False)  # noqa: E731
        return dequantize(take(self.codes), take(self.scale), self.dtype, self.mode, jnp)


def weight_row(w, slot):
    """w: a stacked weight array [S, a, b] or a `QuantizedStack`; slot: traced int32 scalar -> [a, b]."""
    if isinstance(w, QuantizedStack):
        return w.row(slot)
    return jax.lax.dynamic_index_in_dim(w, slot, 0, keepdims=False)
