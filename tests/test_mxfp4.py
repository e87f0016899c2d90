"""MXFP4 dequantization (convert/mxfp4.py): bit parity with transformers, a hand-computed case, and the
Mxfp4Source view of a safetensors checkpoint."""

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from convert import mxfp4
from convert.mxfp4 import Mxfp4Source, dequantize_mxfp4
from convert.source import SafetensorsSource
from jaxmoe.errors import JaxmoeError


def _reference(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """transformers' dequantization as uint16 bf16 bit patterns."""
    torch = pytest.importorskip("torch")
    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    out = mxfp4.convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.bfloat16)
    return out.view(torch.uint16).numpy()


def test_matches_transformers_on_random_blocks():
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (3, 10, 4, 16), dtype=np.uint8)  # [E, R, G, B]
    scales = rng.integers(110, 141, (3, 10, 4), dtype=np.uint8)
    scales[0, 0, :] = [0, 1, 254, 255]  # subnormal, overflowing and the top exponent
    scales[2, 9, :] = [2, 126, 127, 253]
    got = dequantize_mxfp4(blocks, scales)
    assert got.dtype == ml_dtypes.bfloat16 and got.shape == (3, 4 * 16 * 2, 10)
    np.testing.assert_array_equal(got.view(np.uint16), _reference(blocks, scales))


def test_matches_transformers_on_every_byte_and_scale():
    blocks = np.tile(np.arange(256, dtype=np.uint8), (256, 1)).reshape(1, 256, 1, 256)  # row r: all bytes
    scales = np.arange(256, dtype=np.uint8).reshape(1, 256, 1)  # row r: scale r
    np.testing.assert_array_equal(dequantize_mxfp4(blocks, scales).view(np.uint16), _reference(blocks, scales))


def test_chunked_output_is_the_same(monkeypatch):
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (2, 300, 3, 4), dtype=np.uint8)
    scales = rng.integers(120, 135, (2, 300, 3), dtype=np.uint8)
    whole = dequantize_mxfp4(blocks, scales).view(np.uint16)
    monkeypatch.setattr(mxfp4, "CHUNK_VALUES", 1000)  # 41 rows a chunk, the last one short
    monkeypatch.setattr(mxfp4, "TILE_ROWS", 7)
    np.testing.assert_array_equal(dequantize_mxfp4(blocks, scales).view(np.uint16), whole)


def test_hand_computed_values():
    # one row, two groups of 2 bytes: codes (lo, hi) = (1, 2), (15, 8) | (7, 0), (3, 10)
    blocks = np.array([[[0x21, 0x8F], [0x07, 0xA3]]], np.uint8)  # [R=1, G=2, B=2]
    scales = np.array([[127, 128]], np.uint8)  # x1, x2
    got = dequantize_mxfp4(blocks, scales).astype(np.float32)  # [K=8, R=1]
    want = [0.5, 1.0, -6.0, -0.0, 12.0, 0.0, 3.0, -2.0]
    np.testing.assert_array_equal(got[:, 0], want)
    assert np.signbit(got[3, 0]) and not np.signbit(got[5, 0])


def test_transposes_rows_and_columns():
    blocks = np.zeros((2, 3, 1, 1), np.uint8)  # [E=2, R=3, G=1, B=1] -> [2, K=2, 3]
    blocks[1, 2, 0, 0] = 0x40  # expert 1, row 2: values (0.0, 2.0)
    got = dequantize_mxfp4(blocks, np.full((2, 3, 1), 127, np.uint8)).astype(np.float32)
    assert got.shape == (2, 2, 3)
    assert got[1, 1, 2] == 2.0 and np.count_nonzero(got) == 1


@pytest.mark.parametrize(
    "blocks, scales, match",
    [
        (np.zeros((2, 3, 4), np.int8), np.zeros((2, 3), np.uint8), "blocks must be a uint8"),
        (np.zeros((3, 4), np.uint8), np.zeros((3,), np.uint8), "at least 3 dims"),
        (np.zeros((2, 3, 4), np.uint8), np.zeros((2, 4), np.uint8), r"scales must be uint8 of shape \[2, 3\]"),
        (np.zeros((2, 3, 4), np.uint8), np.zeros((2, 3), np.int32), "scales must be uint8"),
    ],
)
def test_rejects_bad_arrays(blocks, scales, match):
    with pytest.raises(JaxmoeError, match=match):
        dequantize_mxfp4(blocks, scales)


def _checkpoint(tmp_path, tensors):
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return SafetensorsSource(tmp_path)


def test_source_presents_pairs_as_one_tensor(tmp_path):
    rng = np.random.default_rng(2)
    blocks = rng.integers(0, 256, (2, 6, 3, 4), dtype=np.uint8)
    scales = rng.integers(120, 135, (2, 6, 3), dtype=np.uint8)
    plain = rng.standard_normal((5, 7)).astype(np.float32)
    inner = _checkpoint(tmp_path, {"m.a_blocks": blocks, "m.a_scales": scales, "m.b": plain})
    src = Mxfp4Source(inner)
    assert src.keys() == ["m.a", "m.b"]
    assert src.hf_dir == tmp_path and src.total_bytes == inner.total_bytes
    assert src.shape_of == {"m.a": (2, 24, 6), "m.b": (5, 7)}
    assert src.dtype_of == {"m.a": "BF16", "m.b": "F32"}
    assert src.file_of["m.a"] == inner.file_of["m.a_blocks"]
    a = src.read("m.a")
    assert a.dtype == ml_dtypes.bfloat16 and a.shape == src.shape_of["m.a"]
    np.testing.assert_array_equal(a.view(np.uint16), dequantize_mxfp4(blocks, scales).view(np.uint16))
    np.testing.assert_array_equal(src.read("m.b"), plain)


@pytest.mark.parametrize(
    "tensors, match",
    [
        ({"x_blocks": np.zeros((2, 3, 4), np.uint8)}, "x_blocks has no matching x_scales"),
        ({"x_scales": np.zeros((2, 3), np.uint8)}, "x_scales has no matching x_blocks"),
        ({"x_blocks": np.zeros((2, 3, 4), np.uint8), "x_scales": np.zeros((2, 4), np.uint8)},
         r"x_scales must be U8 of shape \[2, 3\] to match x_blocks, got U8 \[2, 4\]"),
        ({"x_blocks": np.zeros((2, 3, 4), np.uint8), "x_scales": np.zeros((2, 3), np.int8)}, "x_scales must be U8"),
        ({"x_blocks": np.zeros((3, 4), np.uint8), "x_scales": np.zeros((3,), np.uint8)}, "x_blocks must be U8"),
        ({"x_blocks": np.zeros((2, 3, 4), np.uint8), "x_scales": np.zeros((2, 3), np.uint8),
          "x": np.zeros((1,), np.float32)}, "x_blocks would dequantize to x, which is already a tensor"),
    ],
)
def test_source_rejects_bad_pairs(tmp_path, tensors, match):
    inner = _checkpoint(tmp_path, tensors)
    with pytest.raises(JaxmoeError, match=match) as e:
        Mxfp4Source(inner)
    assert str(e.value).startswith(str(tmp_path / "model.safetensors")) and "\n" not in str(e.value)
