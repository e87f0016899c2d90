"""Policy comparison: decode speed of every expert-cache policy x cache size, side by side in one run.

    python -m bench policies [--model DIR] [--cache 0.1,0.25,0.5] [--policies ...] [--predictor SPEC]
                             [--fuse-predictor auto|on|off] [--speculate auto|on|off[,...]]
                             [--quantize-experts none|int8|int4[,...]]
                             [--link auto|GBPS[,US]] [--prompts N]
                             [--max-new-tokens N] [--repeats N] [--out DIR]

`--policies` entries are policy names, or POLICY@PREDICTOR for a prefetching policy driven by a given
predictor (gate-lookahead, previous-token, frequency or a trained LLaPor directory), so one run can put
e.g. `prefetch@previous-token,prefetch@frequency,prefetch@gate-lookahead` side by side; a bare
prefetching policy uses `--predictor` (default gate-lookahead). `--speculate off,auto` measures every
policy both with decode steps layer by layer only and with the engine's default choice (see
scheduler.speculation), side by side. `--quantize-experts none,int8,int4` likewise measures every policy
with the model's own expert weights and with quantized experts (jaxmoe.expert_quant) over the same link: a
cache size is a number of slots, so a quantized row uses fewer device bytes than its unquantized row.

Each (policy, cache size) gets its own engine and a warm-up (compilation, cache fill); then, per cache
size, `repeats` rounds each run one measured pass over the same prompts on every engine in turn, so the
configurations compared share the machine's slow and fast minutes; the figures are medians over
passes. A cache size's engines are all alive at once (each with its own host copy of the experts: meant
for small models such as the default one). `--link auto` sets the emulated link so that moving one expert takes as long as one MoE
layer's compute, measured on this machine with every expert cached (the PCIe-attached GPU regime).
Writes JSON and a Markdown table under `--out` (default bench/results/<device>/). Everything produced
under the link emulator says so.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

import jaxmoe
from jaxmoe.engine import ResidentEngine, cache_length
from jaxmoe.errors import JaxmoeError, run_cli
from jaxmoe.offload import POLICIES, PREDICTOR_POLICIES

DEFAULT_POLICIES = ("on-demand", "lfu", "prefetch", "presched", "adaptive", "oracle")


def device_name() -> str:
    d = jax.devices()[0]
    return d.device_kind.lower().replace(" ", "-") if d.platform != "cpu" else "cpu"


def save_report(report: dict, table: str, out_dir: Path | None, name: str) -> Path:
    """Writes NAME.json (the report) and NAME.md (its table) under `out_dir` (default
    bench/results/<device>/) -> the directory."""
    out_dir = out_dir or Path(__file__).parent / "results" / device_name()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(table)
    return out_dir


def make_prompts(engine, count: int, length: int, seed: int = 0) -> list[list[int]]:
    """Code prompts from CPython's standard library when the model has a tokenizer, else random ids."""
    rng = np.random.default_rng(seed)
    tok = engine.tokenizer
    if tok is None:
        return [rng.integers(3, engine.cfg.vocab_size, length).tolist() for _ in range(count + 1)]
    import os

    stdlib = Path(os.__file__).parent
    files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size > 4000)
    picks = rng.choice(len(files), size=count + 1, replace=False)
    prompts = []
    for i in picks:
        ids = tok.encode(files[i].read_text(errors="replace"), add_special_tokens=False)
        start = int(rng.integers(0, max(1, len(ids) - length)))
        prompts.append(ids[start : start + length])
    return prompts


def run_engine(engine, prompts, max_new_tokens: int, repeats: int) -> dict:
    """`warm_up`, then `repeats` passes over prompts[1:] (`measure_pass`) -> `summarize` of them."""
    warm_up(engine, prompts, max_new_tokens)
    return summarize([measure_pass(engine, prompts, max_new_tokens) for _ in range(repeats)])


