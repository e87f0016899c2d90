"""Decode/prefill benchmarks at real model sizes, without downloads: SYNTHETIC WEIGHTS, replayed routing.

    python -m bench.sizes --shape mixtral-8x7b|qwen3-30b-a3b|deepseek-v2-lite|olmoe-1b-7b|all
                          [--cache 0.1,0.25,0.5,0.75,1.0] [--policies on-demand,lfu,...] [--trace auto|none|DIR|FILE.npz]
                          [--tokens N] [--prompt-tokens N] [--prompts N] [--repeats N] [--layers N] [--scale S]
                          [--peer auto|hf|none] [--time-budget S] [--out DIR]
    python -m bench.sizes --plot-only RESULT.json        (re-draw Markdown + PNG from a result file)
    python -m bench.sizes --save-routing FILE.npz [--trace DIR]   (compact routing file from a trace)

Per shape (bench.shapes: the exact parameter shapes of the public release, bfloat16):
  1. the Hugging Face peer (transformers + accelerate `device_map` CPU offload, random weights, same
     config) in a subprocess, first, before JAX takes the accelerator (skipped with a note on a CPU-only
     machine or without torch/accelerate);
  2. a synthetic model (bench.synthetic): random non-expert weights on the device, random experts in
     pinned host memory;
  3. the host-to-device bandwidth at expert size from pinned_host and from pageable (numpy) memory;
  4. the compute floor: the offloaded engine with routing forced onto k experts per layer, all
     cached (every request a hit, no transfers): seconds per decode token;
  5. every cache size (ascending) x policy: decode tok/s, TTFT, stall fraction, hit rate, prefetch
     precision, H2D GB/token, peak device memory, each policy as a fraction of the bound; routing
     replayed from the trace of the trained default model mapped onto the target's experts
     (bench.synthetic.MAPPING_DOC), or seeded synthetic routing without a trace;
  6. the resident engine (every weight on the device) where it fits.

The bound per cache size: the Belady-minimal number of expert transfers over the replayed decode
requests (scheduler.eviction.Belady's rule on a SlotTable, cache warm-started with the best content),
  bound tok/s           = T / max(T * compute_s, min_bytes / pinned bandwidth)   (perfect overlap; a true bound)
  per-token bound tok/s = T / sum_t max(compute_s, min_bytes_t / bandwidth)      (no overlap across tokens)
`fraction_of_bound` = decode tok/s / bound tok/s.

Each (policy, cache) engine gets a warm-up generation (compilation, cache fill; excluded), then
`repeats` passes over the measured prompts (bench.policies.run_engine); figures are medians over passes.
EOS is disabled, so every generation decodes exactly --tokens tokens. Results: JSON + Markdown + PNG
under --out (default bench/results/<device>/), rewritten after every run so a cut-off run keeps what
it measured. Everything written says the weights are synthetic.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from bisect import bisect_left
from collections import defaultdict
from pathlib import Path

import numpy as np

from bench.shapes import SHAPE_NAMES, describe, hf_config_dict, model_config
from jaxmoe.errors import JaxmoeError, run_cli
from jaxmoe.expert_quant import QUANTIZE_MODES
from scheduler.expert_cache import COPIES_IN_FLIGHT
from scheduler.speculation import MODES as SPECULATION_MODES, Speculation

DEFAULT_POLICIES = ("on-demand", "lfu", "prefetch", "presched", "adaptive", "oracle")
DEFAULT_CACHE = "0.1,0.25,0.5,0.75,1.0"
DEVICE_MARGIN_BYTES = 2 << 30  # activations, compiled code, one expert in flight
REPO = Path(__file__).resolve().parent.parent
AUTO_TRACES = (REPO / "traces" / "default", REPO / "bench" / "routing" / "default.npz")


# ----------------------------------------------------------------------------------------------
# the bound

def _belady_class():
    from scheduler.eviction import LRU, Belady

    class IndexedBelady(Belady):
        """scheduler.eviction.Belady's choice (farthest next use, ties: least recently used) with sorted
        per-key use lists instead of one dict per step, so long request sequences stay small."""

        def __init__(self, future):
            LRU.__init__(self)
            self.step = 0
            self.uses: dict = defaultdict(list)
            for t, keys in enumerate(future):
                for key in keys:
                    self.uses[key].append(t)
            self.never = len(future) + 1

        def advance(self, step: int) -> None:
            self.step = step

        def next_use(self, key) -> int:
            uses = self.uses.get(key)
            if not uses:
                return self.never
            i = bisect_left(uses, self.step)
            return uses[i] if i < len(uses) else self.never

        def victim(self, table, candidates=None):
            candidates = table.evictable_slots() if candidates is None else list(candidates)
            if not candidates:
                raise RuntimeError("no evictable slot: every slot is pinned")
            return max(candidates, key=lambda s: (self.next_use(table.key_in_slot[s]),
                                                  -self.last_use(table.key_in_slot[s])))

    return IndexedBelady


def min_transfers(steps: list[set], num_slots: int, policy=None) -> list[int]:
    """Belady-minimal expert transfers per step of a request sequence (each step: the keys one layer needs,
    all resident at once). The cache starts warm with the best possible content: filling a free slot is
    free (= starting with the first `num_slots` distinct keys, Belady's choice), only evictions count."""
    from scheduler.slot_table import SlotTable

    table = SlotTable(num_slots)
    policy = policy if policy is not None else _belady_class()(steps)
    out = []
    for t, keys in enumerate(steps):
        if len(keys) > num_slots:
            raise ValueError(f"step {t} needs {len(keys)} experts at once, more than {num_slots} slots")
        if hasattr(policy, "advance"):
            policy.advance(t)
        table.unpin_all()
        missing = []
        for key in keys:
            slot = table.lookup(key)
            if slot is None:
                missing.append(key)
            else:
                table.pin(slot)
        transfers = 0
        for key in missing:
            free = table.free_slots()
            if free:
                slot = free[0]
            else:
                slot = policy.victim(table)
                transfers += 1
            table.assign(key, slot)
            table.pin(slot)
        for key in keys:
            policy.touch(key)
        out.append(transfers)
    return out


def bound_for_cache(replay, prompt_indices, first_position: int, decode_tokens: int, num_slots: int,
                    expert_bytes: int, bandwidth: float, compute_s: float) -> dict:
    """The bound (module docstring) over the measured prompts' replayed decode requests."""
    total_tokens = total_transfers = 0
    per_token_s = 0.0
    for i in prompt_indices:
        tokens = replay.decode_requests(i, first_position, decode_tokens)  # [token][layer] -> set
        steps = [layer for token in tokens for layer in token]
        per_step = min_transfers(steps, num_slots)
        per_layer = len(tokens[0])
        for t in range(len(tokens)):
            n = sum(per_step[t * per_layer : (t + 1) * per_layer])
            total_transfers += n
            per_token_s += max(compute_s, n * expert_bytes / bandwidth)
        total_tokens += len(tokens)
    min_bytes = total_transfers * expert_bytes
    bound_s = max(total_tokens * compute_s, min_bytes / bandwidth)
    return {
        "belady_min_transfers_per_token": total_transfers / total_tokens,
        "belady_min_h2d_gb_per_token": min_bytes / 1e9 / total_tokens,
        "transfer_s_per_token": min_bytes / bandwidth / total_tokens,
        "compute_s_per_token": compute_s,
        "bound_tokens_per_s": total_tokens / bound_s,
        "per_token_bound_tokens_per_s": total_tokens / per_token_s,
        "limited_by": "transfers" if min_bytes / bandwidth > total_tokens * compute_s else "compute",
    }


# ----------------------------------------------------------------------------------------------
# measurements

BURST_COPIES = 8


def measure_bandwidth(store, device, repeats: int) -> dict:
    """H2D copy of one expert (one packed array, as the engine moves it): from pinned_host and from pageable
    numpy memory; jax.device_put + block_until_ready, median over `repeats` (after one untimed copy). Also
    `pinned_host_burst_gbps`: BURST_COPIES pinned copies issued at once, then waited for (median of 3): above
    the one-at-a-time figure where a fixed per-copy latency overlaps with the next copy."""
    import jax

    sharding = jax.sharding.SingleDeviceSharding(device)
    keys = list(store.experts)[: repeats + 1]
    pageable = [np.full(store.get(k).shape, i + 1, store.get(k).dtype) for i, k in enumerate(keys[:2])]

    def timed(sources):
        times = []
        for i in range(repeats + 1):
            src = sources[i % len(sources)]
            t0 = time.perf_counter()
            out = jax.device_put(src, sharding)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - t0)
            del out
        return statistics.median(times[1:])

    def burst(sources):  # every copy issued before waiting for any: per-copy latency overlapped if it can be
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            jax.block_until_ready([jax.device_put(src, sharding) for src in sources])
            times.append(time.perf_counter() - t0)
        return statistics.median(times) / len(sources)

    pinned_s = timed([store.get(k) for k in keys])
    pageable_s = timed(pageable)
    burst_s = burst([store.get(k) for k in keys[:BURST_COPIES]])
    nbytes = store.expert_bytes
    return {"expert_bytes": nbytes, "repeats": repeats, "host_memory_kind": store.memory_kind,
            "pinned_host_gbps": nbytes / pinned_s / 1e9, "pageable_gbps": nbytes / pageable_s / 1e9,
            "pinned_host_expert_ms": pinned_s * 1e3, "pageable_expert_ms": pageable_s * 1e3,
            "pinned_host_burst_gbps": nbytes / burst_s / 1e9, "burst_copies": min(BURST_COPIES, len(keys))}


