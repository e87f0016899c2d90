"""MXFP4 expert weights (OpenAI gpt-oss Hub checkpoints) -> bfloat16, in the layout of the unquantized model.

Format. A quantized matrix `X` is stored as two uint8 tensors:
  - `X_blocks` [..., R, G, B]: the R rows of X, each cut into G groups of 2*B values. Each byte holds two
    FP4 (E2M1) codes: the low nibble is the first value of the pair, the high nibble the second.
  - `X_scales` [..., R, G]: one E8M0 exponent per group; a group's values are multiplied by 2**(s - 127).
An FP4 code indexes `FP4_VALUES` (sign bit 3, then 8 magnitudes from 0 to 6). For gpt-oss, B = 16, so a
group is 32 values, and e.g. `gate_up_proj_blocks` is [E, 2I, H/32, 16] for an [E, 2I, H] matrix.

Layout. Like transformers' `convert_moe_packed_tensors`, the dequantized [..., R, G*B*2] matrix is returned
with its last two axes swapped, [..., G*B*2, R]: for gate_up_proj that is [E, H, 2I], the layout of the
unquantized `gate_up_proj` parameter. (transformers swaps axes 1 and 2, which are the last two for the 4-D
tensors the Hub uses; it fails on 3-D input, which here gives [G*B*2, R].)

Exactness. Each value is ldexp(FP4 value, s - 127), computed in float32 and stored as bfloat16, as
transformers' `torch.ldexp` on bf16 does. FP4 values have 2 significant bits, so every finite result is exact
in bf16, subnormals included (the smallest, 0.5 * 2**-127, is a bf16 subnormal). Large exponents overflow to
+-inf (e.g. 6 * 2**126 at s = 253). s = 255 (NaN in the OCP MX spec) is taken as 2**128, as transformers does:
+-0.5 -> +-2**127, larger magnitudes -> +-inf, zero codes stay +-0 (no NaN).
Work is done one expert (and at most CHUNK_VALUES output values) at a time, into a preallocated output.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from jaxmoe.errors import JaxmoeError
from jaxmoe.expert_quant import FP4_VALUES  # E2M1 code -> value; codes 8..15 are the negatives of 0..7

BLOCKS = "_blocks"
SCALES = "_scales"
BF16 = np.dtype(ml_dtypes.bfloat16)
# E8M0 byte -> 2**(s - 127) as float32, exact down to 2**-149 (subnormal); s = 255 capped at 2**127 (see below)
SCALE_VALUES = np.ldexp(np.float32(1.0), np.minimum(np.arange(256), 254) - 127).astype(np.float32)
CHUNK_VALUES = 1 << 24  # output values dequantized per step: 64 MiB of float32 scratch
TILE_ROWS = 128  # rows per transposed copy into the output


def dequantized_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """[..., R, G, B] packed -> [..., G*B*2, R] dequantized."""
    *lead, r, g, b = blocks_shape
    return (*lead, g * b * 2, r)


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """blocks uint8 [..., R, G, B], scales uint8 [..., R, G] -> bfloat16 [..., G*B*2, R].

    Equals transformers' `convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)` bit for bit on the
    4-D tensors of the Hub checkpoints (see the module docstring for other ranks).
    """
    if not isinstance(blocks, np.ndarray) or blocks.dtype != np.uint8 or blocks.ndim < 3:
        raise JaxmoeError(f"mxfp4 blocks must be a uint8 array with at least 3 dims, got {_describe(blocks)}")
    if not isinstance(scales, np.ndarray) or scales.dtype != np.uint8 or scales.shape != blocks.shape[:-1]:
        raise JaxmoeError(
            f"mxfp4 scales must be uint8 of shape {list(blocks.shape[:-1])} (blocks {list(blocks.shape)}), "
            f"got {_describe(scales)}"
        )
    *lead, r, g, b = blocks.shape
    k = g * b * 2
    n = math.prod(lead)
    out = np.empty(dequantized_shape(blocks.shape), BF16)
    flat_out = out.reshape(n, k, r)  # a view: `out` is contiguous
    flat_blocks = blocks.reshape(n, r, g, b)
    flat_scales = scales.reshape(n, r, g)
    rows = max(1, min(r, CHUNK_VALUES // max(k, 1)))
    scratch = np.empty((rows, g, b, 2), np.float32)  # reused: fresh pages per chunk cost more than the math
    for e in range(n):
        for r0 in range(0, r, rows):
            r1 = min(r0 + rows, r)
            values = _dequantize_rows(flat_blocks[e, r0:r1], flat_scales[e, r0:r1], scratch[: r1 - r0])
            _write_transposed(flat_out[e, :, r0:r1], values.reshape(r1 - r0, k))
    return out


def _dequantize_rows(blocks: np.ndarray, scales: np.ndarray, values: np.ndarray) -> np.ndarray:
    """blocks uint8 [rows, G, B], scales uint8 [rows, G] -> `values` float32 [rows, G, B, 2], filled and returned:
    ldexp(FP4 value, s - 127), exact or +-inf."""
    values[..., 0] = FP4_VALUES[blocks & 0x0F]  # low nibble first
    values[..., 1] = FP4_VALUES[blocks >> 4]
    with np.errstate(over="ignore"):  # overflow to +-inf, as in transformers
        values *= SCALE_VALUES[scales][:, :, None, None]
        top = scales == 255  # 2**128 is not a float32: scaled by 2**127 above, by 2 here (exact, or inf)
        if top.any():
            values[top] *= 2
    return values


def _write_transposed(dst: np.ndarray, src: np.ndarray) -> None:
    """dst bfloat16 [K, rows] = src float32 [rows, K].T, rounded to nearest even, TILE_ROWS rows at a time
    (one strided copy of the whole chunk runs ~3x slower: its writes miss the cache)."""
    for t0 in range(0, src.shape[0], TILE_ROWS):
        t1 = min(t0 + TILE_ROWS, src.shape[0])
        dst[:, t0:t1] = src[t0:t1].T


def _describe(x) -> str:
    if isinstance(x, np.ndarray):
        return f"{x.dtype} {list(x.shape)}"
    return type(x).__name__


class Mxfp4Source:
    """A checkpoint source in which every `X_blocks` + `X_scales` pair reads as one bfloat16 tensor `X`.

    Same interface as `convert.source.SafetensorsSource` (`hf_dir`, `keys()`, `file_of`, `shape_of`,
    `dtype_of`, `read`, `total_bytes`); `X` has the dequantized shape [..., G*B*2, R], dtype "BF16" and the
    file of `X_blocks`. Other tensors pass through unchanged.
    """

    def __init__(self, source):
        self.hf_dir = source.hf_dir
        self._source = source
        self._packed: dict[str, tuple[str, str]] = {}  # X -> (X_blocks, X_scales)
        self.file_of: dict = {}
        self.shape_of: dict[str, tuple[int, ...]] = {}
        self.dtype_of: dict[str, str] = {}
        real = set(source.keys())
        for key in sorted(real):
            path = source.file_of[key]
            if key.endswith(SCALES):
                blocks_key = key[: -len(SCALES)] + BLOCKS
                if blocks_key not in real:
                    raise JaxmoeError(f"{path}: tensor {key} has no matching {blocks_key}")
                continue
            if not key.endswith(BLOCKS):
                self.file_of[key] = path
                self.shape_of[key], self.dtype_of[key] = source.shape_of[key], source.dtype_of[key]
                continue
            name = key[: -len(BLOCKS)]
            scales_key = name + SCALES
            if scales_key not in real:
                raise JaxmoeError(f"{path}: tensor {key} has no matching {scales_key}")
            if name in real:
                raise JaxmoeError(f"{path}: tensor {key} would dequantize to {name}, which is already a tensor")
            shape, scales_shape = source.shape_of[key], source.shape_of[scales_key]
            if source.dtype_of[key] != "U8" or len(shape) < 3:
                raise JaxmoeError(
                    f"{path}: tensor {key} must be U8 with at least 3 dims, got {source.dtype_of[key]} {list(shape)}"
                )
            if source.dtype_of[scales_key] != "U8" or scales_shape != shape[:-1]:
                raise JaxmoeError(
                    f"{source.file_of[scales_key]}: tensor {scales_key} must be U8 of shape {list(shape[:-1])} "
                    f"to match {key}, got {source.dtype_of[scales_key]} {list(scales_shape)}"
                )
            self._packed[name] = (key, scales_key)
            self.file_of[name], self.shape_of[name], self.dtype_of[name] = path, dequantized_shape(shape), "BF16"

    def keys(self) -> list[str]:
        return sorted(self.file_of)

    @property
    def total_bytes(self) -> int:
        """Bytes of the checkpoint files on disk (packed size)."""
        return self._source.total_bytes

    def read(self, key: str) -> np.ndarray:
        """The tensor `key` as a host numpy array; a packed one dequantized to bfloat16 [..., G*B*2, R]."""
        if key not in self._packed:
            return self._source.read(key)
        blocks_key, scales_key = self._packed[key]
        return dequantize_mxfp4(self._source.read(blocks_key), self._source.read(scales_key))
