"""Host overhead per MoE layer: what the offloaded engine costs where compute costs almost nothing.

    python -m bench host-overhead [--shape qwen3-30b-a3b] [--scale 0.01] [--policies on-demand,presched,...]
                                  [--tokens 16] [--prompts 2] [--repeats 3] [--out DIR] [--profile TRACE_DIR]

The offloaded engine goes to the host once per MoE layer: the routing decision comes back, `ensure` finds
(or loads) the experts' slots, the layer's program is dispatched, then the planner reads the predictor's
scores and queues prefetches. On an accelerator this round trip is on the critical path wherever a layer
computes faster than it: Qwen3-30B-A3B's 8 routed experts of 9.4 MB take ~25 us of H100 memory time per
layer, while the H100 run (bench/results/h100) decoded at 1.2 ms per MoE layer with every expert cached.

Here a shape's real layer and expert counts run with every width shrunk by --scale (synthetic weights,
routing replayed from the default model's traces as in `bench.sizes`), the cache holding every expert and
warmed by a first pass, so each decode step is almost pure host work. Per policy: decode wall time per MoE
layer (median over passes), next to the resident engine's (one whole-model program per token). One more
pass per policy attributes the time (wrapping the engine's steps, which adds a little): the routing
decision's wait for the device, `ensure`, the rest of routing (slot ids, kernel choice), the dispatch of
the layer's program, and planning (feedback, prediction, plan, eviction bookkeeping). Then the same
engine runs every decode step as one whole-token program over the slots (scheduler.speculation): the
host work it leaves is one dispatch and the bookkeeping per token.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import time
from pathlib import Path


from jaxmoe.errors import JaxmoeError, run_cli

DEFAULT_POLICIES = ("on-demand", "lfu", "prefetch", "presched", "adaptive")


def per_layer_seconds(driver, prompts, tokens: int, moe_layers: int, repeats: int) -> tuple[list[float], dict]:
    """Decode seconds per MoE layer of each pass over `prompts` -> (per pass, the last generation's stats)."""
    passes = []
    for _ in range(repeats):
        decode_s = steps = 0
        for prompt in prompts:
            stats = driver.generate(prompt, tokens).stats
            decode_s += stats["decode_s"]
            steps += stats["generated_tokens"] - 1
        passes.append(decode_s / (steps * moe_layers))
    return passes, stats


def breakdown(engine, driver, prompts, tokens: int) -> dict:
    """One pass with the engine's per-layer steps timed in decode -> {step: seconds per decoded MoE layer}."""
    from jaxmoe import offload

    spent: dict[str, float] = {}
    calls = {"layers": 0}

    def timed(label, fn):
        def wrapper(*args, **kwargs):
            if not engine._decoding:
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - t0
        return wrapper

    route, ensure, after = engine._route, engine._ensure, engine._after_layer
    original_dispatch = offload.moe_back_front

    def counted_route(*args, **kwargs):
        calls["layers"] += engine._decoding
        return route(*args, **kwargs)

    engine._route = timed("route", counted_route)
    engine._ensure = timed("ensure", ensure)
    engine._after_layer = timed("plan", after)
    offload.moe_back_front = timed("dispatch", original_dispatch)
    try:
        decode_s = sum(driver.generate(prompt, tokens).stats["decode_s"] for prompt in prompts)
    finally:
        offload.moe_back_front = original_dispatch
        del engine._route, engine._ensure, engine._after_layer  # back to the class's methods
    n = calls["layers"]
    out = {"total": decode_s / n, "ensure": spent.get("ensure", 0.0) / n,
           "route_other": (spent.get("route", 0.0) - spent.get("ensure", 0.0)) / n,
           "dispatch": spent.get("dispatch", 0.0) / n, "plan": spent.get("plan", 0.0) / n}
    out["rest"] = out["total"] - sum(v for k, v in out.items() if k != "total")
    return out


def run(args) -> int:
    import jax

    from bench.policies import save_report
    from bench.shapes import SHAPE_NAMES, model_config
    from bench.sizes import ReplayDriver, resolve_trace, versions
    from bench.synthetic import NOTICE, SyntheticModel, replayed_routing
    from jaxmoe.offload import POLICIES
    from scheduler.speculation import Speculation

    if args.shape not in SHAPE_NAMES:
        raise JaxmoeError(f"--shape {args.shape!r}: unknown; available: {', '.join(SHAPE_NAMES)}")
    policies = [p for p in args.policies.split(",") if p]
    unknown = [p for p in policies if p not in POLICIES or p == "oracle"]
    if unknown:
        raise JaxmoeError(f"--policies: {unknown} not measurable here; available: {', '.join(p for p in POLICIES if p != 'oracle')}")
    if not 0 < args.scale <= 1:
        raise JaxmoeError(f"--scale {args.scale}: must be in (0, 1]")
    cfg = dataclasses.replace(model_config(args.shape, args.layers, args.scale), eos_token_ids=())
    moe_layers = len(cfg.moe_layer_ids)
    total_experts = cfg.num_experts * moe_layers
    print(f"[host-overhead] {args.shape} at width scale {args.scale}: {moe_layers} MoE layers x {cfg.num_experts} "
          f"experts, top-{cfg.num_experts_per_tok}, every expert cached", file=sys.stderr, flush=True)
    model = SyntheticModel.build(cfg, seed=args.seed, device=jax.devices()[0], progress=True)
    source, trace_path = resolve_trace("auto")
    prompts, replay, predictor, routing = replayed_routing(
        cfg, source, trace_path, "replay-lookahead", args.prompts, args.prompt_tokens, args.tokens, args.seed)

    resident = model.resident_engine()
    resident.generate(prompts[0], args.tokens)  # compile
    resident_passes, _ = per_layer_seconds(resident, prompts, args.tokens, moe_layers, args.repeats)
    del resident
    gc.collect()
    rows = []
    for policy in policies:
        engine = model.engine(total_experts, policy, predictor)
        engine.speculation = Speculation("off")  # the layer path first; the whole-token program below
        engine.routing_override = replay
        driver = ReplayDriver(engine, replay, prompts)
        for prompt in prompts:  # compile, and load every expert the measured passes use
            driver.generate(prompt, args.tokens)
        passes, stats = per_layer_seconds(driver, prompts, args.tokens, moe_layers, args.repeats)
        if args.profile is not None and policy == policies[0]:
            import jax.profiler

            with jax.profiler.trace(str(args.profile)):  # one generation: the timeline of host and device per layer
                driver.generate(prompts[0], args.tokens)
        row = {"policy": policy, "us_per_moe_layer": 1e6 * statistics.median(passes),
               "us_per_moe_layer_all_passes": [1e6 * p for p in passes], "decode_hit_rate": stats["hit_rate"],
               "breakdown_us": {k: 1e6 * v for k, v in breakdown(engine, driver, prompts, args.tokens).items()}}
        row["vs_resident"] = row["us_per_moe_layer"] / (1e6 * statistics.median(resident_passes))
        engine.speculation = Speculation("on")  # every decode step one program over the slots
        driver.generate(prompts[0], args.tokens)  # compile
        whole, whole_stats = per_layer_seconds(driver, prompts, args.tokens, moe_layers, args.repeats)
        row["whole_token_us_per_moe_layer"] = 1e6 * statistics.median(whole)
        row["whole_token_us_per_moe_layer_all_passes"] = [1e6 * p for p in whole]
        row["whole_token_vs_resident"] = row["whole_token_us_per_moe_layer"] / (1e6 * statistics.median(resident_passes))
        row["whole_token_redone"] = whole_stats["speculation_redone"]
        rows.append(row)
        print(f"[host-overhead] {policy}: {row['us_per_moe_layer']:.0f} us per MoE layer layer by layer, "
              f"{row['whole_token_us_per_moe_layer']:.0f} as whole-token steps (hit rate {row['decode_hit_rate']:.3f})",
              file=sys.stderr, flush=True)
        engine.cache.close()
        del engine, driver
        gc.collect()
    report = {
        "notice": NOTICE,
        "shape": args.shape,
        "reduced": {"scale": args.scale, "layers": args.layers},
        "experts": f"{moe_layers} MoE layers x {cfg.num_experts} experts, top-{cfg.num_experts_per_tok}",
        "routing": routing,
        "device": str(jax.devices()[0]),
        "software": versions(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "resident_us_per_moe_layer": 1e6 * statistics.median(resident_passes),
        "runs": rows,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    table = markdown(report)
    save_report(report, table, args.out, args.name)
    print(table)
    return 0


def markdown(report: dict) -> str:
    lines = [f"# Host overhead per MoE layer — {report['shape']} ({report['experts']}) on {report['device']}", "",
             f"**{report['notice'].rstrip('.')}.** Widths scaled by {report['reduced']['scale']:g}, so compute is negligible and "
             "a decode step is almost all host work; every expert cached (decode hit rate in the table).", "",
             f"Resident engine (one whole-model program per token): {report['resident_us_per_moe_layer']:.0f} us per MoE layer.", "",
             "| policy | us per MoE layer | x resident | whole-token steps: us per MoE layer | x resident | hit rate | ensure | routing, rest | dispatch | planning | rest |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        b = r["breakdown_us"]
        whole = (f"{r['whole_token_us_per_moe_layer']:.0f} | {r['whole_token_vs_resident']:.2f}"
                 if "whole_token_us_per_moe_layer" in r else "— | —")
        lines.append(f"| {r['policy']} | {r['us_per_moe_layer']:.0f} | {r['vs_resident']:.2f} | {whole} | {r['decode_hit_rate']:.3f} | "
                     f"{b['ensure']:.0f} | {b['route_other']:.0f} | {b['dispatch']:.0f} | {b['plan']:.0f} | {b['rest']:.0f} |")
    lines += ["", "The first columns time the layer path (one round trip to the host per MoE layer); whole-token steps "
              "run every decode step as one program over the slots (`--speculate on`, scheduler.speculation), "
              "which the runtime's default (auto) picks where it measures them faster.", "",
              "Breakdown of the layer path (us per decoded MoE layer, one extra pass with the steps timed, which adds a little): "
              "ensure = slot lookup, pins, eviction stamps; routing, rest = the wait for the routing decision "
              "(device -> host) and the slot ids; dispatch = the layer's program; planning = feedback, prediction, "
              "plan, eviction bookkeeping; rest = the remainder of the step (the last layer, final norm and logits, "
              "sampling, the loop).", "",
              f"Command: `python -m bench host-overhead --shape {report['shape']} --scale {report['reduced']['scale']:g}`; "
              f"{report['when']}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench host-overhead", description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="qwen3-30b-a3b", help="a bench.shapes name (real layer and expert counts)")
    p.add_argument("--scale", type=float, default=0.01, help="width scale: small enough that compute is negligible")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    p.add_argument("--policies", default=",".join(DEFAULT_POLICIES))
    p.add_argument("--tokens", type=int, default=16, help="tokens generated per prompt")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="directory for NAME.json and NAME.md (default bench/results/<device>)")
    p.add_argument("--name", default="host_overhead")
    p.add_argument("--profile", type=Path, default=None,
                   help="also write a jax.profiler trace of one generation of the first policy to this directory")
    return run_cli(run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