def run_engines_interleaved(engines: list, prompts, max_new_tokens: int, repeats: int) -> list[dict]:
    """`run_engine` for several engines side by side: every engine warmed up, then each repeat runs one pass
    of each engine in turn, so a machine's slow minutes fall on every configuration alike (run one after
    the other, configurations measured minutes apart differed by up to 15% on the 2-core VM where an
    interleaved A/B of the same two found none) -> one `summarize` per engine."""
    for engine in engines:
        warm_up(engine, prompts, max_new_tokens)
    passes = [[] for _ in engines]
    for _ in range(repeats):
        for engine, done in zip(engines, passes):
            done.append(measure_pass(engine, prompts, max_new_tokens))
    return [summarize(done) for done in passes]


def warm_up(engine, prompts, max_new_tokens: int) -> None:
    """A generation of prompts[0], then of every measured prompt just long enough to allocate the KV cache
    the measured ones do (the offloaded prefill kernel compiles once per bucket of rows per expert group,
    which depends on the routing, and per KV-cache length: a 1-token warm-up, shorter than that, left
    programs to compile inside the measured TTFT, 1.8-2.3 s for one prompt of six). An offloaded engine
    deciding for itself whether to run decode steps as one program (speculation "auto") warms that
    program up too: its first generation runs every step that way; later ones choose from measured costs."""
    speculation = getattr(engine, "speculation", None)  # resident engines have none
    if speculation is not None and speculation.mode == "auto":
        speculation.mode = "on"
        try:
            engine.generate(prompts[0], max_new_tokens)
        finally:
            speculation.mode = "auto"
    engine.generate(prompts[0], max_new_tokens)
    for prompt in prompts[1:]:
        engine.generate(prompt, warmup_tokens(len(prompt), max_new_tokens))


def measure_pass(engine, prompts, max_new_tokens: int) -> dict:
    """One measured pass over prompts[1:] -> its aggregate figures (`compile_s`: compilation inside it, 0
    when the warm-up covered every program)."""
    decode_s = tokens = stall = h2d = hits = requests = prefetches = prefetch_hits = ttft = whole = redone = 0.0
    compile_s = main_cpu = transfer_cpu = 0.0
    for prompt in prompts[1:]:
        s = engine.generate(prompt, max_new_tokens).stats
        compile_s += s["compile_s"]
        decoded = s["generated_tokens"] - 1
        decode_s += s["decode_s"]
        tokens += decoded
        ttft += s["ttft_s"]
        stall += s["stall_s"]
        h2d += s["h2d_bytes"]
        cache = s.get("decode_cache", {})
        hits += cache.get("hits", decoded)
        requests += cache.get("hits", decoded) + cache.get("late_hits", 0) + cache.get("misses", 0)
        prefetches += cache.get("prefetches", 0)
        prefetch_hits += cache.get("prefetch_hits", 0)
        whole += s.get("speculated_tokens", 0)
        redone += s.get("speculation_redone", 0)
        main_cpu += s["decode_main_cpu_s"]
        transfer_cpu += cache.get("transfer_cpu_s", 0.0)
    return {
        "decode_tokens_per_s": tokens / decode_s,
        "ttft_s": ttft / len(prompts[1:]),
        "stall_fraction": stall / decode_s,
        "hit_rate": hits / requests if requests else 1.0,
        "prefetch_precision": prefetch_hits / prefetches if prefetches else None,
        "h2d_gb_per_token": h2d / 1e9 / tokens,
        # decode steps run as one program, and those finished layer by layer after a miss (of all steps)
        "whole_token_fraction": whole / tokens,
        "whole_token_redone_fraction": redone / tokens,
        # host CPU per decoded token: the decode loop's thread, and the expert-transfer thread (which
        # shares the interpreter lock with it); ms
        "main_cpu_ms_per_token": 1e3 * main_cpu / tokens,
        "transfer_cpu_ms_per_token": 1e3 * transfer_cpu / tokens,
        "compile_s": compile_s,
    }