class ReplayDriver:
    """What bench.policies.run_engine drives: selects the prompt's replayed routing, then generates."""

    def __init__(self, engine, replay, prompts):
        self.engine, self.replay = engine, replay
        self.index = {tuple(p): i for i, p in enumerate(prompts)}

    @property
    def speculation(self):
        """The driven engine's decode-step mode (`scheduler.speculation.Speculation`), or None (resident)."""
        return getattr(self.engine, "speculation", None)

    def generate(self, prompt, max_new_tokens, **kwargs):
        if self.replay is not None:
            self.replay.select(self.index[tuple(prompt)])
        return self.engine.generate(prompt, max_new_tokens, **kwargs)


def engine_device_bytes(engine) -> int:
    from jaxmoe.engine import tree_bytes

    return int(engine.weight_bytes + tree_bytes(engine.slots) + tree_bytes(engine._kv))


def device_limit(device) -> int | None:
    return (device.memory_stats() or {}).get("bytes_limit")


def versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("jax", "jaxlib", "flax", "numpy", "transformers", "torch", "accelerate", "matplotlib"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_info(device) -> dict:
    stats = device.memory_stats() or {}
    host = None
    try:
        host = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return {"device": str(device), "platform": device.platform, "device_kind": device.device_kind,
            "device_bytes_limit": stats.get("bytes_limit"), "host_memory_bytes": host, "host_cpus": os.cpu_count()}


def device_name() -> str:
    from bench.policies import device_name as name

    return name()


# ----------------------------------------------------------------------------------------------
# the Hugging Face peer

def peer_availability() -> str | None:
    """None when the HF peer can run here, else why not (decided without initialising any accelerator)."""
    missing = [m for m in ("torch", "transformers", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        return f"skipped: {', '.join(missing)} not installed (the accelerator machine has no package index; carry wheels)"
    if not (Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists()):
        return "skipped: no CUDA device; accelerate CPU offload on a CPU-only machine makes no sense"
    return None


def run_peer(spec: dict, timeout_s: float) -> dict:
    """The HF peer in a subprocess (torch and JAX never share the accelerator)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peer.json"
        cmd = [sys.executable, "-m", "bench.sizes", "--hf-peer-worker", json.dumps(spec), "--out", str(out)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"skipped": f"timed out after {timeout_s:.0f} s (--peer-timeout)"}
        if out.is_file():
            result = json.loads(out.read_text())
            result["wall_s"] = time.perf_counter() - t0
            return result
        return {"skipped": f"failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-1500:]}"}


def hf_random_model(shape: str, layers: int | None, scale: float):
    """The shape's transformers model on the CPU in bfloat16, random values written into every parameter
    (one random chunk copied over and over: memcpy-fast, and every page is real memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights

    hf = hf_config_dict(shape, layers, scale)
    model_type = hf.pop("model_type")
    config = AutoConfig.for_model(model_type, **hf)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    chunk = torch.empty(1 << 24, dtype=torch.bfloat16).uniform_(-0.02, 0.02)
    with torch.no_grad():
        for p in model.parameters():
            flat = p.data.view(-1)
            for off in range(0, flat.numel(), chunk.numel()):
                n = min(chunk.numel(), flat.numel() - off)
                flat[off : off + n].copy_(chunk[:n])
    return model.eval()


def hf_peer_worker(spec: dict) -> dict:
    """transformers model of the shape (random bfloat16 weights), accelerate device_map over GPU + CPU with
    non-expert weights + `cache_fraction` of the experts (+1 GiB) allowed on the GPU: accelerate places whole
    decoder layers there, the rest stays in CPU memory and is moved to the GPU at every forward."""
    import torch
    from accelerate import dispatch_model, infer_auto_device_map

    if not torch.cuda.is_available():
        return {"skipped": "torch sees no CUDA device"}
    t0 = time.perf_counter()
    model = hf_random_model(spec["shape"], spec["layers"], spec["scale"])
    config = model.config
    build_s = time.perf_counter() - t0
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    expert_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    # the same device budget as our engine at --peer-cache: non-expert weights + that fraction of the experts
    gpu_bytes = int(total_bytes - expert_bytes + spec["cache_fraction"] * expert_bytes + (1 << 30))
    max_memory = {0: gpu_bytes, "cpu": int(total_bytes * 2 + (8 << 30))}
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=list(model._no_split_modules or []))
    model = dispatch_model(model, device_map=device_map)
    on_gpu = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if p.device.type == "cuda")
    offloaded_layers = sorted({k for k, v in device_map.items() if v in ("cpu", "disk")})
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, config.vocab_size, (1, spec["prompt_tokens"]), generator=gen) for _ in range(2)]
    tokens = spec["tokens"]
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def generate(ids, n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids.to("cuda:0"), max_new_tokens=n, min_new_tokens=n, **kwargs)
        torch.cuda.synchronize()
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - t

    generate(prompts[0], 2)  # warm-up
    torch.cuda.reset_peak_memory_stats()
    ttft = generate(prompts[1], 1)
    full = generate(prompts[1], tokens)
    return {
        "what": "transformers + accelerate dispatch_model(device_map) CPU offload, random bfloat16 weights, same config",
        "transformers": importlib.metadata.version("transformers"), "accelerate": importlib.metadata.version("accelerate"),
        "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0),
        "gpu_budget_bytes": gpu_bytes, "cache_fraction": spec["cache_fraction"],
        "weight_bytes": int(total_bytes), "weight_bytes_on_gpu": int(on_gpu),
        "offloaded_modules": len(offloaded_layers), "offloaded_module_names": offloaded_layers[:8],
        "build_s": build_s, "ttft_s": ttft, "decode_tokens_per_s": (tokens - 1) / max(full - ttft, 1e-9),
        "generated_tokens": tokens, "prompt_tokens": spec["prompt_tokens"],
        "peak_device_bytes": int(torch.cuda.max_memory_allocated()),
        "note": "accelerate moves every offloaded layer's whole weights (all experts) each forward, whatever the routing",
    }


