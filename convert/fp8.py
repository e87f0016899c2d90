"""FP8 block-wise ("fine-grained") checkpoints -> float32 tensors in the layout of the unquantized model.

Format. The checkpoints of DeepSeek-V3/R1/V3.1, Kimi-K2, Qwen3-*-FP8, GLM-4.5/4.6-FP8 and MiniMax-M2 declare
  config.json quantization_config = {"quant_method": "fp8", "weight_block_size": [BM, BN],
                                     "activation_scheme": "dynamic", "fmt": "e4m3", "scale_fmt": ..., ...}
and ship each quantized matrix `X` [..., out, in] as two tensors:
  - `X` float8_e4m3fn [..., out, in] (`*.weight` for a linear layer; a fused expert tensor has leading dims);
  - `X_scale_inv` [..., ceil(out/BM), ceil(in/BN)] (`*.weight_scale_inv`): block (i, j) covers rows
    [i*BM, (i+1)*BM) and columns [j*BN, (j+1)*BN), cut short at the edges when out or in is not a multiple.
The stored value is X * X_scale_inv (the quantizer divided the block by that scale, amax / 448).
Scales are float32 (bfloat16 / float16 are widened exactly), or uint8 E8M0 exponents meaning 2**(b - 127), as
transformers reads them (b = 255 gives +inf, as its `exp2` does). `scale_fmt` "ue8m0" (DeepSeek-V3.1) only says
the float32 scales are powers of two; it changes nothing here. Tensors without a scale (embeddings, norms, the
router and lm_head listed in `modules_to_not_convert`) are stored unquantized and pass through.

Exactness. As transformers' `Fp8Dequantize` (what `from_pretrained(..., quantization_config=
FineGrainedFP8Config(dequantize=True))` runs): the fp8 value widened to float32 (exact), times the float32 scale in
float32 (one rounding), then rounded once to the parameter's dtype (the converter's `--dtype`): bit for bit the
tensors transformers loads wherever the weight is a whole number of blocks.

Ragged edges. transformers 5.25's loader takes the block as (out // scale rows, in // scale columns): for a shape
that is not whole blocks it either fails (DeepSeek-V3's kv_a_proj_with_mqa: 576 rows, 5 scale rows) or cuts the
blocks wrongly (20 rows in blocks of 16: blocks of 10). We use the block size the config declares, as transformers'
own `_dequantize_fp8_weight` (its FP8 backward pass) does; in float32 the two agree bit for bit on every shape.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from jaxmoe.errors import JaxmoeError

SCALE_SUFFIX = "_scale_inv"  # `X.weight` -> `X.weight_scale_inv`, a fused `X.gate_up_proj` -> `X.gate_up_proj_scale_inv`
FP8_DTYPE = "F8_E4M3"  # safetensors' name for float8_e4m3fn
SCALE_DTYPES = ("F32", "BF16", "F16", "U8")  # safetensors' names of the scale dtypes read
SCALE_NUMPY_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16), np.dtype(np.uint8))
DEFAULT_BLOCK_SIZE = (128, 128)  # transformers' FineGrainedFP8Config default when weight_block_size is absent
FORMATS = ("e4m3", "float8_e4m3fn")  # `fmt` as DeepSeek's and MiniMax-M2's config.json spell it
SCALE_FORMATS = ("float", "ue8m0")


def block_size_of(quantization_config: dict) -> tuple[int, int]:
    """(BM, BN) rows x columns per scale of an fp8 `quantization_config`, after checking the fields that change what
    the tensors mean; raises a one-line JaxmoeError naming config.json and the field."""
    where = "config.json: quantization_config"
    fmt = quantization_config.get("fmt", "e4m3")
    if fmt not in FORMATS:
        raise JaxmoeError(f"{where} fmt {fmt!r} is not supported; fp8 checkpoints convert from {' / '.join(FORMATS)}")
    scale_fmt = quantization_config.get("scale_fmt", "float")
    if scale_fmt not in SCALE_FORMATS:
        raise JaxmoeError(f"{where} scale_fmt {scale_fmt!r} is not supported; expected one of {', '.join(SCALE_FORMATS)}")
    scheme = str(quantization_config.get("activation_scheme", "dynamic")).lower()
    if scheme != "dynamic":
        raise JaxmoeError(f"{where} activation_scheme {scheme!r} is not supported; fp8 checkpoints convert with 'dynamic'")
    expert_dtype = quantization_config.get("expert_dtype", "fp8")
    if expert_dtype != "fp8":
        raise JaxmoeError(f"{where} expert_dtype {expert_dtype!r} is not supported; fp8 checkpoints convert with 'fp8'")
    block = quantization_config.get("weight_block_size", list(DEFAULT_BLOCK_SIZE))
    if not (isinstance(block, (list, tuple)) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise JaxmoeError(f"{where} weight_block_size must be 2 positive integers (e.g. [128, 128]), got {block!r}")
    return int(block[0]), int(block[1])


def scale_grid_shape(weight_shape: tuple[int, ...], block_size: tuple[int, int]) -> tuple[int, ...]:
    """[..., out, in] -> [..., ceil(out/BM), ceil(in/BN)]: the shape of the weight's scale tensor."""
    *lead, rows, cols = weight_shape
    return (*lead, math.ceil(rows / block_size[0]), math.ceil(cols / block_size[1]))


