"""On-disk format of routing traces, shared by the tracer, the locality report, training and evaluation.

    TRACE_DIR/manifest.json    {"format": 1, "model": {...identity & shapes...}, "shards": [names],
                                "documents": {doc_id: {"name": str, "split": "train"|"validation", "tokens": n}},
                                "num_tokens": N}
    TRACE_DIR/shard_00000.npz  one or more documents, arrays over the tokens of the shard:
        doc_id          int32[N]
        position        int32[N]            token position inside its document
        token           int32[N]            the input token id
        hidden          float16[N, L, d]    residual stream entering each MoE block (L = number of MoE layers)
        router_logits   float32[N, L, E]
        expert_ids      int16[N, L, k]
        expert_weights  float32[N, L, k]
Tokens of one document are stored in order, so "previous token" is the previous row of the same doc_id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxmoe.errors import JaxmoeError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
ARRAYS = ("doc_id", "position", "token", "hidden", "router_logits", "expert_ids", "expert_weights")


@dataclass
class TraceData:
    """Concatenated arrays of the selected documents (see module docstring for shapes)."""

    doc_id: np.ndarray
    position: np.ndarray
    token: np.ndarray
    hidden: np.ndarray
    router_logits: np.ndarray
    expert_ids: np.ndarray
    expert_weights: np.ndarray
    manifest: dict

    @property
    def num_tokens(self) -> int:
        return len(self.doc_id)

    @property
    def num_moe_layers(self) -> int:
        return self.expert_ids.shape[1]

    @property
    def num_experts(self) -> int:
        return self.router_logits.shape[2]


def write_shard(trace_dir: Path, index: int, arrays: dict) -> str:
    missing = set(ARRAYS) - set(arrays)
    if missing:
        raise ValueError(f"trace shard lacks arrays {sorted(missing)}")
    name = f"shard_{index:05d}.npz"
    np.savez(Path(trace_dir) / name, **{k: arrays[k] for k in ARRAYS})
    return name


def write_manifest(trace_dir: Path, manifest: dict) -> None:
    manifest = {"format": FORMAT_VERSION, **manifest}
    (Path(trace_dir) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(trace_dir: Path) -> dict:
    path = Path(trace_dir) / MANIFEST
    if not path.is_file():
        raise JaxmoeError(f"{path}: not found; is {trace_dir} a trace directory made by `python -m predictors.trace`?")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise JaxmoeError(f"{path}: unsupported trace format {manifest.get('format')!r}")
    return manifest


def load_trace(trace_dir: Path, split: str | None = None) -> TraceData:
    """All tokens of the documents in `split` ("train", "validation" or None for all)."""
    manifest = read_manifest(trace_dir)
    keep = {int(d) for d, info in manifest["documents"].items() if split is None or info["split"] == split}
    parts = {k: [] for k in ARRAYS}
    for name in manifest["shards"]:
        with np.load(Path(trace_dir) / name) as shard:
            rows = np.isin(shard["doc_id"], list(keep))
            for k in ARRAYS:
                parts[k].append(shard[k][rows])
    if not parts["doc_id"] or sum(len(p) for p in parts["doc_id"]) == 0:
        raise JaxmoeError(f"{trace_dir}: no tokens in split {split!r}")
    return TraceData(**{k: np.concatenate(v) for k, v in parts.items()}, manifest=manifest)
