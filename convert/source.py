"""Streaming access to a Hugging Face safetensors checkpoint (single file or index + shards).

Only headers are read up front (names, shapes, dtypes); `read(key)` memory-maps one tensor at a time
through `safetensors.safe_open`, so peak memory stays near the largest tensor being converted.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from safetensors import SafetensorError, safe_open

from jaxmoe.errors import JaxmoeError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


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
        """The tensor `key` as a host numpy array (bfloat16 via ml_dtypes)."""
        path = self.file_of[key]
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
