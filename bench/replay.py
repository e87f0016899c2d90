"""Scheduling quality in virtual time: one recorded run replayed through every policy, without noise.

    python -m bench replay [--model DIR] [--predictor SPEC] [--cache 0.1,0.25,0.5] [--policies ...]
                           [--link-ratio 1.0] [--prompts N] [--prompt-tokens N] [--max-new-tokens N] [--out DIR]
                           [--name replay]

The run is recorded once (every MoE layer's routing and the predictor's scores, which depend on the
model's computation, not on the cache), then each (policy, cache size) replays it against a simulated
cache and link on a virtual clock: every MoE layer computes for T_c, every expert transfer takes
T_x = link_ratio * T_c, one transfer at a time, demand transfers ahead of prefetches. The planners and
eviction policies are the runtime's own objects (`scheduler.planners`, `scheduler.eviction`); the
cache follows `scheduler.expert_cache.ExpertCache`'s rules (pinned running layer, protected plan,
slots claimed when a transfer starts, stale prefetches dropped). Host overhead is not modelled: this
measures what each policy's decisions cost in stall, the live benchmark (`python -m bench policies`)
measures the rest. Decode speed is reported relative to a stall-free run (1.0 = never waiting).
Prefill is replayed to warm the cache (every policy the same way, no timing).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from tqdm import tqdm

import jaxmoe
from jaxmoe.errors import JaxmoeError, run_cli
from jaxmoe.offload import make_eviction, make_planner
from scheduler.eviction import Belady
from scheduler.planners import MAX_HORIZON, NoPrefetch, OraclePlanner, PlanContext
from scheduler.slot_table import SlotTable

DEFAULT_POLICIES = ("on-demand", "lfu", "prefetch", "presched", "adaptive", "oracle")


@dataclass
class Recording:
    """One generation, MoE layer by MoE layer (prefill layers first)."""

    layer_of_pos: tuple[int, ...]
    num_layers: int
    num_experts: int
    top_k: int
    positions: list[int] = field(default_factory=list)
    decoding: list[bool] = field(default_factory=list)
    ids: list[np.ndarray] = field(default_factory=list)  # int32[N, k]: N tokens (1 in decode)
    scores: list[np.ndarray | None] = field(default_factory=list)  # float32[H, E] after the layer, or None

    def observe(self, pos, decoding, ids, scores) -> None:
        self.positions.append(int(pos))
        self.decoding.append(bool(decoding))
        self.ids.append(np.asarray(ids, np.int32))
        self.scores.append(None if scores is None else np.asarray(scores, np.float32))


def record(model_dir, predictor: str | None, prompts: list[list[int]], max_new_tokens: int) -> list[Recording]:
    """Runs each prompt once with every expert cached and the predictor attached -> one Recording each.
    The predictor is asked for MAX_HORIZON layers (the engine asks for its planner's horizon), so every
    planner replays with the scores it would get live (prefetch: 2 layers, adaptive: up to 4)."""
    # the predictor's numpy implementation on the host, wherever the engine would run it: the recorded
    # scores do not depend on the device or on the fused program's float rounding
    engine = jaxmoe.load(model_dir, policy="presched", predictor=predictor, cache_slots=10**9, fuse_predictor=False)
    engine.planner.horizon = MAX_HORIZON  # every expert is cached: the plan itself changes nothing
    cfg = engine.cfg
    out = []
    for prompt in tqdm(prompts, desc="recording", unit="prompt"):
        rec = Recording(tuple(cfg.moe_layer_ids), cfg.num_layers, cfg.num_experts, cfg.num_experts_per_tok)
        engine.layer_observer = rec.observe
        engine.generate(prompt, max_new_tokens)
        out.append(rec)
    engine.layer_observer = None
    return out


class VirtualCache:
    """The expert cache and its link on a virtual clock (`ExpertCache`'s rules, no threads)."""

    def __init__(self, num_slots: int, eviction, key_shape, transfer_s: float):
        self.table = SlotTable(num_slots, key_shape)
        self.policy, self.transfer_s = eviction, transfer_s
        self.link_free = 0.0  # when the transfer in progress (if any) lands
        self.in_flight: tuple | None = None  # (key, slot, lands_at, is_prefetch)
        self.demand: deque = deque()  # (key, slot)
        self.pending: deque = deque()  # prefetch keys
        self.pending_since = 0.0
        self.protect: frozenset = frozenset()
        self.prefetched_unused: set = set()
        self.hits = self.late_hits = self.misses = self.transfers = self.prefetches = self.prefetch_hits = 0
        self.wasted = 0

    def _claim(self, key, protect) -> int | None:
        slot = self.table.first_free()
        if slot is None:
            candidates = self.table.candidates(protect, busy=[self.in_flight[1]] if self.in_flight else ())
            if not len(candidates):
                return None
            slot = int(self.policy.victim(self.table, candidates))
        evicted = self.table.assign(key, slot)
        if evicted in self.prefetched_unused:
            self.prefetched_unused.discard(evicted)
            self.wasted += 1
        return slot

    def advance(self, until: float) -> None:
        """Runs the link up to virtual time `until`: lands what is due, starts what may start."""
        while True:
            if self.in_flight is not None:
                key, slot, lands, is_prefetch = self.in_flight
                if lands > until:
                    return
                self.in_flight = None
                self.link_free = lands
                self.transfers += 1
                if is_prefetch:
                    self.prefetches += 1
                    if not self.table.pinned_mask[slot]:
                        self.prefetched_unused.add(key)
            if self.demand:
                key, slot, since = self.demand[0]
                start = max(self.link_free, since)
                if start > until:
                    return
                self.demand.popleft()
                self.in_flight = (key, slot, start + self.transfer_s, False)
                continue
            start = max(self.link_free, self.pending_since)
            if not self.pending or start > until:
                return
            while self.pending and self.in_flight is None:
                key = self.pending.popleft()
                if self.table.lookup(key) is None:
                    slot = self._claim(key, self.protect)  # None: no slot can be freed, the prefetch is dropped
                    if slot is not None:
                        self.in_flight = (key, slot, start + self.transfer_s, True)
            if self.in_flight is None:
                return

    def ensure(self, keys, now: float) -> float:
        """The running layer requests `keys` at `now` -> when they have all landed."""
        self.advance(now)
        self.table.unpin_all()
        wanted = set(keys)
        ready = now
        busy = self.in_flight[1] if self.in_flight else None
        missing = []
        for key in keys:
            slot = self.table.lookup(key)
            if slot is None:
                missing.append(key)
                continue
            self.table.pin(slot)
            if slot == busy:
                self.late_hits += 1
                ready = max(ready, self.in_flight[2])
            else:
                self.hits += 1
            if key in self.prefetched_unused or slot == busy:
                self.prefetch_hits += 1
                self.prefetched_unused.discard(key)
        self.pending = deque(k for k in self.pending if k not in wanted)
        for key in missing:
            slot = self._claim(key, wanted | self.protect)
            if slot is None:
                slot = self._claim(key, wanted)
            if slot is None:  # only the slot in flight is left: wait for it to land
                self.advance(self.in_flight[2])
                slot = self._claim(key, wanted)
            self.table.pin(slot)
            self.demand.append((key, slot, now))
            self.misses += 1
        if missing:  # demand transfers follow the one in flight, back to back
            start = self.in_flight[2] if self.in_flight else max(self.link_free, now)
            ready = max(ready, start + len(missing) * self.transfer_s)
            self.advance(ready)
        for key in keys:
            self.policy.touch(key)
        return ready

    def warm(self, keys) -> None:
        """Prefill: loads `keys` with no timing (the link is idle afterwards)."""
        self.table.unpin_all()
        wanted = set(keys)
        for key in keys:
            slot = self.table.lookup(key)
            if slot is None:
                slot = self._claim(key, wanted)
            self.table.pin(slot)
            self.policy.touch(key)

    def prefetch(self, keys, protect, now: float) -> None:
        self.advance(now)
        self.pending = deque(k for k in dict.fromkeys(keys) if self.table.lookup(k) is None)
        self.pending_since = now
        self.protect = frozenset(protect) | frozenset(self.pending)


def replay(recordings: list[Recording], policy: str, num_slots: int, compute_s: float, transfer_s: float,
           planner=None, eviction=None) -> dict:
    """Every recording in turn through one cache (as the live benchmark reuses one engine) -> figures.
    `planner` / `eviction` replace the policy's own (for experiments)."""
    rec0 = recordings[0]
    num_pos = len(rec0.layer_of_pos)

    cfg = SimpleNamespace(moe_layer_ids=rec0.layer_of_pos, num_experts=rec0.num_experts, num_experts_per_tok=rec0.top_k)
    if policy == "oracle":
        future = [{(rec.layer_of_pos[p], int(e)) for e in np.unique(ids)}
                  for rec in recordings for p, ids in zip(rec.positions, rec.ids)]
        planner, eviction = OraclePlanner(future), Belady(future)
    else:
        planner = planner or make_planner(policy)
        eviction = eviction or make_eviction(policy, cfg)
    cache = VirtualCache(num_slots, eviction, (rec0.num_layers, rec0.num_experts), transfer_s)
    now = stall = 0.0
    step = decode_layers = 0
    first_decode_stats = None
    for rec in recordings:
        for pos, decoding, ids, scores in zip(rec.positions, rec.decoding, rec.ids, rec.scores):
            layer = rec.layer_of_pos[pos]
            needed = np.unique(ids)
            keys = [(layer, int(e)) for e in needed]
            eviction.at_step(pos, step)
            if decoding:
                if first_decode_stats is None:
                    first_decode_stats = (cache.hits, cache.late_hits, cache.misses, cache.transfers, cache.prefetches,
                                          cache.prefetch_hits, cache.wasted)
                ready = cache.ensure(keys, now)
                stall += ready - now
                now = ready
                decode_layers += 1
            else:
                for start in range(0, len(keys), num_slots):
                    cache.warm(keys[start : start + num_slots])
            step += 1
            planner.feedback(pos, needed)
            if decoding and not isinstance(planner, NoPrefetch) and (scores is not None or isinstance(planner, OraclePlanner)):
                ctx = PlanContext(step=step - 1, pos=pos, num_positions=num_pos, layer_of_pos=rec.layer_of_pos,
                                  top_k=rec.top_k, num_slots=num_slots,
                                  scores=None if scores is None else scores[: planner.horizon],
                                  resident=cache.table.resident[[rec.layer_of_pos[q] for q in PlanContext.ahead(pos, num_pos, planner.horizon)]],
                                  transfer_s=transfer_s,
                                  layer_compute_s=compute_s)
                keys_, protect = planner.plan(ctx)
                cache.prefetch(keys_, protect, now)
            eviction.set_predictions(planner.use_probability)
            eviction.observe(pos, np.bincount(ids.reshape(-1), minlength=rec.num_experts) / max(len(ids), 1), max(len(ids), 1))
            if decoding:
                now += compute_s
        cache.advance(now)
        cache.pending.clear()
    base = first_decode_stats or (0,) * 7
    hits, late, misses, transfers, prefetches, pf_hits, wasted = (
        v - b for v, b in zip((cache.hits, cache.late_hits, cache.misses, cache.transfers, cache.prefetches,
                               cache.prefetch_hits, cache.wasted), base))
    requests = hits + late + misses
    tokens = decode_layers / num_pos
    busy = decode_layers * compute_s
    return {
        "policy": policy, "cache_slots": num_slots,
        "speed_vs_stall_free": busy / (busy + stall) if busy else 1.0,
        "stall_per_token_layers": stall / compute_s / tokens if tokens else 0.0,
        "hit_rate": hits / requests if requests else 1.0,
        "late_hit_rate": late / requests if requests else 0.0,
        "transfers_per_token": transfers / tokens if tokens else 0.0,
        "prefetch_precision": pf_hits / prefetches if prefetches else None,
        "wasted_prefetches_per_token": wasted / tokens if tokens else 0.0,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench replay", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None, help="converted model (default: the embedded default model)")
    p.add_argument("--predictor", default=None, help="predictor for prefetch/presched/adaptive (default gate-lookahead)")
    p.add_argument("--cache", default="0.1,0.25,0.5", help="cache sizes as fractions of all experts")
    p.add_argument("--policies", default=",".join(DEFAULT_POLICIES))
    p.add_argument("--link-ratio", type=float, default=1.0, help="T_x / T_c: one expert transfer over one MoE layer's compute")
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=None, help="directory for NAME.json and NAME.md (default: print only)")
    p.add_argument("--name", default="replay")
    args = p.parse_args(argv)
    return run_cli(run, args)


def run(args) -> int:
    from bench.policies import add_ratios, make_prompts, resolve_model_and_policies, save_report

    policies = resolve_model_and_policies(args)
    if args.link_ratio <= 0:
        raise JaxmoeError(f"--link-ratio {args.link_ratio}: must be > 0")
    fractions = [float(x) for x in args.cache.split(",")]
    probe = jaxmoe.load(args.model, cache_slots=1_000_000, policy="on-demand")
    prompts = make_prompts(probe, args.prompts, args.prompt_tokens)[1:]
    del probe
    recordings = record(args.model, args.predictor, prompts, args.max_new_tokens)
    rec0 = recordings[0]
    total = rec0.num_experts * len(rec0.layer_of_pos)
    rows = []
    for fraction in fractions:
        slots = max(rec0.top_k, int(round(fraction * total)))
        for policy in policies:
            r = replay(recordings, policy, slots, 1.0, args.link_ratio)
            r["cache_fraction"] = fraction
            rows.append(r)
    add_ratios(rows, "speed_vs_stall_free")
    report = {"model": str(args.model), "predictor": args.predictor or "gate-lookahead", "link_ratio": args.link_ratio,
              "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "runs": rows,
              "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    table = markdown_table(report)
    print(table)
    if args.out is not None:
        save_report(report, table, args.out, args.name)
    return 0


def markdown_table(report: dict) -> str:
    fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
    lines = [f"# Policy replay in virtual time — {report['model']}", "",
             f"Predictor {report['predictor']}; T_x = {report['link_ratio']:g} x T_c; {report['prompts']} prompts x "
             f"{report['max_new_tokens']} tokens. Speed relative to a stall-free run (host overhead not modelled).", "",
             "| cache | policy | speed | x on-demand | x oracle | hit rate | late hits | stall (layers/token) | transfers/token | prefetch prec | wasted/token |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['cache_fraction']:.0%} ({r['cache_slots']}) | {r['policy']} | {r['speed_vs_stall_free']:.3f} | "
                     f"{fmt(r['vs_on_demand'], '.2f')} | {fmt(r['vs_oracle'], '.2f')} | {r['hit_rate']:.3f} | "
                     f"{r['late_hit_rate']:.3f} | {r['stall_per_token_layers']:.2f} | {r['transfers_per_token']:.2f} | "
                     f"{fmt(r['prefetch_precision'], '.3f')} | {r['wasted_prefetches_per_token']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
