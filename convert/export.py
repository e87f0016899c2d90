"""jaxmoe model state -> a genuine Hugging Face checkpoint (the inverse of `python -m convert`).

The key mapping is the family adapter's own `KeyRule` table run backwards (no second table): every
rule is expanded over layers (and experts, unstacking our [E, ...] stacks), transposes are undone,
and the result is written as `model.safetensors` in the Hub's key layout plus the family's
`config.json`, into a temporary sibling directory renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors.flax import save_file

from convert.families import FAMILIES
from convert.keymap import target_path
from jaxmoe.config import ModelConfig
from jaxmoe.errors import JaxmoeError


def _lookup(tree: dict, path: tuple):
    node = tree
    for p in path:
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node


def hf_tensors(cfg: ModelConfig, state: dict, dtype) -> dict[str, np.ndarray]:
    """Our pure-dict state -> {HF key: array} using the family's key rules; every parameter exactly once."""
    rules = FAMILIES[cfg.family].key_rules(cfg)
    out: dict[str, np.ndarray] = {}
    used: set[tuple] = set()
    for rule in rules:
        layers = range(cfg.num_layers) if "{layer}" in rule.hf else [None]
        for layer in layers:
            path = target_path(rule.target, layer)
            value = _lookup(state, path)
            if value is None:
                continue
            value = np.asarray(value)
            rows = range(value.shape[0]) if rule.per_expert else [None]
            for e in rows:
                t = value[e] if e is not None else value
                t = t.T if rule.transpose else t
                out[rule.hf.format(layer=layer, expert=e)] = np.ascontiguousarray(t).astype(dtype)
            used.add(path)
    flat_paths = _paths(state)
    missing = sorted(".".join(map(str, p)) for p in flat_paths - used)
    if missing:
        raise JaxmoeError(f"export: no {cfg.family} key rule takes parameters {missing[:5]}")
    return out


def _paths(tree: dict, prefix=()) -> set[tuple]:
    out = set()
    for k, v in tree.items():
        out |= _paths(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,)}
    return out


def export_hf(cfg: ModelConfig, state: dict, out_dir: Path, tokenizer_dir: Path | None = None,
              dtype: str = "bfloat16", extra_files: dict[str, str] | None = None) -> Path:
    """Writes `out_dir` (must not exist) as a Hugging Face checkpoint of `cfg.family`."""
    adapter = FAMILIES[cfg.family]
    if adapter.config_to_hf is None:
        raise JaxmoeError(f"export: no Hugging Face config writer for family {cfg.family!r}")
    out_dir = Path(os.path.abspath(out_dir))
    if out_dir.exists():
        raise JaxmoeError(f"{out_dir}: already exists; not overwriting it")
    np_dtype = np.dtype(jnp.dtype(dtype))
    tensors = hf_tensors(cfg, state, np_dtype)
    tmp = out_dir.parent / f".{out_dir.name}.exporting-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file({k: jnp.asarray(v) for k, v in tensors.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf_config = adapter.config_to_hf(cfg)
        hf_config["torch_dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if tokenizer_dir is not None:
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