def summarize(passes: list[dict]) -> dict:
    """Medians over passes of each figure; `decode_tokens_per_s_all_passes`; `measured_compile_s`, the
    compilation inside all of them."""
    figures = [k for k in passes[0] if k != "compile_s"]
    # a figure can be undefined in some passes only (prefetch precision of a pass that prefetched nothing)
    out = {k: statistics.median(vals) if (vals := [p[k] for p in passes if p[k] is not None]) else None for k in figures}
    out["decode_tokens_per_s_all_passes"] = [p["decode_tokens_per_s"] for p in passes]
    out["measured_compile_s"] = sum(p["compile_s"] for p in passes)
    return out


def warmup_tokens(prompt_len: int, max_new_tokens: int) -> int:
    """The fewest new tokens whose generation allocates the same KV cache (so runs the same programs) as
    one of `max_new_tokens`."""
    target = cache_length(prompt_len, max_new_tokens)
    return next(t for t in range(1, max_new_tokens + 1) if cache_length(prompt_len, t) == target)


def layer_compute_seconds(model_dir, prompts, max_new_tokens: int) -> float:
    """Measured compute time of one MoE layer in the offloaded decode loop with every expert cached."""
    engine = jaxmoe.load(model_dir, policy="on-demand", speculate="off")  # the layer path times its layers
    engine.generate(prompts[0], max_new_tokens)
    result = engine.generate(prompts[1], max_new_tokens)
    return result.stats["layer_compute_s"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.policies", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None, help="converted model (default: the embedded default model)")
    p.add_argument("--cache", default="0.1,0.25,0.5", help="cache sizes as fractions of all experts")
    p.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                   help="comma-separated policies; POLICY@PREDICTOR picks a prefetching policy's predictor")
    p.add_argument("--predictor", default=None,
                   help="predictor of the prefetching policies given without @PREDICTOR (default gate-lookahead)")
    p.add_argument("--fuse-predictor", choices=("auto", "on", "off"), default="auto",
                   help="the prefetching policies' predictor inside each MoE layer's program (auto: on accelerators)")
    p.add_argument("--speculate", default="auto",
                   help="decode steps as one program when their experts are cached: auto, on, off, or several "
                        "(comma-separated) to measure each policy under each")
    p.add_argument("--quantize-experts", default="none",
                   help="routed experts: none (the model's dtype), int8, int4, or several comma-separated, side by side")
    p.add_argument("--link", default="auto", help="'auto', 'none' or GBPS[,LATENCY_US]")
    p.add_argument("--prompts", type=int, default=6, help="measured prompts (the replay's six by default)")
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--name", default="policies")
    args = p.parse_args(argv)
    return run_cli(run, args)


def resolve_model_and_policies(args, with_predictors: bool = False) -> list:
    """Fills in the default model for a missing --model; --policies -> the list of policies (unknown names
    raise), or with_predictors: of (policy, predictor or None) pairs from POLICY@PREDICTOR entries
    (`split_policy`, default `args.predictor`). Without it a POLICY@PREDICTOR entry raises."""
    if args.model is None:
        from jaxmoe.default_model import default_model_dir

        args.model = default_model_dir()
    policies = [x for x in args.policies.split(",") if x]
    unknown = [x for x in policies if x.partition("@")[0] not in POLICIES]
    if unknown:
        raise JaxmoeError(f"--policies: unknown {unknown}; available: {', '.join(POLICIES)}")
    if with_predictors:
        return [split_policy(x, args.predictor) for x in policies]
    named = [x for x in policies if "@" in x]
    if named:
        raise JaxmoeError(f"--policies {named[0]}: POLICY@PREDICTOR is for `python -m bench policies`; here --predictor "
                          "picks the one predictor")
    return policies


def split_policy(entry: str, default_predictor: str | None) -> tuple[str, str | None]:
    """A --policies entry, POLICY or POLICY@PREDICTOR -> (policy, predictor or None: the engine's default).
    A predictor given to a policy that uses none raises."""
    policy, _, predictor = entry.partition("@")
    if predictor and policy not in PREDICTOR_POLICIES:
        raise JaxmoeError(f"--policies {entry}: only {', '.join(PREDICTOR_POLICIES)} take a predictor")
    if policy not in PREDICTOR_POLICIES:
        return policy, None
    return policy, predictor or default_predictor


