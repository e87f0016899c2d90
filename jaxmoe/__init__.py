"""jaxmoe: MoE language models on one accelerator with host-resident experts.

Holds the model (NNX modules), the checkpoint layout, the engines and the `generate` CLI.
Imports nothing from `convert`, `scheduler` or `predictors` at module level, except where a
command needs them (the default-model cache converts on first use; the offload engine asks
`scheduler` for expert slots).
"""

from __future__ import annotations

import os
from pathlib import Path

# Round every bfloat16/float16 intermediate to its type, whatever XLA fuses: otherwise XLA may keep a
# fused chain in float32, so the same arithmetic split into different jitted pieces (the offloaded
# engine's per-layer steps against the resident engine's whole-model step) rounds differently and
# greedy bf16 decoding can pick a different token. Must be set before JAX starts its backend.
EXACT_PRECISION_FLAG = "--xla_allow_excess_precision=false"
if EXACT_PRECISION_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + EXACT_PRECISION_FLAG).strip()

from jaxmoe.errors import JaxmoeError  # noqa: E402
from jaxmoe.tokenizer import load_tokenizer  # noqa: E402

__all__ = ["load", "load_tokenizer", "JaxmoeError"]


def load(path, dtype=None, quantize_experts=None, **offload_options):
    """Loads a converted model directory and returns an engine with `.generate(prompt_ids, max_new_tokens, ...)`.

    With no offload options every weight is placed on the device (`ResidentEngine`). quantize_experts "int8" /
    "int4" / "mxfp4": routed experts as quantized codes and scales (`jaxmoe.expert_quant`), offloaded or resident.
    """
    from jaxmoe.checkpoint import load_resident
    from jaxmoe.engine import ResidentEngine

    path = Path(path)
    if not path.is_dir():
        raise JaxmoeError(f"{path}: no such directory")
    if offload_options:
        from jaxmoe.offload import OffloadEngine

        return OffloadEngine.load(path, dtype=dtype, tokenizer=load_tokenizer(path), quantize_experts=quantize_experts,
                                  **offload_options)
    cfg, graphdef, state = load_resident(path, dtype=dtype, quantize_experts=quantize_experts)
    engine = ResidentEngine(cfg, graphdef, state, tokenizer=load_tokenizer(path))
    engine.quantize_experts = quantize_experts
    return engine