def scales_as_float32(scale_inv: np.ndarray) -> np.ndarray:
    """Scale tensor -> float32 of the same shape: float types widened exactly, uint8 E8M0 bytes b -> 2**(b - 127)
    (2**-127 is a float32 subnormal, exact; b = 255 -> +inf)."""
    if scale_inv.dtype == np.uint8:
        with np.errstate(over="ignore"):
            return np.ldexp(np.float32(1.0), scale_inv.astype(np.int32) - 127).astype(np.float32)
    return scale_inv.astype(np.float32)


def dequantize_fp8(weight: np.ndarray, scale_inv: np.ndarray, block_size: tuple[int, int], dtype=np.float32) -> np.ndarray:
    """weight float8_e4m3fn [..., out, in], scale_inv float32/bfloat16/float16/uint8(E8M0) [..., ceil(out/BM),
    ceil(in/BN)] -> `dtype` [..., out, in]: weight * its block's scale, computed in float32 and rounded once to
    `dtype` (see the module docstring). Works one block row at a time into a preallocated output."""
    if not isinstance(weight, np.ndarray) or weight.dtype != ml_dtypes.float8_e4m3fn or weight.ndim < 2:
        raise JaxmoeError(f"fp8 weight must be a float8_e4m3fn array with at least 2 dims, got {_describe(weight)}")
    want = scale_grid_shape(weight.shape, block_size)
    if not isinstance(scale_inv, np.ndarray) or scale_inv.shape != want or scale_inv.dtype not in SCALE_NUMPY_DTYPES:
        raise JaxmoeError(f"fp8 scale_inv must be a float32/bfloat16/float16/uint8 array of shape {list(want)} for weight "
                          f"{list(weight.shape)} in blocks of {list(block_size)}, got {_describe(scale_inv)}")
    block_rows, block_cols = block_size
    rows, cols = weight.shape[-2:]
    scales = scales_as_float32(scale_inv)
    out = np.empty(weight.shape, dtype)
    with np.errstate(over="ignore", invalid="ignore"):  # 448 * a huge scale -> inf, as in transformers
        for i in range(want[-2]):
            r0, r1 = i * block_rows, min((i + 1) * block_rows, rows)
            row_scales = np.repeat(scales[..., i, :], block_cols, axis=-1)[..., :cols]  # [..., in]
            out[..., r0:r1, :] = weight[..., r0:r1, :].astype(np.float32) * row_scales[..., None, :]
    return out


def _describe(x) -> str:
    if isinstance(x, np.ndarray):
        return f"{x.dtype} {list(x.shape)}"
    return type(x).__name__