# ----------------------------------------------------------------------------------------------
# one shape

def parse_fractions(text: str) -> list[float]:
    try:
        fractions = sorted({float(x) for x in text.split(",") if x})
    except ValueError:
        raise JaxmoeError(f"--cache {text!r}: expected comma-separated fractions") from None
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise JaxmoeError("--cache: fractions must be in (0, 1]")
    return fractions


def resolve_trace(arg: str):
    """(RoutingSource or None, its path or None)."""
    from bench.synthetic import load_routing

    if arg == "none":
        return None, None
    if arg == "auto":
        for path in AUTO_TRACES:
            if path.exists():
                return load_routing(path), path
        return None, None
    path = Path(arg)
    if not path.exists():
        raise JaxmoeError(f"--trace {arg}: no such file or directory")
    return load_routing(path), path


class Budget:
    def __init__(self, seconds: float | None):
        self.start, self.seconds = time.perf_counter(), seconds

    def exhausted(self) -> bool:
        return self.seconds is not None and time.perf_counter() - self.start > self.seconds


def pinned_host_limit_gb() -> int:
    """GB of host memory the GPU backend may pin: 90% of physical memory, at least XLA's default 64."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 64
    return max(64, int(0.9 * physical / 2**30))


def peer_summary(peer: dict) -> str:
    """One line for the peer's result; tolerates a result merged from elsewhere with fields missing."""
    if "skipped" in peer:
        return peer["skipped"]
    parts = [f"{peer['decode_tokens_per_s']:.3f} tok/s"]
    if "ttft_s" in peer:
        parts.append(f"TTFT {peer['ttft_s']:.2f} s")
    if "gpu_budget_bytes" in peer:
        parts.append(f"{peer['gpu_budget_bytes'] / 1e9:.1f} GB on the GPU (= cache {peer['cache_fraction']:.0%})")
    if "offloaded_modules" in peer:
        parts.append(f"{peer['offloaded_modules']} modules offloaded")
    line = ", ".join(parts)
    return line + (f" ({peer['note']})" if "note" in peer else "")


