"""What quantizing the routed experts costs in quality: each mode against the unquantized model.

    python -m bench quant-quality [--model DIR] [--modes int8,int4,mxfp4] [--tokens N] [--windows W] [--out DIR]

Teacher-forced over held-out text (for the embedded default model: the standard-library files its
training held out, `jaxmoe.train.is_held_out`; for any other model with a tokenizer: the same files;
without a tokenizer: random ids), `--windows` windows of `--tokens` tokens each. Every mode computes with
the dequantized weights the offloaded engine computes with (`jaxmoe.load(..., quantize_experts=mode)`,
resident), so the figures are those of an offloaded run too. Per mode, over all predicted positions:
  - next-token KL(unquantized || quantized), mean, in nats (float64 log-softmax);
  - top-1 agreement with the unquantized model's argmax;
  - mean next-token loss (nats) of each;
  - bytes of one packed expert (codes + scales, as moved host -> device).
Writes quant_quality.json and quant_quality.md under `--out` (default bench/results/<device>/).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

import jaxmoe
from bench.policies import save_report
from bench.sizes import device_info, versions
from jaxmoe.errors import JaxmoeError, run_cli
from jaxmoe.expert_quant import QUANTIZE_MODES as MODES, check_quantize
from jaxmoe.offload import pack_expert


def held_out_windows(engine, count: int, length: int, seed: int = 0) -> np.ndarray:
    """-> int32 [count, length + 1]: token windows from the held-out standard-library files (random ids
    when the model has no tokenizer)."""
    rng = np.random.default_rng(seed)
    if engine.tokenizer is None:
        return rng.integers(3, engine.cfg.vocab_size, (count, length + 1)).astype(np.int32)
    from jaxmoe.train import is_held_out, stdlib_documents

    docs = [text for name, text in stdlib_documents() if name.startswith("stdlib/") and is_held_out(name)]
    ids = [engine.tokenizer.encode(text, add_special_tokens=False) for text in docs]
    ids = [row for row in ids if len(row) > length + 1]
    if not ids:
        raise JaxmoeError(f"no held-out file is longer than --tokens {length}")
    rows = []
    for i in rng.choice(len(ids), size=count, replace=count > len(ids)):
        start = int(rng.integers(0, len(ids[i]) - length - 1))
        rows.append(ids[i][start : start + length + 1])
    return np.asarray(rows, np.int32)


def window_log_probs(engine, tokens: np.ndarray) -> np.ndarray:
    """tokens: int32 [W, T] -> float64 log-probabilities [W, T, V] of the resident engine's model."""
    graphdef, state = nnx.split(engine._model)
    x = np.asarray(_forward(graphdef, state, jnp.asarray(tokens)), np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@partial(jax.jit, static_argnames=("graphdef",))
def _forward(graphdef, state, tokens):
    """tokens: int32 [W, T] -> float32 logits [W, T, V] (one causal pass over each window)."""
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, _, _ = model(tokens, positions, model.init_cache(tokens.shape[0], tokens.shape[1]))
    return logits


def packed_expert_bytes(cfg, mode: str | None) -> int:
    """Bytes of one routed expert's three matrices as the offload store packs and moves them host -> device
    (`jaxmoe.offload.pack_expert`; biases excluded)."""
    d, f = cfg.hidden_size, cfg.moe_intermediate_size
    zeros = {"w_gate": np.zeros((d, f), np.float32), "w_up": np.zeros((d, f), np.float32),
             "w_down": np.zeros((f, d), np.float32)}
    return pack_expert(zeros, jnp.dtype(cfg.dtype), mode).nbytes


def compare(reference: np.ndarray, quantized: np.ndarray, targets: np.ndarray) -> dict:
    """reference, quantized: float64 log-probs [W, T, V]; targets: int [W, T] -> the mode's figures."""
    kl = np.sum(np.exp(reference) * (reference - quantized), axis=-1)  # [W, T]
    picked = lambda lp: -np.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]  # noqa: E731
    return {"kl_mean": float(kl.mean()), "kl_p99": float(np.quantile(kl, 0.99)),
            "top1_agreement": float((reference.argmax(-1) == quantized.argmax(-1)).mean()),
            "loss": float(picked(quantized).mean()), "reference_loss": float(picked(reference).mean())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench quant-quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="converted model (default: the embedded default model)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    p.add_argument("--tokens", type=int, default=256, help="tokens per window")
    p.add_argument("--windows", type=int, default=8, help="windows of held-out text")
    p.add_argument("--out", type=Path, default=None, help="directory for quant_quality.json/.md (default bench/results/<device>)")
    return run_cli(run, p.parse_args(argv))


def run(args) -> int:
    from jaxmoe.default_model import default_model_dir

    if args.tokens < 2 or args.windows < 1:
        raise JaxmoeError("--tokens must be >= 2 and --windows >= 1")
    modes = [m for m in args.modes.split(",") if m]
    for mode in modes:
        if mode not in MODES:
            raise JaxmoeError(f"--modes: unknown mode {mode!r}; available: {', '.join(MODES)}")
    model_dir = args.model or default_model_dir()
    base = jaxmoe.load(model_dir)
    for mode in modes:
        check_quantize(mode, base.cfg.hidden_size, base.cfg.moe_intermediate_size)
    windows = held_out_windows(base, args.windows, args.tokens)
    inputs, targets = windows[:, :-1], windows[:, 1:]
    print(f"unquantized ({model_dir.name}, {args.windows} x {args.tokens} tokens) ...", file=sys.stderr)
    reference = window_log_probs(base, inputs)
    del base
    rows = []
    for mode in tqdm(modes, desc="modes", unit="mode"):
        engine = jaxmoe.load(model_dir, quantize_experts=mode)
        row = {"mode": mode, **compare(reference, window_log_probs(engine, inputs), targets),
               "expert_bytes": packed_expert_bytes(engine.cfg, mode),
               "unquantized_expert_bytes": packed_expert_bytes(engine.cfg, None)}
        rows.append(row)
        del engine
    report = {"model": str(model_dir), "windows": args.windows, "tokens_per_window": args.tokens,
              "rows": rows,
              "device": device_info(jax.devices()[0]), "versions": versions()}
    table = markdown(report)
    print(table)
    out = save_report(report, table + "\n", args.out, "quant_quality")
    print(f"wrote {out / 'quant_quality.json'} and .md", file=sys.stderr)
    return 0


def markdown(report: dict) -> str:
    lines = [f"# Quantized experts against the unquantized model — {Path(report['model']).name}", "",
             f"Teacher-forced over {report['windows']} windows of {report['tokens_per_window']} held-out tokens; "
             "KL(unquantized || quantized) of the next-token distribution in nats, float64.", "",
             "| mode | expert bytes (× unquantized) | KL mean | KL p99 | top-1 agreement | loss | unquantized loss |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        ratio = r["expert_bytes"] / r["unquantized_expert_bytes"]
        lines.append(f"| {r['mode']} | {r['expert_bytes']:,} ({ratio:.2f}×) | {r['kl_mean']:.5f} | {r['kl_p99']:.4f} | "
                     f"{100 * r['top1_agreement']:.1f}% | {r['loss']:.4f} | {r['reference_loss']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
