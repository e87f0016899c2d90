"""Hugging Face checkpoint directory -> jaxmoe model directory, streamed one layer at a time.

Steps: read config.json -> family adapter -> ModelConfig; read safetensors headers only; place every
HF tensor with the adapter's key rules and check names and shapes against the model's abstract state
(every tensor used exactly once, every parameter filled) before writing anything; then read, cast and
save one piece (globals, each layer's dense part, each layer's expert stack) at a time into a temporary
sibling directory that is renamed into place at the end. Quantized checkpoints the family accepts are read
dequantized, one tensor at a time (`open_source`: fp8 block-wise by `convert.fp8`, MXFP4 by `convert.mxfp4`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from convert.families import FAMILIES
from convert.families.common import quant_method
from convert.fp8 import Fp8Source, block_size_of, refuse_undeclared_fp8
from convert.keymap import Placement, place, swap_last_two
from convert.mxfp4 import Mxfp4Source
from convert.source import SafetensorsSource
from jaxmoe.checkpoint import WEIGHTS_DIR, abstract_model, pieces_of_layer, save_piece
from jaxmoe.config import ModelConfig, save_config
from jaxmoe.errors import JaxmoeError

DTYPES = ("bfloat16", "float16", "float32")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)
HF_DTYPE_NAMES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32", "bf16": "bfloat16"}


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise JaxmoeError(f"{path}: not found; expected a Hugging Face checkpoint directory")
    try:
        hf = json.loads(path.read_text())
    except ValueError as e:
        raise JaxmoeError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise JaxmoeError(f"{path}: expected a JSON object")
    return hf


def generation_eos_ids(hf_dir: Path) -> tuple[int, ...] | None:
    """generation_config.json's eos_token_id (an int or a list of ints): the ids transformers' `generate`
    stops on, in place of config.json's (gpt-oss adds <|call|> and <|endoftext|> there, Qwen3 instruct
    <|endoftext|>). None when the file or the field is absent."""
    path = hf_dir / "generation_config.json"
    if not path.is_file():
        return None
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (ValueError, AttributeError) as e:
        raise JaxmoeError(f"{path}: not a JSON object ({e})") from None
    if eos is None:
        return None
    ids = eos if isinstance(eos, list) else [eos]
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise JaxmoeError(f"{path}: eos_token_id must be a token id or a list of them, got {eos!r}")
    return tuple(ids)


def model_config_from_hf(hf: dict, dtype: str | None) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise JaxmoeError(
            f"config.json: unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        )
    if dtype is None:
        dtype = HF_DTYPE_NAMES.get(str(hf.get("dtype") or hf.get("torch_dtype")), "bfloat16")
    if dtype not in DTYPES:
        raise JaxmoeError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    try:
        return FAMILIES[model_type].config_from_hf(hf, dtype)
    except (TypeError, ValueError, KeyError) as e:  # a field of the wrong type, or a missing sub-field
        raise JaxmoeError(f"config.json: invalid {model_type} config ({type(e).__name__}: {e})") from None


def _flatten(tree: dict, prefix=()) -> dict[tuple, object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def plan_conversion(cfg: ModelConfig, source: SafetensorsSource):
    """Maps every model parameter path to the HF keys that fill it; raises on any mismatch.

    Returns (plan {path: [(hf key, placement)]}, dtypes {path: numpy dtype of the parameter}).
    """
    _, abstract_state = abstract_model(cfg)
    expected = _flatten(abstract_state.to_pure_dict())
    adapter = FAMILIES[cfg.family]
    rules = adapter.key_rules(cfg)
    plan: dict[tuple, list[tuple[str, Placement]]] = defaultdict(list)
    for key in source.keys():
        if adapter.ignore_key(cfg, key):
            continue
        placements = place(key, rules)
        if not placements or any(p.path not in expected for p in placements):
            raise JaxmoeError(f"{source.file_of[key]}: unused tensor {key} (no parameter of the {cfg.family} model takes it)")
        for placement in placements:
            want = expected[placement.path].shape
            if placement.expert is not None:
                if not 0 <= placement.expert < want[0]:
                    raise JaxmoeError(f"{source.file_of[key]}: tensor {key}: expert index {placement.expert} >= {want[0]} experts")
                want = want[1:]
            if placement.shape_from(source.shape_of[key]) != placement.filled_shape(want):
                raise JaxmoeError(f"{source.file_of[key]}: tensor {key} has shape {list(source.shape_of[key])}, "
                                  f"expected {_hf_shape(placement, placement.filled_shape(want))}")
            plan[placement.path].append((key, placement))
    for path, struct in expected.items():
        entries = plan.get(path, [])
        per_expert = bool(entries) and entries[0][1].expert is not None
        rows = sorted(p.expert for _, p in entries) if per_expert else None
        by_columns = bool(entries) and entries[0][1].rule.into is not None
        if by_columns:
            complete = (all(p.rule.into is not None for _, p in entries)
                        and _columns_filled(entries) == list(range(struct.shape[-1])))
        else:
            complete = bool(entries) and (rows == list(range(struct.shape[0])) if per_expert else len(entries) == 1)
        if not complete:
            raise JaxmoeError(_missing_message(cfg, rules, path, struct, entries, source))
    return plan, {path: np.dtype(struct.dtype) for path, struct in expected.items()}


def _columns_filled(entries) -> list[int]:
    """The target columns the `KeyRule.into` placements of one parameter fill, sorted (a column filled twice
    appears twice)."""
    return sorted(c for _, p in entries for c in (p.rule.into or ()))


def _hf_shape(placement: Placement, want: tuple) -> list:
    """The HF tensor shape that would fill `want` through `placement` (for error messages)."""
    if placement.rule.columns is not None:
        want = (*want[:-1], want[-1] * placement.rule.columns[1])
    if placement.rule.chunk is not None:
        want = (*want[:-1], want[-1] * placement.rule.chunk[1])
    return list(swap_last_two(want)) if placement.transpose else list(want)


def _missing_message(cfg, rules, path, struct, entries, source) -> str:
    layer = path[1] if path[0] == "layers" else None
    by_columns = bool(entries) and entries[0][1].rule.into is not None
    if len(entries) > 1 and entries[0][1].expert is None and (not by_columns or len(set(_columns_filled(entries)))
                                                               < len(_columns_filled(entries))):
        return f"{source.hf_dir}: parameter {_dotted(path)} filled by several tensors: {[k for k, _ in entries]}"
    have = {p.expert for _, p in entries}
    present = {p.rule for _, p in entries} if by_columns else set()
    for rule in rules:
        if rule.target.format(layer=layer) == _dotted(path) and rule not in present:
            if rule.per_expert:
                missing = [e for e in range(struct.shape[0]) if e not in have]
                return f"{source.hf_dir}: missing tensor {rule.hf.format(layer=layer, expert=missing[0])}"
            return f"{source.hf_dir}: missing tensor {rule.hf.format(layer=layer)}"
    return f"{source.hf_dir}: no tensor fills parameter {_dotted(path)}"


def open_source(hf_dir: Path, hf: dict):
    """The checkpoint's tensors as the model's parameters want them: MXFP4 pairs (GPT-OSS) and fp8 weights with
    their block scales read dequantized (methods the family adapter accepted); a float8 tensor in a checkpoint that
    does not declare fp8 is refused."""
    source = SafetensorsSource(hf_dir)
    method = quant_method(hf)
    if method == "fp8":
        return Fp8Source(source, block_size_of(hf["quantization_config"]))
    refuse_undeclared_fp8(source)
    if method == "mxfp4":
        return Mxfp4Source(source)
    return source


def _read_piece(source, plan, paths, dtypes) -> dict:
    """Reads, transposes, slices, casts (to each parameter's own dtype) and stacks the tensors of `paths`. A
    tensor split over several parameters (`KeyRule.columns`) is read once: the last one read is kept."""
    tree: dict = {}
    last: list = [None, None]  # [key, tensor]

    def read(key):
        if last[0] != key:
            last[:] = [None, None]  # drop the previous tensor before reading the next
            last[:] = [key, source.read(key)]
        return last[1]

    for path in paths:
        entries = plan[path]
        np_dtype = dtypes[path]
        if entries[0][1].rule.into is not None:
            value = _assembled_by_columns(entries, read, np_dtype)
        elif entries[0][1].expert is None:
            key, placement = entries[0]
            value = np.ascontiguousarray(placement.take(read(key))).astype(np_dtype)
        else:
            first_key, first = entries[0]
            value = np.empty((len(entries), *first.shape_from(source.shape_of[first_key])), np_dtype)
            for key, placement in entries:
                value[placement.expert] = placement.take(read(key)).astype(np_dtype)
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return tree


def _assembled_by_columns(entries, read, np_dtype) -> np.ndarray:
    """One parameter from several tensors, each filling the last-axis columns its `KeyRule.into` names
    (plan_conversion checked they fill every column once): [..., sum of len(into)] of np_dtype."""
    parts = [(placement.rule.into, placement.take(read(key))) for key, placement in entries]
    width = sum(len(into) for into, _ in parts)
    value = np.empty((*parts[0][1].shape[:-1], width), np_dtype)
    for into, part in parts:
        value[..., list(into)] = part
    return value


def convert(hf_dir: Path, out_dir: Path, dtype: str | None = None, force: bool = False, progress: bool = True) -> ModelConfig:
    """Converts `hf_dir` into `out_dir`; returns the model config. Raises JaxmoeError on bad input."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise JaxmoeError(f"{hf_dir}: no such directory")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise JaxmoeError(f"{out_dir}: already exists and is not empty; pass --force to overwrite it")
    out_dir = Path(os.path.abspath(out_dir))  # `.` or `x/..` have no usable .name / .parent for the sibling temp dir
    hf = read_hf_config(hf_dir)
    cfg = model_config_from_hf(hf, dtype)
    stop_ids = generation_eos_ids(hf_dir)
    if stop_ids is not None:  # what transformers' generate stops on
        cfg = dataclasses.replace(cfg, eos_token_ids=stop_ids)
    source = open_source(hf_dir, hf)
    plan, dtypes = plan_conversion(cfg, source)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".{out_dir.name}.converting-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    try:
        tmp_dir.mkdir()
        weights = tmp_dir / WEIGHTS_DIR
        by_layer = defaultdict(list)
        for path in plan:
            by_layer[path[1] if path[0] == "layers" else None].append(path)
        with ocp.StandardCheckpointer() as checkpointer:
            save_piece(checkpointer, weights, "globals", _read_piece(source, plan, by_layer[None], dtypes))
            checkpointer.wait_until_finished()
            for layer in tqdm(range(cfg.num_layers), desc="converting layers", unit="layer", disable=not progress):
                tree = _read_piece(source, plan, by_layer[layer], dtypes)["layers"][layer]
                for name, piece in pieces_of_layer(layer, tree).items():
                    save_piece(checkpointer, weights, name, piece)
                checkpointer.wait_until_finished()  # frees this layer's host arrays before the next
                del tree
        save_config(cfg, tmp_dir)
        (tmp_dir / "hf_config.json").write_text(json.dumps(hf, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (hf_dir / name).is_file():
                shutil.copy2(hf_dir / name, tmp_dir / name)
        if out_dir.exists():
            trash = out_dir.parent / f".{out_dir.name}.replaced-{os.getpid()}"
            out_dir.rename(trash)
            tmp_dir.rename(out_dir)
            if trash.is_dir() and not trash.is_symlink():
                shutil.rmtree(trash, ignore_errors=True)
            else:  # --force over a plain file (or a link): rmtree would leave it behind as debris
                trash.unlink()
        else:
            tmp_dir.rename(out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return cfg