def run_shape(name: str, args, source, trace_path, peer: dict, budget: Budget, out_dir: Path) -> dict:
    import jax

    from bench.policies import run_engine
    from bench.synthetic import NOTICE, AllHits, SyntheticModel, layers_fitting_host, replayed_routing

    notes: list[str] = []
    layers = args.layers
    cfg = model_config(name, layers, args.scale)
    info = describe(cfg)
    fit = layers_fitting_host(cfg, info["expert_bytes"])
    if fit is not None:
        notes.append(f"host memory: experts of {info['moe_layers']} MoE layers ({info['routed_expert_bytes'] / 1e9:.1f} GB) "
                     f"exceed 85% of available host memory; reduced to the first {fit} layers (per-layer sizes real)")
        layers = fit
        cfg = model_config(name, layers, args.scale)
        info = describe(cfg)
    cfg = dataclasses.replace(cfg, eos_token_ids=())  # every generation decodes exactly --tokens tokens
    device = jax.devices()[0]
    report = {
        "notice": NOTICE,
        "shape": name,
        "hf_config": hf_config_dict(name, layers, args.scale),
        "model": info,
        "reduced": {"layers": layers, "scale": args.scale} if (layers or args.scale != 1) else None,
        "device": device_info(device),
        "software": versions(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "hf_peer_worker"},
        "notes": notes,
        "peer": peer,
        "runs": [],
        "bounds": {},
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if device.platform != "cpu":
        notes.append("peak device memory is the process's peak so far as the backend reports it (runs go in "
                     "ascending cache size, so it is each run's own peak unless an earlier run's was higher)")
    if device.platform == "cpu":
        notes.append("CPU: host and device memory are the same RAM; transfers are memcpy and compute is CPU "
                     "compute; this checks the pipeline, it says nothing about an accelerator")
    write = lambda: write_outputs(report, out_dir, plots=False)  # noqa: E731

    t0 = time.perf_counter()
    model = SyntheticModel.build(cfg, seed=args.seed, device=device, progress=True, quantize=args.quantize_experts)
    report["build_s"] = time.perf_counter() - t0
    store = model.store
    expert_bytes, total_experts = store.expert_bytes, cfg.num_experts * len(cfg.moe_layer_ids)
    report["moved_expert_bytes"] = expert_bytes  # what one copy moves and one slot holds (quantized: codes + scales)
    print(f"[{name}] synthetic model: {info['total_params'] / 1e9:.2f}B params, {total_experts} experts x "
          f"{_bytes(expert_bytes)} in {store.memory_kind} ({report['build_s']:.0f} s)", file=sys.stderr, flush=True)
    report["bandwidth"] = bw = measure_bandwidth(store, device, args.bandwidth_repeats)
    bandwidth = bw["pinned_host_gbps"] * 1e9

    prompts, replay, predictor, report["routing"] = replayed_routing(
        cfg, source, trace_path, args.predictor, args.prompts + 1, args.prompt_tokens, args.tokens, args.seed)
    measured = list(range(1, len(prompts)))
    decode_tokens = args.tokens - 1
    write()

    # compute floor: every request a hit
    k = cfg.num_experts_per_tok
    engine = model.engine(k * len(cfg.moe_layer_ids), "on-demand")
    engine.speculation = Speculation(args.speculate)
    engine.routing_override = AllHits(k, len(cfg.moe_layer_ids))
    r = run_engine(ReplayDriver(engine, None, prompts), prompts, args.tokens, args.repeats)
    compute_s = 1.0 / r["decode_tokens_per_s"]
    report["compute"] = {"method": "offloaded engine, routing forced onto experts 0..k-1 of every MoE layer with "
                                   "k slots per layer: all hits, no transfers",
                         "s_per_token": compute_s, "decode_tokens_per_s": r["decode_tokens_per_s"],
                         "ttft_s": r["ttft_s"], "hit_rate": r["hit_rate"], "h2d_gb_per_token": r["h2d_gb_per_token"],
                         "whole_token_fraction": r["whole_token_fraction"],
                         "whole_token_redone_fraction": r["whole_token_redone_fraction"]}
    del engine
    gc.collect()
    print(f"[{name}] compute floor {compute_s * 1e3:.2f} ms/token; H2D pinned {bw['pinned_host_gbps']:.1f} GB/s, "
          f"pageable {bw['pageable_gbps']:.1f} GB/s", file=sys.stderr, flush=True)
    write()

    limit = device_limit(device)
    policies = [p for p in args.policies.split(",") if p]
    for fraction in parse_fractions(args.cache):
        slots = max(k, int(round(fraction * total_experts)))
        need = model.non_expert_bytes + slots * expert_bytes + DEVICE_MARGIN_BYTES
        if limit is not None and need > limit:
            notes.append(f"cache {fraction:.0%} ({slots} slots, {slots * expert_bytes / 1e9:.1f} GB): does not fit "
                         f"the device ({need / 1e9:.1f} GB needed of {limit / 1e9:.1f} GB); skipped")
            continue
        bound = bound_for_cache(replay, measured, args.prompt_tokens, decode_tokens, slots, expert_bytes, bandwidth, compute_s)
        report["bounds"][f"{fraction:g}"] = {"cache_slots": slots, **bound}
        for policy in policies:
            if budget.exhausted():
                notes.append(f"--time-budget {args.time_budget:g} s reached: cache {fraction:.0%} {policy} and later runs not measured")
                write()
                return finish(report, model, args, budget, out_dir, prompts, skip_resident=True)
            t0 = time.perf_counter()
            engine = model.engine(slots, policy, predictor)
            engine.speculation = Speculation(args.speculate)
            engine.copies_in_flight = args.copies_in_flight
            engine.routing_override = replay
            r = run_engine(ReplayDriver(engine, replay, prompts), prompts, args.tokens, args.repeats)
            s = engine.stats()
            r.update(cache_fraction=fraction, cache_slots=slots, policy=policy, predictor=s.get("predictor"),
                     peak_device_bytes=s["peak_device_bytes"], engine_device_bytes=engine_device_bytes(engine),
                     fraction_of_bound=r["decode_tokens_per_s"] / bound["bound_tokens_per_s"],
                     fraction_of_per_token_bound=r["decode_tokens_per_s"] / bound["per_token_bound_tokens_per_s"],
                     wall_s=time.perf_counter() - t0)
            report["runs"].append(r)
            del engine, s
            gc.collect()
            print(f"[{name}] cache {fraction:.0%} ({slots}) {policy}: {r['decode_tokens_per_s']:.2f} tok/s, "
                  f"{r['fraction_of_bound']:.2f} of bound, hit {r['hit_rate']:.3f} ({r['wall_s']:.0f} s)",
                  file=sys.stderr, flush=True)
            write()
    return finish(report, model, args, budget, out_dir, prompts, skip_resident=args.skip_resident)


def finish(report, model, args, budget, out_dir, prompts, skip_resident: bool) -> dict:
    """The resident baseline where it fits, then the final outputs (with plots)."""
    import jax

    from bench.policies import run_engine
    from jaxmoe.engine import tree_bytes

    device = jax.devices()[0]
    limit = device_limit(device)
    weights = model.non_expert_bytes + model.store.host_bytes
    if skip_resident or budget.exhausted():
        report["resident"] = {"skipped": "--skip-resident" if skip_resident and args.skip_resident else "time budget reached"}
    elif limit is not None and weights + DEVICE_MARGIN_BYTES > limit:
        report["resident"] = {"skipped": f"all weights ({weights / 1e9:.1f} GB) do not fit the device ({limit / 1e9:.1f} GB)"}
    elif limit is None and device.platform == "cpu" and weights > 0.4 * (_available_host() or float("inf")):
        report["resident"] = {"skipped": "CPU: a resident copy of every expert would not fit host memory beside the store"}
    else:
        engine = model.resident_engine()
        r = run_engine(engine, prompts, args.tokens, args.repeats)
        r["peak_device_bytes"] = engine.stats()["peak_device_bytes"]
        r["weight_bytes"] = int(tree_bytes(engine.state))
        r["note"] = "the model's own (random) router picks the experts: same k per token, so the same compute"
        report["resident"] = r
        del engine
        gc.collect()
    write_outputs(report, out_dir, plots=True)
    return report


def _available_host() -> int | None:
    from bench.synthetic import host_bytes_available

    return host_bytes_available()


# ----------------------------------------------------------------------------------------------
# outputs

def write_outputs(report: dict, out_dir: Path, plots: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = report_stem(report)  # appended to, not with_suffix: shape names hold dots (glm-4.5-air)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    md_path.write_text(markdown(report))
    if plots:
        try:
            report["plots"] = make_plots(report, out_dir)
        except ImportError:
            report["notes"].append("matplotlib not installed: no plots")
        json_path.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
        md_path.write_text(markdown(report))


def report_stem(report: dict) -> str:
    """sizes-SHAPE, with -int8 / -int4 for a run with quantized experts and -inflightN for a run with other
    than the default COPIES_IN_FLIGHT (so it sits beside the default run)."""
    settings = report.get("settings", {})
    quantize, in_flight = settings.get("quantize_experts"), settings.get("copies_in_flight", COPIES_IN_FLIGHT)
    return (f"sizes-{report['shape']}" + (f"-{quantize}" if quantize else "")
            + (f"-inflight{in_flight}" if in_flight != COPIES_IN_FLIGHT else ""))


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    return str(x)


def _fmt(v, f):
    return "—" if v is None else format(v, f)


def _count(n) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _bytes(n) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}" if n < 100 * size else f"{n / size:.0f} {unit}"
    return f"{n:.0f} B"


def markdown(report: dict) -> str:
    from bench.policies import host_cpu_cell, whole_token_cell

    m, dev = report["model"], report["device"]
    lines = [f"# Offloaded decode at real size — {report['shape']} on {dev['device']}", "",
             f"**{report['notice']}.**", ""]
    reduced = report.get("reduced")
    lines += [f"Shape: {m['layers']} layers ({m['moe_layers']} MoE) x {m['experts_per_layer']} experts, top-{m['top_k']}; "
              f"one expert {_bytes(m['expert_bytes'])}, routed experts {_bytes(m['routed_expert_bytes'])}, "
              f"non-expert weights {_bytes(m['non_expert_bytes'])}, {_count(m['total_params'])} parameters (bfloat16)"
              + (f" — REDUCED: layers={reduced['layers']}, scale={reduced['scale']}" if reduced else ""), ""]
    quantize = report.get("settings", {}).get("quantize_experts")
    in_flight = report.get("settings", {}).get("copies_in_flight", COPIES_IN_FLIGHT)
    if in_flight != COPIES_IN_FLIGHT:
        lines += [f"**Demand copies in flight: up to {in_flight}** (the default is {COPIES_IN_FLIGHT})", ""]
    if quantize:
        lines += [f"**Experts {quantize}** (jaxmoe.expert_quant): one expert moves and occupies "
                  f"{_bytes(report.get('moved_expert_bytes', 0))} (codes + float32 scales); cache fractions count slots, "
                  "so a row uses that much less device memory than the unquantized run's row of the same fraction", ""]
    routing = report.get("routing")
    if routing:
        lines += [f"Routing: {routing.get('notice') or 'replayed from ' + routing['source']}"]
        st = routing["stats"]
        lines += [f"(consecutive-token reuse {st['consecutive_token_reuse']:.3f} vs {st['reuse_if_random']:.3f} if random; "
                  f"expert coverage per layer {st['expert_coverage_per_layer']:.2f}; busiest 10% of experts take "
                  f"{st['top10pct_expert_share']:.2f} of the load)"]
        lines += [f"Predictor (prefetch/presched/adaptive): {routing.get('predictor')}", ""]
    bw = report.get("bandwidth")
    if bw:
        lines += [f"H2D at expert size ({_bytes(bw['expert_bytes'])}): pinned_host {bw['pinned_host_gbps']:.2f} GB/s, "
                  f"pageable {bw['pageable_gbps']:.2f} GB/s (median of {bw['repeats']})"
                  + (f"; {bw['burst_copies']} pinned copies at once {bw['pinned_host_burst_gbps']:.2f} GB/s"
                     if "pinned_host_burst_gbps" in bw else "")]
    c = report.get("compute")
    if c:
        lines += [f"Compute floor (offloaded engine, all hits): {c['s_per_token'] * 1e3:.2f} ms/token = "
                  f"{c['decode_tokens_per_s']:.2f} tok/s" + (f" (whole-token steps {whole_token_cell(c)})" if "whole_token_fraction" in c else "")]
    res = report.get("resident")
    if res:
        lines += ["Resident (all weights on device): " + (res["skipped"] if "skipped" in res else
                  f"{res['decode_tokens_per_s']:.2f} tok/s, TTFT {res['ttft_s']:.3f} s")]
    peer = report.get("peer")
    if peer:
        lines += ["HF transformers + accelerate CPU offload: " + peer_summary(peer)]
    lines += ["", "| cache | policy | decode tok/s | of bound | TTFT s | stall frac | hit rate | prefetch prec | H2D GB/tok | peak dev GB | whole-token steps (redone) | host CPU ms/tok: loop, transfers |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['cache_fraction']:.0%} ({r['cache_slots']}) | {r['policy']} | {r['decode_tokens_per_s']:.2f} | "
                     f"{r['fraction_of_bound']:.2f} | {r['ttft_s']:.3f} | {r['stall_fraction']:.3f} | {r['hit_rate']:.3f} | "
                     f"{_fmt(r['prefetch_precision'], '.3f')} | {r['h2d_gb_per_token']:.4g} | {r['peak_device_bytes'] / 1e9:.4g} | "
                     f"{whole_token_cell(r)} | {host_cpu_cell(r)} |")
    if report["bounds"]:
        lines += ["", "Bound (Belady-minimal transfers, warm cache; pinned bandwidth; compute floor):", "",
                  "| cache | slots | min H2D GB/tok | limited by | bound tok/s | per-token bound tok/s |", "|---|---|---|---|---|---|"]
        for f, b in report["bounds"].items():
            lines.append(f"| {float(f):.0%} | {b['cache_slots']} | {b['belady_min_h2d_gb_per_token']:.4g} | {b['limited_by']} | "
                         f"{b['bound_tokens_per_s']:.2f} | {b['per_token_bound_tokens_per_s']:.2f} |")
    if report["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in report["notes"]]
    sw = report["software"]
    lines += ["", f"Device {dev['device']} ({dev['device_kind']}); jax {sw['jax']}, jaxlib {sw['jaxlib']}, flax {sw['flax']}, "
              f"python {sw['python']}; {report['when']}. Settings: " +
              ", ".join(f"{k}={v}" for k, v in report["settings"].items() if v is not None)]
    for p in report.get("plots", []):
        lines += ["", f"![{p}]({p})"]
    return "\n".join(lines) + "\n"


def make_plots(report: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    if not runs:
        return []
    shape = report["shape"]
    names = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy in dict.fromkeys(r["policy"] for r in runs):
        pts = [(r["cache_fraction"], r["decode_tokens_per_s"]) for r in runs if r["policy"] == policy]
        ax.plot(*zip(*pts), marker="o", label=policy)
    if report["bounds"]:
        pts = sorted((float(f), b["bound_tokens_per_s"]) for f, b in report["bounds"].items())
        ax.plot(*zip(*pts), "k--", marker="x", label="bound (Belady, overlap)")
    res = report.get("resident") or {}
    if "decode_tokens_per_s" in res:
        ax.axhline(res["decode_tokens_per_s"], color="gray", linestyle=":", label="resident")
    peer = report.get("peer") or {}
    if "decode_tokens_per_s" in peer:
        ax.plot([peer["cache_fraction"]], [peer["decode_tokens_per_s"]], "r^", label="HF accelerate offload")
    ax.set_xlabel("expert cache (fraction of all experts)")
    ax.set_ylabel("decode tokens/s")
    ax.set_yscale("log")
    ax.set_title(f"{shape} — SYNTHETIC WEIGHTS, replayed routing\n{report['device']['device']}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    name = f"{report_stem(report)}-tokps.png"
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    names.append(name)

    compute_s = (report.get("compute") or {}).get("s_per_token")
    fig, ax = plt.subplots(figsize=(max(7, 0.35 * len(runs)), 4.5))
    labels, comp, stall, other = [], [], [], []
    for r in runs:
        per_token = 1.0 / r["decode_tokens_per_s"]
        s = r["stall_fraction"] * per_token
        c = min(compute_s or 0.0, per_token - s)
        labels.append(f"{r['cache_fraction']:.0%} {r['policy']}")
        comp.append(c * 1e3)
        stall.append(s * 1e3)
        other.append(max(0.0, per_token - s - c) * 1e3)
    x = np.arange(len(runs))
    ax.bar(x, comp, label="compute floor")
    ax.bar(x, stall, bottom=comp, label="stall (waiting for experts)")
    ax.bar(x, other, bottom=np.add(comp, stall), label="other (dispatch, planning, contention)")
    ax.set_xticks(x, labels, rotation=70, fontsize=7)
    ax.set_ylabel("ms per decode token")
    ax.set_title(f"{shape} — stall breakdown — SYNTHETIC WEIGHTS", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    name = f"{report_stem(report)}-stall.png"
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    names.append(name)
    return names


# ----------------------------------------------------------------------------------------------
# command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.sizes", description=__doc__.split("\n")[0])
    p.add_argument("--shape", default=None, help=f"{'|'.join(SHAPE_NAMES)}|all")
    p.add_argument("--cache", default=DEFAULT_CACHE, help="cache sizes as fractions of all experts")
    p.add_argument("--policies", default=",".join(DEFAULT_POLICIES))
    p.add_argument("--predictor", default="replay-lookahead",
                   help="for prefetch/presched/adaptive: replay-lookahead (default: the replayed future routing "
                        "degraded to the default model's measured gate-lookahead recall), previous-token, frequency, "
                        "gate-lookahead (reads the random routers: meaningless with synthetic weights)")
    p.add_argument("--trace", default="auto", help="auto (traces/default, else bench/routing/default.npz, else "
                   "synthetic), none (synthetic routing), a trace DIR or a routing .npz")
    p.add_argument("--tokens", type=int, default=32, help="tokens generated per prompt (decode steps: tokens-1)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--prompts", type=int, default=1, help="measured prompts per pass (plus one warm-up prompt)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    p.add_argument("--scale", type=float, default=1.0, help="shrink widths (CPU smoke runs); 1 = real size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bandwidth-repeats", type=int, default=10)
    p.add_argument("--peer", default="auto", choices=("auto", "hf", "none", "only"),
                   help="HF accelerate offload peer: auto (where torch+accelerate+CUDA exist), hf (required), none, "
                        "only (just the peer: writes sizes-SHAPE-peer.json)")
    p.add_argument("--peer-result", type=Path, default=None, help="a sizes-SHAPE-peer.json to include instead of running the peer")
    p.add_argument("--peer-cache", type=float, default=0.5, help="peer's GPU budget: non-expert weights + this fraction of the experts")
    p.add_argument("--peer-tokens", type=int, default=8)
    p.add_argument("--peer-timeout", type=float, default=420)
    p.add_argument("--speculate", choices=SPECULATION_MODES, default="auto",
                   help="decode steps as one program when their experts are cached (scheduler.speculation)")
    p.add_argument("--quantize-experts", choices=QUANTIZE_MODES, default=None,
                   help="int8 / int4 / mxfp4: routed experts moved and cached as codes + scales (writes sizes-SHAPE-int8.*; "
                        "the resident baseline stays unquantized: dequantized weights compute alike)")
    p.add_argument("--copies-in-flight", type=int, default=COPIES_IN_FLIGHT,
                   help=f"demand expert copies the transfer thread keeps issued at most "
                        f"(prefetches: {COPIES_IN_FLIGHT})")
    p.add_argument("--skip-resident", action="store_true")
    p.add_argument("--time-budget", type=float, default=None, help="seconds: start no new run after this (per shape)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--plot-only", type=Path, default=None, help="re-draw Markdown + plots from a result JSON")
    p.add_argument("--save-routing", type=Path, default=None, help="write the --trace routing as a compact .npz and exit")
    p.add_argument("--hf-peer-worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(run, args)


def run(args) -> int:
    if args.hf_peer_worker is not None:
        result = hf_peer_worker(json.loads(args.hf_peer_worker))
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return 0
    if args.plot_only is not None:
        report = json.loads(args.plot_only.read_text())
        if args.peer_result is not None:
            report["peer"] = {**json.loads(args.peer_result.read_text()), "from": str(args.peer_result)}
        write_outputs(report, args.out or args.plot_only.parent, plots=True)
        return 0
    if args.save_routing is not None:
        from bench.synthetic import save_routing

        from bench.synthetic import lookahead_recall

        source, path = resolve_trace(args.trace)
        if source is None:
            raise JaxmoeError("--save-routing needs a trace (--trace DIR)")
        recall, recall_from = lookahead_recall(path)
        print(save_routing(source, args.save_routing, lookahead_recall=list(recall), lookahead_recall_from=recall_from))
        return 0
    if args.shape is None:
        raise JaxmoeError(f"--shape is required: {', '.join(SHAPE_NAMES)} or all")
    shapes = list(SHAPE_NAMES) if args.shape == "all" else [s for s in args.shape.split(",") if s]
    for s in shapes:
        hf_config_dict(s, args.layers, args.scale)  # validates name, --layers, --scale
    unknown = [x for x in args.policies.split(",") if x and x not in DEFAULT_POLICIES]
    if unknown:
        raise JaxmoeError(f"--policies: unknown {unknown}; available: {', '.join(DEFAULT_POLICIES)}")
    parse_fractions(args.cache)
    if args.tokens < 2 or args.prompts < 1 or args.repeats < 1 or args.prompt_tokens < 1:
        raise JaxmoeError("--tokens must be >= 2, --prompts, --repeats and --prompt-tokens >= 1")
    source, trace_path = resolve_trace(args.trace)

    # the peers first, each in its own process, before JAX initialises the accelerator in this one
    peers = {}
    why_not = peer_availability() if args.peer != "none" else "skipped: --peer none"
    if why_not is not None and args.peer in ("hf", "only"):
        raise JaxmoeError(f"--peer {args.peer}: {why_not}")
    for s in shapes:
        if args.peer_result is not None:
            peers[s] = {**json.loads(args.peer_result.read_text()), "from": str(args.peer_result)}
            continue
        if why_not is not None:
            peers[s] = {"skipped": why_not}
            continue
        # nothing here may initialise JAX's GPU backend (it would take the memory the peer needs)
        spec = {"shape": s, "layers": args.layers, "scale": args.scale, "tokens": args.peer_tokens,
                "prompt_tokens": args.prompt_tokens, "cache_fraction": args.peer_cache}
        print(f"[{s}] HF accelerate peer ...", file=sys.stderr, flush=True)
        peers[s] = run_peer(spec, args.peer_timeout)
        print(f"[{s}] HF peer: {peers[s].get('decode_tokens_per_s', peers[s].get('skipped'))}", file=sys.stderr, flush=True)

    if args.peer == "only":
        out_dir = args.out or REPO / "bench" / "results" / "peer"
        out_dir.mkdir(parents=True, exist_ok=True)
        for s in shapes:
            (out_dir / f"sizes-{s}-peer.json").write_text(json.dumps({"shape": s, **peers[s]}, indent=2) + "\n")
        return 0
    # before JAX initialises a GPU backend: most of the device for the slots, and a pinned-host pool big
    # enough for the real-size experts (the default 64 GB pool cannot hold Mixtral-8x7B's 90 GB)
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    os.environ.setdefault("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", str(pinned_host_limit_gb()))
    out_dir = args.out or REPO / "bench" / "results" / device_name()
    for s in shapes:
        report = run_shape(s, args, source, trace_path, peers[s], Budget(args.time_budget), out_dir)
        print(markdown(report))
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