def refuse_undeclared_fp8(source) -> None:
    """A float8 tensor in a checkpoint whose config.json does not declare fp8 quantization: raise, naming it."""
    for key in source.keys():
        if source.dtype_of[key].startswith("F8"):
            raise JaxmoeError(f"{source.file_of[key]}: tensor {key} is {source.dtype_of[key]} but config.json declares "
                              f"no fp8 quantization_config")


class Fp8Source:
    """A checkpoint source in which every float8 `X` with its `X_scale_inv` reads as one float32 tensor `X`.

    Same interface as `convert.source.SafetensorsSource` (`hf_dir`, `keys()`, `file_of`, `shape_of`, `dtype_of`,
    `read`, `total_bytes`); `X` keeps its name, shape and file, with dtype "F32". The scale tensors are consumed
    (they are not keys). Other tensors pass through unchanged. Names, dtypes and shapes are all checked here, from
    the headers, before anything is read.
    """

    def __init__(self, source, block_size: tuple[int, int]):
        self.hf_dir = source.hf_dir
        self.block_size = block_size
        self._source = source
        self._scale_of: dict[str, str] = {}  # X -> X_scale_inv
        self.file_of: dict = {}
        self.shape_of: dict[str, tuple[int, ...]] = {}
        self.dtype_of: dict[str, str] = {}
        real = set(source.keys())
        for key in sorted(real):
            path, dtype = source.file_of[key], source.dtype_of[key]
            if key.endswith(SCALE_SUFFIX):
                weight_key = key[: -len(SCALE_SUFFIX)]
                if not source.dtype_of.get(weight_key, "").startswith("F8"):  # a wrong F8 kind: named below
                    raise JaxmoeError(f"{path}: tensor {key} scales no float8 tensor {weight_key} "
                                      f"(that is {source.dtype_of.get(weight_key, 'absent')})")
                continue
            self.file_of[key], self.shape_of[key], self.dtype_of[key] = path, source.shape_of[key], dtype
            if dtype.startswith("F8"):
                self._scale_of[key] = self._checked_scale(key)
                self.dtype_of[key] = "F32"

    def _checked_scale(self, key: str) -> str:
        """The name of float8 tensor `key`'s scale tensor, after checking both against the block size."""
        source, path = self._source, self._source.file_of[key]
        shape, dtype = source.shape_of[key], source.dtype_of[key]
        if dtype != FP8_DTYPE or len(shape) < 2:
            raise JaxmoeError(f"{path}: tensor {key} is {dtype} {list(shape)}; fp8 weights must be {FP8_DTYPE} "
                              f"(float8_e4m3fn) with at least 2 dims")
        scale_key = key + SCALE_SUFFIX
        if scale_key not in source.shape_of:
            raise JaxmoeError(f"{path}: float8 tensor {key} has no scale tensor {scale_key}")
        want = scale_grid_shape(shape, self.block_size)
        scale_path, scale_shape, scale_dtype = source.file_of[scale_key], source.shape_of[scale_key], source.dtype_of[scale_key]
        if scale_dtype not in SCALE_DTYPES or scale_shape != want:
            raise JaxmoeError(
                f"{scale_path}: tensor {scale_key} is {scale_dtype} {list(scale_shape)}; expected one of "
                f"{'/'.join(SCALE_DTYPES)} {list(want)} for {key} {list(shape)} in blocks of {list(self.block_size)} "
                f"(config.json weight_block_size)"
            )
        return scale_key

    def keys(self) -> list[str]:
        return sorted(self.file_of)

    @property
    def total_bytes(self) -> int:
        """Bytes of the checkpoint files on disk (fp8 size)."""
        return self._source.total_bytes

    def read(self, key: str) -> np.ndarray:
        """The tensor `key` as a host numpy array; a float8 one dequantized to float32 [..., out, in] (rounded to
        each parameter's dtype by the converter, once)."""
        if key not in self._scale_of:
            return self._source.read(key)
        return dequantize_fp8(self._source.read(key), self._source.read(self._scale_of[key]), self.block_size)
