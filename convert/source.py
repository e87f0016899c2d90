"""Streaming access to a Hugging Face safetensors checkpoint (single file or index + shards).

Only headers are read up front (names, shapes, dtypes); `read(key)` memory-maps one tensor at a time
through `safetensors.safe_open`, so peak memory stays near the largest tensor being converted.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from jaxmoe.errors import JaxmoeError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# dtypes safetensors' numpy/flax readers cannot return (they look for np.float8_*): read from the file's bytes
RAW_DTYPES = {"F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn)}


class SafetensorsSource:
    """key -> (file, shape, dtype) for every tensor of the checkpoint in `hf_dir`."""

    def __init__(self, hf_dir: Path):
        self.hf_dir = Path(hf_dir)
        index_path = self.hf_dir / INDEX_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise JaxmoeError(f"{index_path}: not a valid safetensors index ({e})") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise JaxmoeError(f"{index_path}: not a valid safetensors index (weight_map must map tensor names to file names)")
            files = sorted(set(weight_map.values()))
        elif (self.hf_dir / SINGLE_FILE).is_file():
            weight_map, files = None, [SINGLE_FILE]
        else:
            raise JaxmoeError(f"{self.hf_dir}: no {SINGLE_FILE} or {INDEX_FILE} found")
        self.file_of: dict[str, Path] = {}
        self.shape_of: dict[str, tuple[int, ...]] = {}
        self.dtype_of: dict[str, str] = {}
        for name in files:
            path = self.hf_dir / name
            if not path.is_file():
                raise JaxmoeError(f"{path}: missing shard listed in {INDEX_FILE}")
            for key, shape, dtype in _header(path):
                if key in self.file_of:
                    raise JaxmoeError(f"{path}: tensor {key} also stored in {self.file_of[key]}")
                self.file_of[key], self.shape_of[key], self.dtype_of[key] = path, shape, dtype
        if weight_map is not None:
            for key, name in weight_map.items():
                if self.file_of.get(key) != self.hf_dir / name:
                    raise JaxmoeError(f"{self.hf_dir / name}: tensor {key} listed in {INDEX_FILE} is not in that file")

    def keys(self) -> list[str]:
        return sorted(self.file_of)

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in set(self.file_of.values()))

    def read(self, key: str) -> np.ndarray:
        """The tensor `key` as a host numpy array (bfloat16 and float8_e4m3fn via ml_dtypes)."""
        path = self.file_of[key]
        if self.dtype_of[key] in RAW_DTYPES:
            return _read_raw(path, key, RAW_DTYPES[self.dtype_of[key]])
        try:
            with jax.default_device(jax.devices("cpu")[0]), safe_open(path, framework="flax") as f:
                return np.asarray(f.get_tensor(key))
        except (SafetensorError, OSError) as e:
            raise JaxmoeError(f"{path}: cannot read tensor {key} ({e})") from None


def _header(path: Path):
    try:
        with safe_open(path, framework="numpy") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                yield key, tuple(sl.get_shape()), sl.get_dtype()
    except (SafetensorError, OSError) as e:
        raise JaxmoeError(f"{path}: corrupt or truncated safetensors file ({e})") from None


def _read_raw(path: Path, key: str, dtype: np.dtype) -> np.ndarray:
    """Tensor `key` of safetensors file `path` read straight from its bytes into a new array (`dtype`, one byte per
    value for the fp8 types): the format is an 8-byte little-endian header length, a JSON header
    {key: {dtype, shape, data_offsets}}, then the data."""
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            entry = json.loads(f.read(header_len))[key]
            begin, end = entry["data_offsets"]
            shape = tuple(entry["shape"])
            if end - begin != int(np.prod(shape)) * dtype.itemsize:
                raise ValueError(f"{end - begin} bytes for shape {list(shape)}")
            f.seek(8 + header_len + begin)
            data = np.empty(end - begin, np.uint8)
            got = f.readinto(data)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise JaxmoeError(f"{path}: cannot read tensor {key} ({e})") from None
    if got != end - begin:
        raise JaxmoeError(f"{path}: cannot read tensor {key} (file truncated)")
    return data.view(dtype).reshape(shape)