def parse_modes(flag: str, value: str, allowed) -> list[str]:
    """A flag taking one mode or several, comma-separated -> the modes, each once, in order; anything not
    in `allowed` (or none at all) raises naming the flag."""
    modes = [m for m in value.split(",") if m]
    if not modes or any(m not in allowed for m in modes):
        raise JaxmoeError(f"{flag} {value!r}: expected one or more of {', '.join(allowed)}")
    return list(dict.fromkeys(modes))


def parse_speculate(value: str) -> list[str]:
    """--speculate: one mode or several, comma-separated -> the modes."""
    from jaxmoe.offload import SPECULATE_MODES

    return parse_modes("--speculate", value, SPECULATE_MODES)


def parse_quantize(value: str) -> list[str | None]:
    """--quantize-experts: none, int8, int4 or several, comma-separated -> the modes (None: unquantized)."""
    from jaxmoe.expert_quant import QUANTIZE_MODES

    return [None if m == "none" else m for m in parse_modes("--quantize-experts", value, ("none", *QUANTIZE_MODES))]


def add_ratios(rows: list[dict], metric: str) -> None:
    """Sets vs_on_demand and vs_oracle on each row: its `metric` over that of the same cache size's (and
    speculation mode's and expert quantization's) on-demand / oracle row (None where that policy was not run)."""
    group_of = lambda r: (r["cache_fraction"], r.get("speculate"), r.get("quantize_experts"))  # noqa: E731
    for group in dict.fromkeys(map(group_of, rows)):
        same = [r for r in rows if group_of(r) == group]
        base = next((r for r in same if r["policy"] == "on-demand"), None)
        oracle = next((r for r in same if r["policy"] == "oracle"), None)
        for r in same:
            r["vs_on_demand"] = r[metric] / base[metric] if base else None
            r["vs_oracle"] = r[metric] / oracle[metric] if oracle else None


