"""Offloaded inference: routed experts in host memory, a fixed pool of device expert slots.

Per MoE layer and step:  attention + router on device (`moe_front`) -> top-k ids to the host (the only
device-to-host transfer) -> `ExpertCache.ensure` loads missing experts into slots -> routed experts
over the slot buffers (`routed_over_slots`) -> shared expert + residual (`moe_back`). Hidden states
and the KV cache never leave the device. All jitted functions take slot buffers and slot ids as
arguments with static shapes, so one compilation serves every layer, routing and step.

Loading an expert: an asynchronous `jax.device_put` of its packed host array (`pack_expert`: its three
weights, or their int8 / int4 / mxfp4 codes and scales with `quantize_experts`, see jaxmoe.expert_quant), then an
in-place (donated) write into the slot buffers; the on-demand baseline blocks until it has landed.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxmoe.checkpoint import abstract_model, restore_layer_experts, restore_piece, split_layer, with_sharding
from jaxmoe.config import ModelConfig, load_config
from jaxmoe.engine import SamplingParams, compile_seconds, device_peak_bytes, flat_state, generate_loop, position_array, tree_bytes
from jaxmoe.errors import JaxmoeError
from jaxmoe.expert_quant import QuantizedStack, check_quantize, quantize, quantized_shapes, scale_dtype
from jaxmoe.inplace import update_row
from jaxmoe.model import ATTENTION_MODULES, lm_logits
from jaxmoe.moe import (
    EXPERT_NAMES, GATHER_MAX_TOKENS, ExpertFFN, ExpertWeight, expert_shapes, experts_bucketed, plan_buckets, routed_experts,
    slot_bias,
)
from predictors.base import FrequencyPredictor, GateLookaheadPredictor, PreviousTokenPredictor
from scheduler.eviction import LFU, LRU, Belady, ExpectedReuse
from scheduler.expert_cache import COPIES_IN_FLIGHT, ExpertCache
from scheduler.link import EmulatedLink
from scheduler.planners import Adaptive, NoPrefetch, OraclePlanner, PlanContext, PreSched, TopKPrefetch
from scheduler.speculation import MODES as SPECULATION_MODES, Speculation, redo_fraction

PREFILL_CHUNK = 256  # tokens per prefill chunk
PACK_THREADS = min(8, os.cpu_count() or 1)  # experts packed (and quantized) at once while loading
PROGRESS_MIN_BYTES = 2**30  # loading more routed-expert bytes than this shows a progress bar
DEVICE_MARGIN = 0.10  # fraction of device memory left free when sizing the cache automatically
NOT_PLANNED = object()  # a layer whose next transfers are planned after its dispatch (see `_route`)
_WHOLE_TOKEN_RAN: set = set()  # `OffloadEngine._whole_token_key`s whose whole-token program this process ran


# ----------------------------------------------------------------------------------------------
# jitted pieces (graphdef static: equal for every MoE layer, so each compiles once per shape)

@partial(jax.jit, static_argnames=("graphdef", "scorer"), donate_argnames=("cache",))
def moe_front(graphdef, state, h, cache, positions, scorer=None, scorer_params=None, scorer_state=None, pos=None,
              last_row=None):
    """h: [B, T, d] -> (h after attention, cache, ffn input [B*T, d], expert ids int32[B*T, k],
    weights f32[B*T, k], features, scorer_state).

    features: all a decode step with a predictor copies to the host. Without a fused predictor,
    f32[k + d + E]: the last token's expert ids, hidden state and router logits (a host predictor's
    inputs). With one (`scorer`, see predictors.fused; pos: this layer's MoE position, last_row: the
    row of the last real token in `flat`), f32[k + H*E]: that token's expert ids and the predictor's
    scores for the next H MoE positions, computed here from the same hidden state and router logits;
    `scorer_state` (the predictor's memory, e.g. routing history) is returned updated."""
    layer = graphdef.merge(state)
    h, cache, x = layer.attention_block(h, cache, positions)
    flat = x.reshape(-1, x.shape[-1])
    ids, weights, logits = layer.moe.route(flat)
    if scorer is None:
        # the last token's routing, hidden state and router logits packed in one vector: a decode step
        # with a host predictor copies just this to the host
        features = jnp.concatenate([ids[-1].astype(jnp.float32), h[0, -1].astype(jnp.float32), logits[-1]])
        return h, cache, flat, ids, weights, features, scorer_state
    hidden = h.reshape(-1, h.shape[-1])[last_row]
    scores, scorer_state = scorer(scorer_params, scorer_state, pos, hidden, logits[last_row], ids[last_row])
    features = jnp.concatenate([ids[last_row].astype(jnp.float32), scores.reshape(-1).astype(jnp.float32)])
    return h, cache, flat, ids, weights, features, scorer_state


@partial(jax.jit, static_argnames=("kernel", "ffn"))
def routed_over_slots(flat, slot_ids, weights, slots, kernel, ffn: ExpertFFN):
    """flat: [N, d]; slot_ids: int32[N, k], -1 where the expert is not in this group (weight dropped);
    weights: f32[N, k]; slots: {w_*: [S, ...], and b_* where the experts have biases} -> float32[N, d],
    rounded by `moe_back` only after the expert groups of one layer are added up (the sum cannot depend on
    how many slots there are). kernel: "gather" (few tokens), or ("bucketed", num_groups, rows_per_group)
    from `plan_buckets`; ffn: the experts' function (`MoEBlock.ffn`)."""
    if isinstance(kernel, tuple):
        _, num_groups, rows_per_group = kernel
        return experts_bucketed(flat, slot_ids, weights, slots["w_gate"], slots["w_up"], slots["w_down"],
                                num_groups, rows_per_group, out_dtype=jnp.float32, ffn=ffn, bias=slot_bias(slots))
    in_group = slot_ids >= 0
    weights = jnp.where(in_group, weights, 0.0)
    slot_ids = jnp.where(in_group, slot_ids, 0)  # any valid slot: its contribution is weighted by 0
    return routed_experts(flat, slot_ids, weights, slots["w_gate"], slots["w_up"], slots["w_down"], kernel,
                          out_dtype=jnp.float32, ffn=ffn, bias=slot_bias(slots))


@partial(jax.jit, static_argnames=("graphdef",))
def moe_back(graphdef, state, h, flat, routed):
    """h + routed (float32[N, d], `routed_over_slots`) + shared expert(flat) -> [B, T, d]."""
    layer = graphdef.merge(state)
    return h + (routed.astype(h.dtype) + layer.moe.shared_output(flat)).reshape(h.shape)


@partial(jax.jit, static_argnames=("graphdef", "kernel", "next_graphdef", "scorer"), donate_argnames=("next_cache",))
def moe_back_front(graphdef, state, h, flat, slot_ids, weights, slots, routed_partial, kernel,
                   next_graphdef, next_state, next_cache, positions, scorer=None, scorer_params=None,
                   scorer_state=None, next_pos=None, last_row=None):
    """One dispatch per MoE layer in steady state: this layer's routed experts over the slots (plus
    `routed_partial` [N, d] from earlier expert groups, or None), its shared expert and residual, then
    the next MoE layer's attention and router. Returns what `moe_front` returns for the next layer."""
    routed = routed_over_slots.__wrapped__(flat, slot_ids, weights, slots, kernel, graphdef.merge(state).moe.ffn)
    if routed_partial is not None:
        routed = routed + routed_partial
    h = moe_back.__wrapped__(graphdef, state, h, flat, routed)
    return moe_front.__wrapped__(next_graphdef, next_state, h, next_cache, positions, scorer, scorer_params,
                                 scorer_state, next_pos, last_row)


@partial(jax.jit, static_argnames=("graph", "scorer"))
def moe_layer_over_slots(graph, state, h, cache, positions, slot_row, slots, forced_row=None, pos=None, scorer=None,
                         scorer_params=None, scorer_state=None):
    """One decode MoE layer of `decode_token_over_slots` (a jitted piece, so tracing the token's program
    traces one MoE layer, not each). slot_row int32[E]: each expert's slot, -1 if absent; forced_row
    int32[k] or None; pos: int32[] the MoE position (for the scorer) -> (h, cache, ids int32[k],
    missing bool[], features as `moe_front` packs them, scorer_state)."""
    layer = graph.merge(state)
    h, cache, x = layer.attention_block(h, cache, positions)
    flat = x.reshape(-1, x.shape[-1])
    ids, weights, logits = layer.moe.route(flat)
    if forced_row is not None:
        ids = forced_row[None]
    slot_ids = slot_row[ids]  # [1, k]
    if scorer is None:
        features = jnp.concatenate([ids[-1].astype(jnp.float32), h[0, -1].astype(jnp.float32), logits[-1]])
    else:
        scores, scorer_state = scorer(scorer_params, scorer_state, pos, h[0, -1], logits[-1], ids[-1])
        features = jnp.concatenate([ids[-1].astype(jnp.float32), scores.reshape(-1).astype(jnp.float32)])
    routed = routed_over_slots.__wrapped__(flat, slot_ids, weights, slots, "gather", layer.moe.ffn)
    h = moe_back.__wrapped__(graph, state, h, flat, routed)
    return h, cache, ids[0], jnp.any(slot_ids < 0), features, scorer_state


@partial(jax.jit, static_argnames=("graphs", "norm_graph", "scorer", "recurrent_layers"), donate_argnames=("kv",))
def decode_token_over_slots(graphs, states, kv, embedding, norm_graph, norm_state, head, token, positions, slot_table,
                            slots, forced_ids=None, scorer=None, scorer_params=None, scorer_state=None,
                            recurrent_layers=()):
    """One whole decode step in one program, every routed expert read from the slot buffers as
    `slot_table` says (see scheduler.speculation).

    graphs: per layer (is_moe, StaticGraph); states: per layer its flat state leaves; kv: per layer its
    cache (donated); token int32[1]; positions int32[1, 1]; slot_table int32[P, E]: the slot of each
    (MoE position, expert), -1 where not resident; forced_ids int32[P, k] or None: the routing to use
    instead of the routers' top-k (benchmarks' replayed routing); scorer: a fused predictor, whose state
    is updated at every MoE position and whose scores at the last one are returned.

    -> (logits float32[1, V], kv, summary float32[P*k + P + F], h_in [P, 1, 1, d], scorer_state):
    summary holds each MoE position's expert ids (row-major), whether any of them was missing from the
    table (1.0) and the last position's features as `moe_front` packs them (F values); h_in is the
    hidden state entering each MoE layer, from which the layer path redoes a token after a miss. The
    scorer state keeps the rows of positions before the first miss only (each row is written by its own
    position), so a redo starts from what the layer path would have had.

    recurrent_layers: per layer, whether its cache is a running state (`recurrent_cache`, Gated DeltaNet)
    rather than KV rows, () for none. The layer path redoes every layer from the first missed MoE layer on;
    rewriting KV rows at the same position is harmless, but a state stepped twice is wrong, so those layers'
    states come back as they were before this token (the step is discarded with the rest of their work)."""
    h = jnp.take(embedding, token[:, None], axis=0)
    kv_before = kv
    kv = list(kv)
    ids_all, missing_all, h_in = [], [], []
    new_scorer_state = scorer_state
    features = None
    for i, ((is_moe, graph), state) in enumerate(zip(graphs, states)):
        if not is_moe:
            h, kv[i] = dense_layer(graph, state, h, kv[i], positions)
            continue
        pos = len(ids_all)
        h_in.append(h)
        h, kv[i], ids, missing, features, new_scorer_state = moe_layer_over_slots(
            graph, state, h, kv[i], positions, slot_table[pos], slots, None if forced_ids is None else forced_ids[pos],
            jnp.asarray(pos, jnp.int32), scorer, scorer_params, new_scorer_state)
        ids_all.append(ids)
        missing_all.append(missing)
    logits = final_logits.__wrapped__(norm_graph, norm_state, head, h)
    missing = jnp.stack(missing_all)
    if scorer is not None:  # rows at and after the first miss: as they were
        first_miss = jnp.argmax(jnp.concatenate([missing, jnp.ones(1, bool)]))
        keep = lambda new, old: jnp.where(  # noqa: E731
            (jnp.arange(new.shape[0]) < first_miss).reshape(-1, *([1] * (new.ndim - 1))), new, old)
        new_scorer_state = jax.tree.map(keep, new_scorer_state, scorer_state)
    if any(recurrent_layers):
        kv = keep_states_of_redone_layers(graphs, recurrent_layers, missing, kv, kv_before)
    summary = jnp.concatenate([jnp.stack(ids_all).reshape(-1).astype(jnp.float32), missing.astype(jnp.float32), features])
    return logits, kv, summary, jnp.stack(h_in), new_scorer_state


def keep_states_of_redone_layers(graphs, recurrent_layers, missing, kv, kv_before):
    """Inside `decode_token_over_slots`: the caches of recurrent layers at or after the first missed MoE layer
    (those the layer path redoes) as they were before the token; every other layer's as computed.
    missing: bool[P] per MoE position; kv, kv_before: per layer its cache."""
    moe_layers = jnp.asarray([i for i, (is_moe, _) in enumerate(graphs) if is_moe] + [len(graphs)], jnp.int32)
    first_redone = moe_layers[jnp.argmax(jnp.concatenate([missing, jnp.ones(1, bool)]))]  # len(graphs): none
    kv = list(kv)
    for i, recurrent in enumerate(recurrent_layers):
        if recurrent:
            kv[i] = jax.tree.map(lambda new, old, i=i: jnp.where(i < first_redone, new, old), kv[i], kv_before[i])
    return kv


@partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def dense_layer(graphdef, state, h, cache, positions):
    layer = graphdef.merge(state)
    h, cache, _ = layer(h, cache, positions)
    return h, cache


@jax.jit
def embed_tokens(embedding, tokens):
    """tokens: int32[B, T], or int32[B] for one decode step -> [B, T, d]."""
    if tokens.ndim == 1:
        tokens = tokens[:, None]
    return jnp.take(embedding, tokens, axis=0)


@partial(jax.jit, static_argnames=("graphdef",))
def final_logits(graphdef, state, head, h):
    """h: [B, d] or [B, T, d] (the last position is used) -> float32[B, V]."""
    if h.ndim == 3:
        h = h[:, -1]
    return lm_logits(graphdef.merge(state), head, h)


def pack_expert(weights: dict, dtype, quantize_mode: str | None = None) -> np.ndarray:
    """{w_gate [d, f], w_up [d, f], w_down [f, d], and b_gate [f], b_up [f], b_down [d] where the model has them}
    -> one flat array, so moving an expert is one host-to-device copy instead of three or six (about half the
    per-copy cost). quantize_mode None: [3*d*f (+ 2*f + d)] of `dtype` (EXPERT_NAMES order); "int8" / "int4":
    uint8 bytes, per weight matrix its codes then its scales (`expert_quant.quantize`), per bias its
    `dtype` bytes."""
    names = [n for n in EXPERT_NAMES if n in weights]
    if quantize_mode is None:
        return np.concatenate([np.asarray(weights[n]).astype(dtype).reshape(-1) for n in names])
    parts = []
    for n in names:
        if n.startswith("b_"):
            parts.append(np.ascontiguousarray(np.asarray(weights[n]).astype(dtype).reshape(-1)).view(np.uint8))
            continue
        codes, scale = quantize(weights[n], quantize_mode)
        parts += [codes.reshape(-1).view(np.uint8), scale.reshape(-1).view(np.uint8)]
    return np.concatenate(parts)


def empty_slots(expert_shapes: dict, num_slots: int, quantize_mode: str | None = None) -> dict:
    """Zeroed device slot buffers {w_*: [S, ...]} for `expert_shapes` {w_*: (shape, compute dtype)}; quantized,
    {w_*: QuantizedStack(codes [S, ...], scale float32[S, ...])} (`expert_quant.quantized_shapes`)."""
    if quantize_mode is None:
        return {n: jnp.zeros((num_slots, *shape), dtype) for n, (shape, dtype) in expert_shapes.items()}
    out = {}
    for n, (shape, dtype) in expert_shapes.items():
        if n.startswith("b_"):  # biases stay unquantized
            out[n] = jnp.zeros((num_slots, *shape), dtype)
            continue
        (codes_shape, codes_dtype), scale_shape = quantized_shapes(shape, quantize_mode)
        out[n] = QuantizedStack(jnp.zeros((num_slots, *codes_shape), codes_dtype),
                                jnp.zeros((num_slots, *scale_shape), scale_dtype(quantize_mode)), jnp.dtype(dtype).name,
                                quantize_mode)
    return out


@partial(jax.jit, donate_argnames=("slots",))
def write_slot(slots, slot, packed):
    """In-place write of one packed expert (`pack_expert`, already on the device) into row `slot` of the
    slot buffers {w_*: [S, ...], b_*: [S, ...]} (or `QuantizedStack`s and biases, from packed bytes)."""
    out, start = {}, 0
    for name in [n for n in EXPERT_NAMES if n in slots]:
        buffer = slots[name]
        if isinstance(buffer, QuantizedStack):
            codes_shape, scale_shape = buffer.codes.shape[1:], buffer.scale.shape[1:]
            size = math.prod(codes_shape)
            codes = jax.lax.bitcast_convert_type(packed[start : start + size], buffer.codes.dtype).reshape(codes_shape)
            start += size
            size, width = math.prod(scale_shape), jnp.dtype(buffer.scale.dtype).itemsize
            scale = packed[start : start + size]  # E8M0 bytes
            if width > 1:
                scale = jax.lax.bitcast_convert_type(packed[start : start + width * size].reshape(size, width),
                                                     buffer.scale.dtype)
            start += width * size
            out[name] = QuantizedStack(update_row(buffer.codes, codes, slot),
                                       update_row(buffer.scale, scale.reshape(scale_shape), slot), buffer.dtype, buffer.mode)
            continue
        shape = buffer.shape[1:]
        size = math.prod(shape)
        if packed.dtype == jnp.uint8 and buffer.dtype != jnp.uint8:  # a bias among quantized weights: its bytes
            width = jnp.dtype(buffer.dtype).itemsize
            value = jax.lax.bitcast_convert_type(packed[start : start + width * size].reshape(size, width), buffer.dtype)
            out[name] = update_row(buffer, value.reshape(shape), slot)
            start += width * size
            continue
        out[name] = update_row(buffer, packed[start : start + size].reshape(shape), slot)
        start += size
    return out


@partial(jax.jit, static_argnames=("device_sharding",), donate_argnames=("slots",))
def write_slot_from_host(slots, slot, packed_host, device_sharding):
    """`write_slot` from the packed expert still in host memory: the host-to-device copy inside the same
    program (used on the CPU backend, where a separate copy buys no overlap)."""
    return write_slot.__wrapped__(slots, slot, jax.device_put(packed_host, device_sharding))


# ----------------------------------------------------------------------------------------------

def host_memory_kind(device) -> str:
    kinds = {m.kind for m in device.addressable_memories()}
    if "pinned_host" in kinds:
        return "pinned_host"
    if "unpinned_host" in kinds:
        print("warning: backend has no pinned_host memory; expert weights use unpinned_host", file=sys.stderr)
        return "unpinned_host"
    raise JaxmoeError(f"device {device} exposes no host memory kind; cannot offload experts")


class ExpertStore:
    """Every routed expert as one host-memory jax array: `get((layer, e))` -> packed (`pack_expert`: [3*d*f] of
    `dtype`, or codes and scales as bytes with quantize "int8" / "int4"); `expert_shapes`: {w_*: (shape, dtype)} of
    the unpacked weights."""

    def __init__(self, model_dir: Path, cfg: ModelConfig, abstract_experts: dict[int, dict], dtype, device,
                 quantize: str | None = None):
        self.memory_kind = host_memory_kind(device)
        self.quantize = quantize
        host = jax.sharding.SingleDeviceSharding(device, memory_kind=self.memory_kind)
        self.experts: dict[tuple[int, int], dict] = {}
        total = sum(x.size * jnp.dtype(x.dtype).itemsize for a in abstract_experts.values() for x in jax.tree.leaves(a))
        layers = tqdm(abstract_experts.items(), desc="experts to host memory" + (f" ({quantize})" if quantize else ""),
                      unit="layer", disable=total < PROGRESS_MIN_BYTES, file=sys.stderr)
        with ThreadPoolExecutor(PACK_THREADS) as pool:  # numpy releases the GIL: experts pack in parallel
            for layer, abstract in layers:
                stack = restore_layer_experts(model_dir, layer, abstract, host)
                arrays = {name: np.asarray(stack[name]) for name in EXPERT_NAMES if name in stack}
                del stack
                pack = lambda e: pack_expert({n: a[e] for n, a in arrays.items()}, dtype, quantize)  # noqa: E731
                for e, packed in enumerate(pool.map(pack, range(cfg.num_experts))):
                    self.experts[(layer, e)] = jax.device_put(packed, host)
        self.expert_shapes = {n: (a.shape[1:], jnp.dtype(dtype)) for n, a in arrays.items()}
        self.expert_bytes = next(iter(self.experts.values())).nbytes

    def get(self, key):
        return self.experts[key]


def choose_num_slots(cfg: ModelConfig, expert_bytes: int, resident_bytes: int, device,
                     cache_slots: int | None, expert_cache_gb: float | None) -> int:
    """Number of device expert slots from the flags or, by default, from free device memory."""
    total = cfg.num_experts * len(cfg.moe_layer_ids)
    limit = (device.memory_stats() or {}).get("bytes_limit")
    if limit is not None and resident_bytes > limit:
        raise JaxmoeError(f"non-expert weights and KV cache need {resident_bytes / 1e9:.2f} GB but the device has {limit / 1e9:.2f} GB")
    if cache_slots is not None:
        slots, flag = cache_slots, f"--cache-slots {cache_slots}"
    elif expert_cache_gb is not None:
        slots, flag = int(expert_cache_gb * 1e9 // expert_bytes), f"--expert-cache-gb {expert_cache_gb}"
        if limit is not None and resident_bytes + expert_cache_gb * 1e9 > limit:
            raise JaxmoeError(f"{flag}: with {resident_bytes / 1e9:.2f} GB of non-expert weights and KV cache it exceeds the device's {limit / 1e9:.2f} GB")
    else:
        if limit is None:
            return total
        free = limit * (1 - DEVICE_MARGIN) - resident_bytes
        slots, flag = int(free // expert_bytes), "the free device memory"
    if slots < cfg.num_experts_per_tok:
        raise JaxmoeError(f"{flag}: gives {slots} expert slots, fewer than one layer's top-k ({cfg.num_experts_per_tok})")
    return min(slots, total)


POLICIES = ("on-demand", "lfu", "prefetch", "presched", "adaptive", "oracle")
SPECULATE_MODES = SPECULATION_MODES
PREDICTOR_POLICIES = ("prefetch", "presched", "adaptive")
PREDICTORS = ("gate-lookahead", "previous-token", "frequency")


def make_planner(policy: str):
    return {"on-demand": NoPrefetch, "lfu": NoPrefetch, "prefetch": TopKPrefetch, "presched": PreSched,
            "adaptive": Adaptive}[policy]()


def make_eviction(policy: str, cfg: ModelConfig):
    """LRU for on-demand (the mixtral-offloading baseline), LFU for lfu, expected reuse distance
    (frequency + the predictor's probabilities) for the prefetching policies."""
    if policy in PREDICTOR_POLICIES:
        positions = {layer: p for p, layer in enumerate(cfg.moe_layer_ids)}
        return ExpectedReuse(positions, cfg.num_experts, cfg.num_experts_per_tok)
    return LFU() if policy == "lfu" else LRU()


class OffloadEngine:
    """Generation with host-resident experts and a fixed-slot device expert cache.

    policy: on-demand (LRU, no prefetch), lfu, prefetch / presched / adaptive (predictor-driven
    prefetch by the transfer thread), oracle (true future routing from a first run: Belady eviction +
    perfect prefetch). During prefill every prefetching policy loads the next MoE layer's experts
    while the current layer computes (DuoServe), residency bounded by the cache.
    """

    def __init__(self, cfg: ModelConfig, store: ExpertStore, layer_parts: list, globals_parts: dict, num_slots: int,
                 policy: str = "on-demand", predictor=None, link: EmulatedLink | None = None, tokenizer=None, device=None):
        if policy not in POLICIES:
            raise JaxmoeError(f"--policy {policy!r}: unknown; available: resident, {', '.join(POLICIES)}")
        self.cfg, self.store, self.tokenizer, self.policy = cfg, store, tokenizer, policy
        self.ffn = ExpertFFN.from_config(cfg)  # the routed experts' function (static in the slot kernels)
        self.device = device or jax.devices()[0]
        self.layer_parts = layer_parts  # per layer: (is_moe, StaticGraph, flat state leaves, nnx state w/o experts)
        self.globals = globals_parts
        g = globals_parts
        self.weight_bytes = tree_bytes([p[2] for p in layer_parts]) + tree_bytes((g["embedding"], g["head"], g["norm"][1]))
        self.device_sharding = jax.sharding.SingleDeviceSharding(self.device)
        self.slots = empty_slots(store.expert_shapes, num_slots, store.quantize)
        self._slots_lock = threading.Lock()  # guards replacing self.slots (donated) vs dispatching readers
        self.num_slots, self.link = num_slots, link
        self._copies_in_flight = COPIES_IN_FLIGHT  # see `copies_in_flight`
        self.moe_layer_ids = cfg.moe_layer_ids
        self.pos_of_layer = {layer: p for p, layer in enumerate(self.moe_layer_ids)}
        self._moe_layer_index = np.asarray(self.moe_layer_ids)
        self._ahead_rows: dict[tuple[int, int], np.ndarray] = {}  # (pos, horizon) -> int[H] (`_plan_prefetch`)
        if policy in PREDICTOR_POLICIES and predictor is None:
            predictor = self.build_predictor("gate-lookahead")
        self.predictor = predictor if policy in PREDICTOR_POLICIES else None
        self._new_cache(make_planner(policy) if policy != "oracle" else NoPrefetch(), make_eviction(policy, cfg))
        self._kv = None
        self._decode_base = None
        self._run_base = None
        self._position = None  # position(s) of the tokens in the running forward pass (int or int32[T])
        # Benchmarks only (bench.sizes): (layer, positions int[N], ids_host int32[N, k]) -> int32[N, k]
        # replaces the routing decision on the host, e.g. with a recorded trace; None: the model's own.
        self.routing_override = None
        # whether predictors that can run inside the layer's program (`to_fused`) do; None: on accelerators
        # only. On the CPU backend the "device" is the host's own cores: gate-lookahead costs less in numpy
        # than in XLA (`python -m bench predictor-cost`) and measured the same live either way; LLaPor
        # decoded 5-9% faster fused in single-engine A/Bs, within the noise of `bench policies`
        # (--fuse-predictor on against off, two runs)
        self.fuse_predictor = None
        self._fused = self._fused_for = None
        self._scorer = None
        # Benchmarks only (bench.replay): called after each MoE layer with (pos, decoding, ids int32[N, k] of
        # the valid rows, predictor scores float32[H, E] or None) to record a run for replay.
        self.layer_observer = None
        # whether an expert's host-to-device copy runs inside the slot write's program (CPU backend: host and
        # device memory are the same RAM and there is no copy engine to overlap with; one dispatch costs a
        # third of the CPU time of two, ~110 against ~380 us per expert of the default model) instead of a
        # device_put the transfer thread waits on before writing the slot (accelerators)
        self.copy_inside_write = self.device.platform == "cpu"
        # decode steps as one whole-token program when the cache holds what they route to (see
        # scheduler.speculation and `_speculate`)
        self.speculation = Speculation("auto")
        self._token_graphs = tuple((bool(is_moe), g) for is_moe, g, _, _ in layer_parts)
        self._token_states = tuple(leaves for _, _, leaves, _ in layer_parts)
        # per layer whether its cache is a running state, which a redone whole-token step must not step twice
        recurrent = tuple(ATTENTION_MODULES[cfg.layer_attention_kind(i)].recurrent_cache for i in range(cfg.num_layers))
        self._recurrent_layers = recurrent if any(recurrent) else ()

    def _new_cache(self, planner, eviction) -> None:
        self.planner = planner
        self.cache = ExpertCache(self.num_slots, eviction, self._copy_expert, self.store.expert_bytes, self.link,
                                 key_shape=(self.cfg.num_layers, self.cfg.num_experts),
                                 copies_in_flight=self._copies_in_flight)

    @property
    def copies_in_flight(self) -> int:
        """How many expert copies the transfer thread keeps issued, at most, when they are demand copies
        (prefetches: COPIES_IN_FLIGHT). Deeper helps where each copy has a fixed latency that overlaps with others (see
        `bench sizes`' burst bandwidth); on the CPU backend copies run one at a time anyway."""
        return self._copies_in_flight

    @copies_in_flight.setter
    def copies_in_flight(self, n: int) -> None:
        if n < COPIES_IN_FLIGHT:
            raise JaxmoeError(f"--copies-in-flight {n}: at least {COPIES_IN_FLIGHT}")
        self._copies_in_flight = self.cache.copies_in_flight = n

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def load(cls, model_dir, dtype=None, tokenizer=None, cache_slots=None, expert_cache_gb=None,
             policy="on-demand", predictor=None, emulate_link=None, max_len: int = 4096, fuse_predictor=None,
             speculate: str = "auto", quantize_experts: str | None = None):
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise JaxmoeError(f"{model_dir}: no such directory")
        policy = policy or "on-demand"
        if policy not in POLICIES:
            raise JaxmoeError(f"--policy {policy!r}: unknown; available: resident, {', '.join(POLICIES)}")
        if predictor is not None and policy not in PREDICTOR_POLICIES:
            raise JaxmoeError(f"--predictor only applies to the policies {', '.join(PREDICTOR_POLICIES)}")
        if fuse_predictor is not None and policy not in PREDICTOR_POLICIES:
            raise JaxmoeError(f"--fuse-predictor only applies to the policies {', '.join(PREDICTOR_POLICIES)}")
        link = EmulatedLink.parse(emulate_link) if emulate_link is not None else None
        if speculate not in SPECULATE_MODES:
            raise JaxmoeError(f"--speculate {speculate!r}: expected one of {', '.join(SPECULATE_MODES)}")
        cfg = load_config(model_dir)
        check_quantize(quantize_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        if not cfg.moe_layer_ids:
            raise JaxmoeError(f"{model_dir}: the model has no MoE layers to offload")
        dtype = jnp.dtype(dtype or cfg.dtype)
        device = jax.devices()[0]
        dev = jax.sharding.SingleDeviceSharding(device)
        graphdef, abstract_state = abstract_model(cfg, dtype)
        pure = abstract_state.to_pure_dict()
        restored = restore_piece(model_dir, "globals", with_sharding({k: v for k, v in pure.items() if k != "layers"}, dev))
        layers, abstract_experts = {}, {}
        for i, tree in pure["layers"].items():
            dense, experts = split_layer(tree)
            layers[i] = restore_piece(model_dir, f"layer_{i:03d}/dense", with_sharding(dense, dev))
            if experts is not None:
                abstract_experts[i] = experts
                layers[i]["moe"]["experts"] = {n: jnp.zeros((0,), dtype) for n in expert_shapes(cfg)}  # placeholders
        restored["layers"] = layers
        nnx.replace_by_pure_dict(abstract_state, restored)
        model = nnx.merge(graphdef, abstract_state)
        layer_parts = []
        for layer in model.layers:
            g, experts_state, rest = nnx.split(layer, ExpertWeight, ...)
            static, leaves = flat_state(g, experts_state, rest)  # equal layer graphs share one object
            layer_parts.append((layer.is_moe, static, leaves, rest))
        g_norm, norm_state = nnx.split(model.final_norm)
        globals_parts = {"embedding": model.embed.embedding[...], "head": model.head_matrix(),
                         "norm": flat_state(g_norm, norm_state)}
        store = ExpertStore(model_dir, cfg, abstract_experts, dtype, device, quantize_experts)
        resident = tree_bytes(restored) + kv_cache_bytes(model, max_len)
        num_slots = choose_num_slots(cfg, store.expert_bytes, resident, device, cache_slots, expert_cache_gb)
        engine = cls(cfg, store, layer_parts, globals_parts, num_slots, policy, None, link, tokenizer, device)
        if predictor is not None:
            engine.predictor = engine.build_predictor(predictor)
        engine.fuse_predictor = fuse_predictor
        engine.speculation = Speculation(speculate)
        return engine

    def build_predictor(self, spec: str):
        """gate-lookahead | previous-token | frequency | PATH (a trained LLaPor directory)."""
        num_pos, num_experts = len(self.moe_layer_ids), self.cfg.num_experts
        if spec == "gate-lookahead":
            trees = [self.layer_parts[layer][3].to_pure_dict() for layer in self.moe_layer_ids]
            return GateLookaheadPredictor.from_layer_trees(trees, self.cfg.rms_norm_eps, self.cfg.norm_unit_offset)
        if spec == "previous-token":
            return PreviousTokenPredictor(num_pos, num_experts)
        if spec == "frequency":
            return FrequencyPredictor(num_pos, num_experts)
        path = Path(spec)
        if not path.is_dir():
            raise JaxmoeError(f"--predictor {spec!r}: not one of {', '.join(PREDICTORS)} nor a trained predictor directory")
        from predictors.llapor import LLaPorPredictor

        predictor = LLaPorPredictor.load(path)
        if getattr(predictor, "num_experts", num_experts) != num_experts:
            raise JaxmoeError(f"--predictor {spec}: trained for {predictor.num_experts} experts, the model has {num_experts}")
        return predictor

    # -- expert transfers (transfer thread) ----------------------------------------------------------------
    def _copy_expert(self, key, slot: int):
        """Issues the copy of expert `key` into `slot` -> a function that waits until it has landed and
        writes the slot (None: already done). The transfer thread issues the next copy before calling it."""
        if self.copy_inside_write:
            with self._slots_lock:
                self.slots = write_slot_from_host(self.slots, slot, self.store.get(key), self.device_sharding)
            return None
        on_device = jax.device_put(self.store.get(key), self.device_sharding)  # the link's DMA, beside compute

        def land():
            # the host-to-device copy itself: this thread waits, not the decode loop. The slot is written
            # only once the copy is there, or every layer dispatched after the write would wait for it
            jax.block_until_ready(on_device)
            with self._slots_lock:
                self.slots = write_slot(self.slots, slot, on_device)

        return land

    # -- one MoE layer -------------------------------------------------------------------------------
    def _ensure(self, layer: int, experts: np.ndarray, plan_ahead=None) -> tuple[np.ndarray, object]:
        """experts: int[n] distinct, of MoE layer `layer` -> (int64[n] their slots, once resident; what
        `plan_ahead` returned, or NOT_PLANNED). plan_ahead: called once the missing experts are queued,
        before waiting for them, if there is anything to wait for (see `_route`)."""
        t0 = time.perf_counter()
        if self._last_layer_done is not None and self._decoding:
            compute = t0 - self._last_layer_done
            self._layer_compute_s = compute if self._layer_compute_s is None else 0.9 * self._layer_compute_s + 0.1 * compute
        self.cache.policy.at_step(self.pos_of_layer[layer], len(self._requests))
        request = self.cache.request_slots(layer, experts)
        self._requests.append((layer, experts))
        planned = plan_ahead() if plan_ahead is not None and request.must_wait else NOT_PLANNED
        self.cache.wait_for(request)
        self._last_layer_done = time.perf_counter()
        return request.slots, planned

    def _route(self, layer: int, flat, ids, weights, features, valid_rows: np.ndarray):
        """Host side of one MoE layer: the routing decision to the host (the only device->host copy),
        experts loaded in groups of at most num_slots. -> (slot_ids int32[N, k] of the last group,
        routed output [N, d] of the earlier groups or None, kernel, needed, valid_ids int32[n, k] (the real
        tokens' routing), packed features (`moe_front`) or None, the scores the next transfers were
        planned from if they were (`_plan_ahead`), else NOT_PLANNED)."""
        packed = None
        if self._decoding and self.predictor is not None:  # the routing plus the predictor's inputs or scores
            packed = np.asarray(features)
            ids_host = packed[None, : self.cfg.num_experts_per_tok].astype(np.int32)
        else:
            ids_host = np.asarray(ids)  # [N, k]
        if self.routing_override is not None:
            ids_host = np.asarray(self.routing_override(layer, np.atleast_1d(self._position), ids_host), np.int32)
        valid_ids = ids_host if len(valid_rows) == 1 else ids_host[valid_rows]  # [n_valid, k]
        needed = distinct_sorted(valid_ids)
        tokens = flat.shape[0]
        # prefill: one static group count per chunk length, so only the rows bucket varies between compiles
        max_groups = min(self.cfg.num_experts, self.num_slots, tokens * self.cfg.num_experts_per_tok)
        routed = None
        groups = [needed] if len(needed) <= self.num_slots else [
            needed[start : start + self.num_slots] for start in range(0, len(needed), self.num_slots)]
        planned = NOT_PLANNED
        # decode: when this layer must wait for transfers, the next layer's prefetches are planned and
        # queued right after its misses, so they start while it waits and computes (planned after the
        # dispatch they had only what is left of the layer's compute after the planning to land: 0.42
        # against 0.71 prefetch precision at 25% cache, T_x = T_c). Without a wait to hide it under, the
        # planning follows the dispatch (planning first measured no faster)
        plan_ahead = (lambda: self._plan_ahead(self.pos_of_layer[layer], needed, packed)) if self._decoding else None
        for n, group in enumerate(groups):
            lut = np.full(self.cfg.num_experts, -1, np.int32)
            last = n == len(groups) - 1
            lut[group], planned = self._ensure(layer, group, plan_ahead if last else None)
            slot_ids = lut[ids_host]
            if tokens <= GATHER_MAX_TOKENS:
                kernel = "gather"
            else:
                slot_ids[~valid_rows] = -1  # padding rows: no work
                kernel = ("bucketed", *plan_buckets(slot_ids, max_groups))
            if n == len(groups) - 1:
                break
            with self._slots_lock:
                part = routed_over_slots(flat, slot_ids, weights, self.slots, kernel, self.ffn)
            routed = part if routed is None else routed + part
        return slot_ids, routed, kernel, needed, valid_ids, packed, planned

    def _plan_ahead(self, pos: int, needed, packed, valid_ids=None):
        """Feedback on the predictions for MoE position `pos` (needed: the experts it routed to), then
        the next transfers -> the predictor's scores float32[H, E] or None. valid_ids: the routing of a
        prefill chunk's real tokens (None in decode)."""
        self.planner.feedback(pos, needed)
        if self.predictor is not None and self._scorer is None:
            # history: this token's experts (in prefill: the last prompt token's); a fused predictor
            # observed them on the device
            self.predictor.observe(pos, needed if valid_ids is None else valid_ids[-1])
        scores = self._plan_prefetch(pos, packed)
        self.cache.policy.set_predictions(self.planner.use_probability)
        return scores

    def _after_layer(self, pos: int, needed, valid_ids, packed, planned) -> None:
        """Bookkeeping and, unless `_route` already planned them (`planned`: the scores they were planned
        from, or NOT_PLANNED), the next transfers, while the device computes what was just dispatched.
        valid_ids: int32[n, k], the routing of the chunk's real tokens (one in decode)."""
        scores = planned
        if planned is NOT_PLANNED:
            scores = self._plan_ahead(pos, needed, packed, None if self._decoding else valid_ids)
        if self.layer_observer is not None:
            self.layer_observer(pos, self._decoding, valid_ids, scores)
        if self._token_needed is not None:
            self._token_needed.append(needed)
        eviction = self.cache.policy
        tokens = max(len(valid_ids), 1)
        eviction.observe(pos, np.bincount(valid_ids.reshape(-1), minlength=self.cfg.num_experts) / tokens, tokens)

    def _plan_prefetch(self, pos: int, packed):
        """Queues the next transfers while the device computes this layer -> the predictor's scores
        float32[H, E] it planned from, or None. packed: `moe_front`'s features on the host (decode)."""
        planner = self.planner
        if isinstance(planner, NoPrefetch) or (self._decoding and planner.horizon == 0):
            return
        num_pos = len(self.moe_layer_ids)
        if not self._decoding:  # DuoServe prefill: the whole next MoE layer, under this layer's compute
            if pos + 1 >= num_pos:
                return
            nxt = self.moe_layer_ids[pos + 1]
            keys = [(nxt, e) for e in range(self.cfg.num_experts)][: self.num_slots - self.cfg.num_experts_per_tok]
            self.cache.prefetch(keys, keys)
            return
        scores = None
        if self.predictor is not None:
            k, d, num_experts = self.cfg.num_experts_per_tok, self.cfg.hidden_size, self.cfg.num_experts
            if self._scorer is not None:  # computed inside the layer's program
                scores = packed[k:].reshape(planner.horizon, num_experts)
            else:
                scores = self.predictor.predict(pos, packed[k : k + d], packed[k + d :], planner.horizon)
        bandwidth = self.cache.measured_bandwidth
        transfer_s = self.store.expert_bytes / bandwidth if bandwidth else 1e-4
        if self.link is not None:
            transfer_s = max(transfer_s, self.link.transfer_s(self.store.expert_bytes))
        rows = self._ahead_rows.get((pos, planner.horizon))
        if rows is None:  # the layers of positions pos + 1 .. pos + H, built once per (pos, H)
            rows = self._ahead_rows[(pos, planner.horizon)] = self._moe_layer_index[PlanContext.ahead(pos, num_pos, planner.horizon)]
        ctx = PlanContext(step=len(self._requests) - 1, pos=pos, num_positions=num_pos, layer_of_pos=self.moe_layer_ids,
                          top_k=self.cfg.num_experts_per_tok, num_slots=self.num_slots, scores=scores,
                          resident=self.cache.resident_mask(rows), transfer_s=transfer_s,
                          layer_compute_s=self._layer_compute_s or transfer_s)
        keys, protect = planner.plan(ctx)
        self.cache.prefetch(keys, protect)
        return scores

    # -- the StepRunner protocol ---------------------------------------------------------------------
    def start(self, max_len: int, max_new_tokens: int | None = None) -> None:
        self._kv = [None] * self.cfg.num_layers
        self._max_len = max_len
        self._max_new_tokens = max_new_tokens
        self._decode_steps = 0
        self._decode_base = None
        self.cache.forget_prefetches()
        self._run_base = self.cache.stats.as_dict()  # prefill stats count from here, not from the engine's creation
        self._decoding = False
        self._requests: list[tuple[int, np.ndarray]] = []  # each ensure: (layer, experts)
        self._last_layer_done = None
        self._layer_compute_s = None
        self._timed_token = None  # (speculated, redo fraction, start, compile seconds at start) of the last decode step
        self._token_needed = None  # a layer-path decode step's experts per MoE position, when auto mode asks
        self._spec_tokens = self._spec_redone = 0
        if self.predictor is not None:
            self.predictor.reset()
        self._scorer = self._scorer_params = self._scorer_state = None
        fusable = self.predictor is not None and hasattr(self.predictor, "to_fused") and self.planner.horizon > 0
        # a routing override (benchmarks) replaces the decision on the host, after the device has already
        # observed its own: such runs keep the predictor on the host, where it sees the replaced routing
        fuse = self.fuse_predictor if self.fuse_predictor is not None else self.device.platform != "cpu"
        if fuse and fusable and self.routing_override is None:
            key = (self.predictor, self.planner.horizon)
            if self._fused_for != key:  # predictors compare by identity
                self._fused, self._fused_for = self.predictor.to_fused(self.planner.horizon), key
                # the traced scalars moe_front takes, placed once (a host scalar costs a transfer per call)
                self._row_scalars = [jax.device_put(np.int32(i), self.device_sharding) for i in range(len(self.moe_layer_ids))]
            self._scorer, self._scorer_params = self._fused
            self._scorer_state = self._scorer.init_state()
        # looked up once per generation, not per decode step (the key holds a graph per layer)
        self._whole_token_ran = self._whole_token_key() in _WHOLE_TOKEN_RAN

    def _scorer_args(self, layer: int, valid_rows: np.ndarray) -> dict:
        """moe_front's fused-predictor arguments for MoE layer `layer` ({} without one)."""
        if self._scorer is None:
            return {}
        last_row = int(np.flatnonzero(valid_rows)[-1])
        return {"scorer": self._scorer, "scorer_params": self._scorer_params, "scorer_state": self._scorer_state,
                "last_row": self._row_scalars[0] if last_row == 0 else np.int32(last_row),
                "pos": self._row_scalars[self.pos_of_layer[layer]]}

    def _forward(self, tokens, positions, valid_rows: np.ndarray, first_layer: int = 0, h=None):
        """tokens, positions: int32[1, T] -> h [1, T, d] (pre final norm), updating the KV cache; from layer
        `first_layer` on, with `h` the hidden state entering it, if given.

        Steady state is one jitted dispatch per MoE layer (`moe_back_front`: layer l's experts, shared
        expert and residual, then layer l+1's attention and router), after which the host plans the
        next transfers while the device computes."""
        if h is None:
            h = embed_tokens(self.globals["embedding"], tokens)
        parts, num_layers = self.layer_parts, len(self.layer_parts)
        front = None  # moe_front outputs (h, flat, ids, weights, features) of layer i, already dispatched
        for i in range(first_layer, num_layers):
            is_moe, g, state, _ = parts[i]
            self._init_kv(i, h.dtype)
            if not is_moe:
                h, self._kv[i] = dense_layer(g, state, h, self._kv[i], positions)
                continue
            if front is None:
                h, self._kv[i], *rest = moe_front(g, state, h, self._kv[i], positions, **self._scorer_args(i, valid_rows))
                front = (h, *rest)
            h, flat, ids, weights, features, self._scorer_state = front
            slot_ids, partial_routed, kernel, needed, valid_ids, packed, planned = self._route(
                i, flat, ids, weights, features, valid_rows)
            nxt = i + 1
            if nxt < num_layers and parts[nxt][0]:
                self._init_kv(nxt, h.dtype)
                _, g2, state2, _ = parts[nxt]
                scorer_args = self._scorer_args(nxt, valid_rows)
                if scorer_args:
                    scorer_args["next_pos"] = scorer_args.pop("pos")
                with self._slots_lock:
                    out = moe_back_front(g, state, h, flat, slot_ids, weights, self.slots, partial_routed, kernel,
                                         g2, state2, self._kv[nxt], positions, **scorer_args)
                h, self._kv[nxt], *rest = out
                front = (h, *rest)
            else:
                with self._slots_lock:
                    routed = routed_over_slots(flat, slot_ids, weights, self.slots, kernel, self.ffn)
                if partial_routed is not None:
                    routed = routed + partial_routed
                h = moe_back(g, state, h, flat, routed)
                front = None
            self._after_layer(self.pos_of_layer[i], needed, valid_ids, packed, planned)
        return h

    def _init_kv(self, i: int, dtype) -> None:
        if self._kv[i] is None:
            attention = ATTENTION_MODULES[self.cfg.layer_attention_kind(i)]
            self._kv[i] = attention.init_cache(self.cfg, 1, self._max_len, dtype)

    def _logits(self, h_last):
        g, st = self.globals["norm"]
        return final_logits(g, st, self.globals["head"], h_last)

    def prefill(self, tokens: np.ndarray, length: int):
        padded = tokens.shape[1]
        chunk = min(padded, PREFILL_CHUNK)
        last = None
        for start in range(0, padded, chunk):
            if start >= length:
                break
            positions = np.arange(start, start + chunk, dtype=np.int32)[None]
            valid = positions[0] < length
            self._position = positions[0]
            # padding at position -1 (jaxmoe.attention): running states (Gated DeltaNet) skip it
            h = self._forward(jnp.asarray(tokens[:, start : start + chunk]), jnp.asarray(np.where(valid, positions, -1)),
                              valid)
            if start <= length - 1 < start + chunk:
                last = h[:, length - 1 - start]
        logits = self._logits(last)
        self.cache.forget_prefetches()  # the prefill's (DuoServe) prefetches are not the decode's
        self._decode_base = self.cache.stats.as_dict()
        self._decoding = True
        self._last_layer_done = None
        return logits

    def decode(self, token, position: int):
        self._position = position
        start, compiled = time.perf_counter(), compile_seconds()
        self._time_last_token(start, compiled)
        positions = position_array(position, (1, 1))
        self._decode_steps += 1
        can_speculate = self._can_speculate()
        if can_speculate and self._should_speculate():
            logits, redo = self._speculate(token, positions)
            self._timed_token = (True, redo, start, compiled)
            return logits
        landed = None
        if self.speculation.mode == "auto" and can_speculate:  # what a speculation would have found
            landed = self.cache.landed_slots(self._moe_layer_index)
            self._token_needed = []
        h = self._forward(token, positions, np.ones(1, bool))
        redo = 0.0
        if landed is not None:
            first_miss = next((pos for pos, needed in enumerate(self._token_needed) if (landed[pos, needed] < 0).any()),
                              len(landed))
            redo = redo_fraction(first_miss, len(landed))
            self._token_needed = None
        self._timed_token = (False, redo, start, compiled)
        return self._logits(h)

    def _time_last_token(self, now: float, compiled: float) -> None:
        """The previous decode step's period (to this one's start) to the speculation estimates; a step
        that compiled anything is not timed."""
        if self._timed_token is None:
            return
        speculated, redo, start, compiled_then = self._timed_token
        self._timed_token = None
        self.speculation.record(speculated, redo, now - start, compiled > compiled_then)

    def _should_speculate(self) -> bool:
        tokens_left = None if self._max_new_tokens is None else self._max_new_tokens - self._decode_steps
        return self.speculation.should_speculate(tokens_left, self._whole_token_ran)

    def _whole_token_key(self):
        """What `decode_token_over_slots` compiles for, as far as one engine's runs vary."""
        return self._token_graphs, self._max_len, self._scorer, self.routing_override is not None

    def _can_speculate(self) -> bool:
        """Decode steps can run as one program: not turned off, and the routing is the model's own or a
        benchmark's replay that can give a whole token's (`decode_routing(position)` -> int32[P, k])."""
        override = self.routing_override
        return self.speculation.mode != "off" and (override is None or hasattr(override, "decode_routing"))

    def _speculate(self, token, positions):
        """One decode step as one program over the landed slots (`decode_token_over_slots`) -> (logits
        float32[1, V], the fraction of MoE positions redone layer by layer after a miss, 0 if none).

        The host then books what the program did as the layer path would have (`_book_resident_layers`):
        hits, eviction stamps, the planner's feedback, the predictor's history; after a whole token it
        plans the next token's first transfers. From a missed position on it runs the layer path,
        from the hidden state that entered that layer, over the KV cache rows the program wrote (each
        layer rewrites its row at this position before reading it) and, for layers with a running state
        (Gated DeltaNet), the state from before the token, which the program hands back for the layers from
        the first miss on (`keep_states_of_redone_layers`)."""
        num_pos, k = len(self.moe_layer_ids), self.cfg.num_experts_per_tok
        forced = None
        if self.routing_override is not None:
            forced = np.asarray(self.routing_override.decode_routing(self._position), np.int32)
        scorer = {}
        if self._scorer is not None:
            scorer = {"scorer": self._scorer, "scorer_params": self._scorer_params, "scorer_state": self._scorer_state}
        g_norm, norm_state = self.globals["norm"]
        self._last_layer_done = None
        with self._slots_lock:  # no slot write is issued between the table and the buffers it describes
            table = self.cache.landed_slots(self._moe_layer_index)
            logits, self._kv, summary, h_in, scorer_state = decode_token_over_slots(
                self._token_graphs, self._token_states, self._kv, self.globals["embedding"], g_norm, norm_state,
                self.globals["head"], token, positions, table, self.slots, forced, recurrent_layers=self._recurrent_layers,
                **scorer)
        if self._scorer is not None:
            self._scorer_state = scorer_state
        if not self._whole_token_ran:
            _WHOLE_TOKEN_RAN.add(self._whole_token_key())
            self._whole_token_ran = True
        summary = np.asarray(summary)  # the step's one device-to-host copy
        ids = summary[: num_pos * k].reshape(num_pos, k).astype(np.int32)
        missing = summary[num_pos * k : num_pos * k + num_pos] > 0
        first_miss = int(np.argmax(missing)) if missing.any() else num_pos
        self._spec_tokens += 1
        self._book_resident_layers(ids[:first_miss], summary[num_pos * k + num_pos :] if first_miss == num_pos else None)
        if first_miss == num_pos:
            return logits, 0.0
        self._spec_redone += 1
        h = self._forward(token, positions, np.ones(1, bool), self.moe_layer_ids[first_miss], h_in[first_miss])
        return self._logits(h), redo_fraction(first_miss, num_pos)

    def _book_resident_layers(self, ids: np.ndarray, packed) -> None:
        """What `_ensure` and `_after_layer` record for the first m MoE positions of a token, whose experts
        (ids int32[m, k]) the whole-token program read from the cache, in one go where the layer path goes
        position by position (the same counts, use stamps and feedback). packed: the last position's
        features when m is every position: the next token's first transfers are planned from them."""
        count = len(ids)
        if count == 0:
            return
        needed = np.sort(ids, axis=1)
        if (needed[:, 1:] == needed[:, :-1]).any():  # a replayed routing that repeats an expert
            needed = [distinct_sorted(row) for row in ids]
        layers = self._moe_layer_index[:count]
        policy = self.cache.policy
        policy.at_step(count - 1, len(self._requests) + count - 1)  # no eviction is chosen in between
        self.cache.record_hits(layers, needed)
        self._requests.extend(zip(layers.tolist(), needed))
        last = count - 1 if packed is not None else count  # planned below, with its feedback
        if not isinstance(self.planner, NoPrefetch) or (self.predictor is not None and self._scorer is None):
            for pos in range(last):
                self.planner.feedback(pos, needed[pos])
                if self.predictor is not None and self._scorer is None:
                    self.predictor.observe(pos, needed[pos])
        scores = self._plan_ahead(count - 1, needed[-1], packed) if packed is not None else None
        if self.layer_observer is not None:
            for pos in range(count):
                self.layer_observer(pos, True, ids[pos][None], scores if pos == count - 1 else None)
        num_experts = self.cfg.num_experts  # per row what `_after_layer` counts with np.bincount
        rows = (np.arange(count)[:, None] * num_experts + ids).reshape(-1)
        policy.observe_rows(np.bincount(rows, minlength=count * num_experts).reshape(count, num_experts).astype(np.float64))

    def stats(self) -> dict:
        total = self.cache.stats.as_dict()
        base = self._decode_base or {k: 0 for k in total}
        run_start = self._run_base if self._decode_base else base
        counters = ("hits", "late_hits", "misses", "prefetches", "prefetch_hits", "wasted_prefetch_bytes", "h2d_bytes",
                    "stall_s", "link_busy_s", "transfer_cpu_s")
        decode = {k: total[k] - base[k] for k in counters}
        prefill = {k: base[k] - run_start[k] for k in counters}
        requests = decode["hits"] + decode["late_hits"] + decode["misses"]
        prefill_requests = prefill["hits"] + prefill["late_hits"] + prefill["misses"]
        fallback = self.weight_bytes + tree_bytes(self.slots) + tree_bytes(self._kv)
        stats = {
            "policy": self.policy,
            "predictor": getattr(self.predictor, "name", None),
            "predictor_fused": self._scorer is not None,
            "cache_slots": self.num_slots,
            "expert_bytes": self.store.expert_bytes,
            "quantize_experts": self.store.quantize,
            "hit_rate": decode["hits"] / requests if requests else 1.0,
            "h2d_bytes": decode["h2d_bytes"],
            "stall_s": decode["stall_s"],
            "prefetch_precision": decode["prefetch_hits"] / decode["prefetches"] if decode["prefetches"] else 0.0,
            "decode_cache": decode,
            "prefill_hit_rate": prefill["hits"] / prefill_requests if prefill_requests else 1.0,
            "prefill_h2d_bytes": prefill["h2d_bytes"],
            "prefill_stall_s": prefill["stall_s"],
            "peak_device_bytes": device_peak_bytes(fallback),
            "host_memory_kind": self.store.memory_kind,
            "layer_compute_s": self._layer_compute_s,
            # decode steps run as one whole-token program, and those of them finished layer by layer after
            # a miss (scheduler.speculation)
            "speculated_tokens": self._spec_tokens,
            "speculation_redone": self._spec_redone,
            "speculation": self.speculation.as_dict(),
            "cache": total,
        }
        if isinstance(self.planner, Adaptive):
            stats["adaptive_horizon"] = self.planner.current_horizon
            stats["adaptive_width"] = self.planner.current_width
        if self.link is not None:
            stats["emulated_link"] = self.link.describe()
        return stats

    def generate(self, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int = 0, on_token=None):
        sampling = SamplingParams(temperature, top_p, top_k, seed)
        try:
            if self.policy == "oracle":  # a first run records the true routing; the measured run replays it
                self._new_cache(NoPrefetch(), LRU())
                generate_loop(self, self.cfg, prompt_ids, max_new_tokens, sampling, None)
                self.cache.close()
                future = [{(layer, int(e)) for e in experts} for layer, experts in self._requests]
                self._new_cache(OraclePlanner(future), Belady(future))
            return generate_loop(self, self.cfg, prompt_ids, max_new_tokens, sampling, on_token)
        finally:
            self.cache.close()


def distinct_sorted(ids: np.ndarray) -> np.ndarray:
    """The distinct values of `ids` (any shape), ascending: np.unique, with a cheaper path for one token's
    top-k (already distinct)."""
    flat = np.sort(ids.reshape(-1))
    if len(flat) <= 16 and (flat[1:] != flat[:-1]).all():
        return flat
    return np.unique(flat)


def kv_cache_bytes(model, max_len: int) -> int:
    shapes = jax.eval_shape(lambda: model.init_cache(1, max_len))
    return sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in jax.tree.leaves(shapes))

