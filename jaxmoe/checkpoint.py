"""On-disk layout of a converted model and how its pieces are saved and restored (orbax).

    MODEL_DIR/
      jaxmoe.json                      normalized ModelConfig
      tokenizer.json ...               tokenizer files copied from the Hugging Face checkpoint
      weights/globals/                 embed, final_norm, lm_head
      weights/layer_007/dense/         layer 7 without its routed experts (attention, norms, router, shared)
      weights/layer_007/experts/       layer 7 routed experts, stacked: w_gate/w_up [E, d, f], w_down [E, f, d]

Each piece is its own orbax checkpoint so conversion writes (and frees) one layer at a time and
the runtime restores expert stacks straight into host memory, separately from the device-resident
weights. Trees use the same keys as the NNX state of `jaxmoe.model.MoEModel` (list indices as ints).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxmoe.config import ModelConfig, load_config
from jaxmoe.errors import JaxmoeError
from jaxmoe.expert_quant import check_quantize, dequantize, quantize

WEIGHTS_DIR = "weights"
GLOBAL_KEYS = ("embed", "final_norm", "lm_head")
EXPERT_KEYS = ("moe", "experts")


def piece_names(cfg: ModelConfig) -> list[str]:
    names = ["globals"]
    for i in range(cfg.num_layers):
        names.append(f"layer_{i:03d}/dense")
        if cfg.moe_layers[i]:
            names.append(f"layer_{i:03d}/experts")
    return names


def split_layer(layer_tree: dict) -> tuple[dict, dict | None]:
    """A layer's pure-dict tree -> (tree without routed experts, routed-expert tree or None)."""
    if "moe" not in layer_tree:
        return layer_tree, None
    moe = dict(layer_tree["moe"])
    experts = moe.pop("experts")
    return {**layer_tree, "moe": moe}, experts


def pieces_of_layer(layer_id: int, layer_tree: dict) -> dict[str, dict]:
    dense, experts = split_layer(layer_tree)
    out = {f"layer_{layer_id:03d}/dense": dense}
    if experts is not None:
        out[f"layer_{layer_id:03d}/experts"] = experts
    return out


def _str_keys(tree):
    if isinstance(tree, dict):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def _restore_keys(tree, template):
    """Maps orbax's string keys back onto the (possibly int) keys of `template`."""
    if isinstance(template, dict):
        return {k: _restore_keys(tree[str(k)], v) for k, v in template.items()}
    return tree


def save_piece(checkpointer: ocp.StandardCheckpointer, weights_dir: Path, name: str, tree: dict) -> None:
    checkpointer.save(Path(weights_dir).absolute() / name, _str_keys(tree))


def restore_piece(model_dir: Path, name: str, abstract_tree: dict) -> dict:
    """Restores one piece; abstract_tree leaves are jax.ShapeDtypeStruct with the target sharding."""
    path = Path(model_dir).absolute() / WEIGHTS_DIR / name
    if not path.is_dir():
        raise JaxmoeError(f"{path}: missing weights piece; re-run `python -m convert`")
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(path, _str_keys(abstract_tree))
    return _restore_keys(restored, abstract_tree)


def abstract_model(cfg: ModelConfig, dtype=None):
    """(graphdef, abstract state) of the model, no memory allocated."""
    from jaxmoe.model import MoEModel

    model = nnx.eval_shape(lambda: MoEModel(cfg, None, dtype=dtype))  # rngs None: no random draws to trace
    return nnx.split(model)


def with_sharding(abstract_tree, sharding):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract_tree)


def restore_layer_experts(model_dir: Path, layer_id: int, abstract_experts: dict, sharding) -> dict:
    """Layer's routed-expert stacks {'w_gate', 'w_up', 'w_down'}: [E, ...] placed with `sharding`."""
    return restore_piece(model_dir, f"layer_{layer_id:03d}/experts", with_sharding(abstract_experts, sharding))


def load_resident(model_dir: Path, dtype=None, quantize_experts: str | None = None):
    """Restores the whole model onto the default device -> (cfg, graphdef, state). quantize_experts "int8" /
    "int4": the routed experts are the dequantized weights an offloaded engine with the same option computes with."""
    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    check_quantize(quantize_experts, cfg.hidden_size, cfg.moe_intermediate_size)
    graphdef, abstract_state = abstract_model(cfg, dtype)
    pure = abstract_state.to_pure_dict()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restored = {k: v for k, v in pure.items() if k != "layers"}
    restored = restore_piece(model_dir, "globals", with_sharding(restored, device))
    layers = {}
    for i, layer_tree in pure["layers"].items():
        dense, experts = split_layer(layer_tree)
        layer = restore_piece(model_dir, f"layer_{i:03d}/dense", with_sharding(dense, device))
        if experts is not None:
            layer["moe"]["experts"] = restore_layer_experts(model_dir, i, experts, device)
            if quantize_experts is not None:  # the weight matrices; biases stay as they are, as offloaded
                layer["moe"]["experts"] = {name: w if name.startswith("b_") else jax.device_put(
                                               dequantize(*quantize(np.asarray(w), quantize_experts), w.dtype, quantize_experts), device)
                                           for name, w in layer["moe"]["experts"].items()}
        layers[i] = layer
    restored["layers"] = layers
    nnx.replace_by_pure_dict(abstract_state, restored)
    return cfg, graphdef, abstract_state