def run(args) -> int:
    entries = resolve_model_and_policies(args, with_predictors=True)
    fractions = [float(x) for x in args.cache.split(",")]
    modes = parse_speculate(args.speculate)
    quantize_modes = parse_quantize(args.quantize_experts)
    resident = jaxmoe.load(args.model)
    assert isinstance(resident, ResidentEngine)
    cfg = resident.cfg
    prompts = make_prompts(resident, args.prompts, args.prompt_tokens)
    total_experts = cfg.num_experts * len(cfg.moe_layer_ids)
    rows = []
    results = {"resident": run_engine(resident, prompts, args.max_new_tokens, args.repeats)}
    del resident
    link = None
    compute_s = None
    if args.link == "auto":
        compute_s = layer_compute_seconds(args.model, prompts, args.max_new_tokens)
        probe = jaxmoe.load(args.model, cache_slots=cfg.num_experts_per_tok)
        expert_bytes = probe.store.expert_bytes
        del probe
        link = f"{expert_bytes / compute_s / 1e9:.6f},0"
    elif args.link != "none":
        link = args.link
    combos = [(pol, pred, mode, quant) for quant in quantize_modes for mode in modes for pol, pred in entries]
    progress = tqdm(total=len(fractions) * len(combos), desc="policy x cache", unit="run")
    for fraction in fractions:  # each cache size's configurations measured side by side, passes interleaved
        slots = max(cfg.num_experts_per_tok, int(round(fraction * total_experts)))
        engines = []
        for policy, predictor, mode, quant in combos:
            options = {"cache_slots": slots, "policy": policy, "speculate": mode, "quantize_experts": quant}
            if link:
                options["emulate_link"] = link
            if predictor:
                options["predictor"] = predictor
            if policy in PREDICTOR_POLICIES and args.fuse_predictor != "auto":
                options["fuse_predictor"] = args.fuse_predictor == "on"
            engines.append(jaxmoe.load(args.model, **options))
        measured = run_engines_interleaved(engines, prompts, args.max_new_tokens, args.repeats)
        for engine, r, (policy, predictor, mode, quant) in zip(engines, measured, combos):
            r.update(cache_fraction=fraction, cache_slots=slots, policy=policy,
                     predictor=getattr(engine.predictor, "name", None), predictor_spec=predictor,
                     predictor_fused=engine.stats()["predictor_fused"], speculate=mode, speculate_modes=len(modes),
                     quantize_experts=quant, quantize_modes=len(quantize_modes),
                     expert_bytes=engine.store.expert_bytes, slot_bytes=slots * engine.store.expert_bytes)
            rows.append(r)
        progress.update(len(combos))
        del engines
    progress.close()
    add_ratios(rows, "decode_tokens_per_s")
    report = {
        "model": str(args.model),
        "family": cfg.family,
        "experts": f"{len(cfg.moe_layer_ids)} MoE layers x {cfg.num_experts} experts, top-{cfg.num_experts_per_tok}",
        "device": str(jax.devices()[0]),
        "emulated_link": (f"{link} (GB/s, latency us)" + (f"; auto: one expert = one MoE layer's compute = {compute_s * 1e3:.3f} ms" if compute_s else "")) if link else None,
        "software": {"jax": jax.__version__, "python": platform.python_version(), "platform": platform.platform()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "resident": results["resident"],
        "runs": rows,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    table = markdown_table(report)
    save_report(report, table, args.out, args.name)
    print(table)
    return 0


def policy_label(row: dict) -> str:
    """`policy`, or `policy@predictor` where a --policies entry named the predictor; with the expert
    quantization and the speculation mode where a run measured several."""
    label = f"{row['policy']}@{row['predictor']}" if row.get("predictor_spec") and row.get("predictor") else row["policy"]
    if row.get("quantize_modes", 1) > 1:
        label += f", {row['quantize_experts'] or 'unquantized'} experts"
    return f"{label} (speculate {row['speculate']})" if row.get("speculate_modes", 1) > 1 else label


def whole_token_cell(row: dict) -> str:
    """The share of decode steps run as one program and, in brackets, of steps redone after a miss."""
    if row.get("whole_token_fraction") is None:
        return "—"
    return f"{row['whole_token_fraction']:.2f} ({row['whole_token_redone_fraction']:.2f})"


def host_cpu_cell(run: dict) -> str:
    """The decode loop's and the transfer thread's CPU ms per token ("—" for results recorded before
    they were measured)."""
    if "main_cpu_ms_per_token" not in run:
        return "—"
    return f"{run['main_cpu_ms_per_token']:.3g}, {run['transfer_cpu_ms_per_token']:.3g}"


def markdown_table(report: dict) -> str:
    lines = [f"# Policy comparison — {report['family']} ({report['experts']}) on {report['device']}", ""]
    if report["emulated_link"]:
        lines += [f"**EMULATED LINK**: {report['emulated_link']}", ""]
    res = report["resident"]
    lines += [f"Resident (all weights on device): {res['decode_tokens_per_s']:.1f} decode tok/s, TTFT {res['ttft_s'] * 1e3:.0f} ms", "",
              "| cache | policy | decode tok/s | x on-demand | x oracle | hit rate | stall frac | prefetch prec | H2D MB/tok | TTFT ms | whole-token steps (redone) | host CPU ms/tok: loop, transfers |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
    for r in report["runs"]:
        lines.append(
            f"| {r['cache_fraction']:.0%} ({r['cache_slots']}) | {policy_label(r)} | {r['decode_tokens_per_s']:.1f} | "
            f"{fmt(r['vs_on_demand'], '.2f')} | {fmt(r['vs_oracle'], '.2f')} | {r['hit_rate']:.3f} | "
            f"{r['stall_fraction']:.3f} | {fmt(r['prefetch_precision'], '.3f')} | {r['h2d_gb_per_token'] * 1e3:.3f} | "
            f"{r['ttft_s'] * 1e3:.0f} | {whole_token_cell(r)} | {host_cpu_cell(r)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
