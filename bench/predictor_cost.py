"""What a predictor costs per MoE layer of a decode step: on the host, and fused into the layer's program.

    python -m bench predictor-cost [--model DIR] [--predictors gate-lookahead,PATH] [--calls N] [--out DIR]

For each predictor, side by side in one run on the same inputs (a real decode step's hidden state,
first MoE layer of the model):
  - host: one `predict(pos, hidden, router_logits, H)` call (numpy), timed call by call;
  - fused: the extra time of the layer's jitted `moe_front` with the predictor inside it
    (`predictors.fused`) over the same program without it, each call dispatched and waited for,
    calls of the two interleaved, medians;
  - the resident decode step of the whole model (`ResidentEngine`), the issue's yardstick (< 5 %).
H is the horizon each policy asks for: 1 (presched) and 4 (adaptive). Writes predictor_cost.json and
predictor_cost.md under `--out` (default bench/results/<device>/).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import jaxmoe
from bench.policies import make_prompts, save_report
from bench.sizes import device_info, versions
from jaxmoe.errors import JaxmoeError, run_cli
from jaxmoe.offload import embed_tokens, moe_front

HORIZONS = (1, 4)


def median_us(samples) -> float:
    return round(1e6 * statistics.median(samples), 2)


def resident_step_s(model_dir, prompt, tokens: int) -> float:
    """Median wall time of one resident decode step (after warm-up), from per-token timestamps."""
    engine = jaxmoe.load(model_dir)
    engine.generate(prompt, 8)  # compile
    stamps = []
    engine.generate(prompt, tokens, on_token=lambda _: stamps.append(time.perf_counter()))
    if len(stamps) < 3:
        raise JaxmoeError(f"the resident run stopped after {len(stamps)} tokens (EOS), too few to time a decode step")
    return statistics.median(np.diff(stamps[1:]))


def decode_inputs(engine, prompt) -> dict:
    """A decode step at the first MoE layer after prefilling `prompt`: the layer's graph and state, h [1, 1, d]
    (the embedding of the prompt's first token, at the next position), its KV cache and position, and the
    host predictor's inputs from the same step (hidden f32[d], router logits f32[E])."""
    engine.start(64)
    tokens = np.zeros((1, 32), np.int32)
    tokens[0, : len(prompt)] = prompt
    engine.prefill(tokens, len(prompt))
    layer = engine.cfg.moe_layer_ids[0]
    _, g, state, _ = engine.layer_parts[layer]
    h = embed_tokens(engine.globals["embedding"], jnp.asarray(prompt[:1], jnp.int32))
    positions = jnp.array([[len(prompt)]], jnp.int32)
    out = moe_front(g, state, h, engine._kv[layer], positions)
    features = np.asarray(out[5])
    k, d = engine.cfg.num_experts_per_tok, engine.cfg.hidden_size
    return {"layer": layer, "g": g, "state": state, "h": h, "kv": out[1], "positions": positions,
            "hidden": features[k : k + d].copy(), "logits": features[k + d :].copy()}


def time_fused(inputs, scorer, params, pos: int, calls: int) -> tuple[float, float]:
    """-> (median s of moe_front without, with the fused predictor), calls interleaved."""
    g, state, h, positions = inputs["g"], inputs["state"], inputs["h"], inputs["positions"]
    kv = inputs["kv"]
    scorer_state = scorer.init_state()
    # as the engine passes them: device scalars placed once
    args = dict(scorer=scorer, scorer_params=params, pos=jnp.int32(pos), last_row=jnp.int32(0))
    plain, fused = [], []
    for i in range(calls + 20):
        t0 = time.perf_counter()
        out = moe_front(g, state, h, kv, positions)
        kv = out[1]
        jax.block_until_ready(out[5])
        t1 = time.perf_counter()
        out = moe_front(g, state, h, kv, positions, scorer_state=scorer_state, **args)
        kv, scorer_state = out[1], out[6]
        jax.block_until_ready(out[5])
        t2 = time.perf_counter()
        if i >= 20:  # the first calls compile and warm up
            plain.append(t1 - t0)
            fused.append(t2 - t1)
    inputs["kv"] = kv
    return statistics.median(plain), statistics.median(fused)


def time_host(predictor, inputs, pos: int, horizon: int, calls: int) -> float:
    hidden, logits = inputs["hidden"], inputs["logits"]
    samples = []
    for _ in range(calls + 20):
        t0 = time.perf_counter()
        predictor.predict(pos, hidden, logits, horizon)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples[20:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench predictor-cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="converted model (default: the embedded default model)")
    p.add_argument("--predictors", default=None,
                   help="comma-separated gate-lookahead | PATH (default: gate-lookahead and the shipped default LLaPor)")
    p.add_argument("--calls", type=int, default=400, help="timed calls per measurement")
    p.add_argument("--out", type=Path, default=None, help="directory for predictor_cost.json/.md (default bench/results/<device>)")
    return run_cli(run, p.parse_args(argv))


def run(args) -> int:
    from jaxmoe.default_model import default_model_dir

    if args.calls < 1:
        raise JaxmoeError("--calls must be >= 1")
    model_dir = args.model or default_model_dir()
    if args.predictors is None:
        specs = ["gate-lookahead"]
        shipped = Path(__file__).resolve().parent.parent / "predictors" / "assets" / "default-llapor"
        if args.model is None and shipped.is_dir():
            specs.append(str(shipped))
    else:
        specs = [s for s in args.predictors.split(",") if s]
    engine = jaxmoe.load(model_dir, policy="presched", cache_slots=10**9)
    prompt = make_prompts(engine, 1, 24)[0]
    print(f"resident decode step ({model_dir.name}) ...", file=sys.stderr)
    step_s = resident_step_s(model_dir, prompt, 64)
    try:
        inputs = decode_inputs(engine, prompt)
    finally:
        engine.cache.close()  # the prefill started the transfer thread; nothing more is transferred
    pos = engine.pos_of_layer[inputs["layer"]]
    rows = []
    for spec in tqdm(specs, desc="predictors", unit="predictor"):
        predictor = engine.build_predictor(spec)
        for horizon in HORIZONS:
            host_s = time_host(predictor, inputs, pos, horizon, args.calls)
            scorer, params = predictor.to_fused(horizon)
            plain_s, fused_s = time_fused(inputs, scorer, params, pos, args.calls)
            marginal = max(fused_s - plain_s, 0.0)
            rows.append({"predictor": predictor.name, "spec": spec, "horizon": horizon,
                         "host_predict_us": round(1e6 * host_s, 2),
                         "moe_front_us": round(1e6 * plain_s, 2), "moe_front_fused_us": round(1e6 * fused_s, 2),
                         "fused_extra_us": round(1e6 * marginal, 2),
                         "host_pct_of_step": round(100 * host_s / step_s, 2),
                         "fused_pct_of_step": round(100 * marginal / step_s, 2)})
    report = {"model": str(model_dir), "resident_decode_step_us": round(1e6 * step_s, 1),
              "moe_layers": len(engine.cfg.moe_layer_ids), "calls": args.calls, "rows": rows,
              "device": device_info(jax.devices()[0]), "versions": versions()}
    print(markdown(report))
    out = save_report(report, markdown(report) + "\n", args.out, "predictor_cost")
    print(f"wrote {out / 'predictor_cost.json'} and .md", file=sys.stderr)
    return 0


def markdown(report: dict) -> str:
    lines = [f"# Predictor cost per MoE layer call — {Path(report['model']).name}", "",
             f"Resident decode step of the whole model: {report['resident_decode_step_us']:.0f} µs "
             f"({report['moe_layers']} MoE layers, each calls the predictor once). Medians of {report['calls']} calls; "
             "fused = extra time of the layer's jitted `moe_front` with the predictor inside it, "
             "measured against the same program without it, interleaved.", "",
             "| predictor | horizon | host predict µs | % of step | moe_front µs | fused µs | fused extra µs | % of step |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['predictor']} | {r['horizon']} | {r['host_predict_us']:.1f} | {r['host_pct_of_step']:.1f} | "
                     f"{r['moe_front_us']:.1f} | {r['moe_front_fused_us']:.1f} | {r['fused_extra_us']:.1f} | {r['fused_pct_of_step']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
