"""Synthetic models at real sizes, and routing replayed from a recorded trace, for `bench.sizes`.

SYNTHETIC WEIGHTS. Nothing here is a trained model: every weight is random. Transfers and compute are
real-sized (same shapes, dtype and code paths as the converted release), the values are meaningless.

- `SyntheticModel.build(cfg)`: the non-expert weights (attention, norms, routers, shared experts,
  embedding, head) drawn at random directly on the device from `abstract_model(cfg)`'s leaf shapes;
  the routed experts as host arrays (pinned_host where the backend has it), one random buffer per
  weight kind copied once per expert, so peak host memory is about the experts once and no [E, ...]
  stack is ever materialised. `.engine(num_slots, policy)` assembles an `OffloadEngine` from the
  pieces; `.resident_engine()` builds a `ResidentEngine` with random expert stacks on the device.
- Routing: the synthetic router's choice is meaningless, so `Replay` (an `OffloadEngine.routing_override`)
  substitutes routing recorded from the trained default model (`predictors.trace` output, or a compact
  routing .npz made by `python -m bench.sizes --save-routing`), mapped onto the target's expert count
  and top-k by `map_routing`; without a trace, `synthetic_routing` draws a seeded Zipf-like routing
  with temporal reuse instead.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe.checkpoint import abstract_model, split_layer
from jaxmoe.config import ModelConfig
from jaxmoe.engine import ResidentEngine, flat_state, tree_bytes
from jaxmoe.errors import JaxmoeError
from jaxmoe.moe import ExpertWeight
from jaxmoe.expert_quant import check_quantize
from jaxmoe.moe import expert_shapes
from jaxmoe.offload import PREDICTOR_POLICIES, OffloadEngine, host_memory_kind, pack_expert
from predictors.base import FrequencyPredictor, PreviousTokenPredictor

NOTICE = ("SYNTHETIC WEIGHTS: every weight is random (real shapes, dtype and code paths; meaningless values); "
          "the routing is replayed, not computed by the model")
INIT_STD = 0.02


# ----------------------------------------------------------------------------------------------
# synthetic weights

def _leaf_kind(path) -> str:
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "scale":
        return "ones"  # RMSNorm weights
    if "bias" in name:
        return "zeros"
    return "normal"


POOL_SIZE = 1 << 22  # random values tiled into every weight: host memcpy speed, no per-shape compilation


@partial(jax.jit, static_argnames=("shape", "dtype"))
def _device_normal(key, shape, dtype):
    return (INIT_STD * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def random_tree(abstract_tree, seed: int, device, on_device: bool = False):
    """Device arrays of the abstract tree's shapes: N(0, 0.02^2) values for matrices (a seeded pool tiled over
    each array, offset per leaf; with `on_device`, drawn on the device: one compilation per distinct shape,
    no host copy), ones for norm scales, zeros for biases."""
    rng = np.random.default_rng(seed)
    pool = (INIT_STD * rng.standard_normal(POOL_SIZE, np.float32))
    sharding = jax.sharding.SingleDeviceSharding(device)
    counter = iter(range(1 << 30))
    base = jax.random.key(seed)

    def make(path, leaf):
        shape, dtype = tuple(leaf.shape), jnp.dtype(leaf.dtype)
        kind = _leaf_kind(path)
        if on_device and kind == "normal":
            with jax.default_device(device):
                out = _device_normal(jax.random.fold_in(base, next(counter)), shape, dtype)
            return out.block_until_ready()
        if kind == "ones":
            host = np.ones(shape, dtype)
        elif kind == "zeros":
            host = np.zeros(shape, dtype)
        else:
            size = int(np.prod(shape))
            start = (next(counter) * 7919) % POOL_SIZE
            host = np.resize(np.roll(pool, -start).astype(dtype), size).reshape(shape)
        out = jax.device_put(host, sharding)
        out.block_until_ready()
        return out

    return jax.tree_util.tree_map_with_path(make, abstract_tree)


class SyntheticExpertStore:
    """`ExpertStore`'s interface over random experts: `get((layer, e))` -> the packed expert [3*d*f]
    (`jaxmoe.offload.pack_expert`) as a host-memory jax array. One random expert, copied into each
    expert's own host array. quantize "int8" / "int4": packed as codes and scales (jaxmoe.expert_quant)."""

    def __init__(self, cfg: ModelConfig, dtype, device, seed: int = 0, progress: bool = False,
                 quantize: str | None = None):
        self.memory_kind = host_memory_kind(device)
        self.quantize = quantize
        host = jax.sharding.SingleDeviceSharding(device, memory_kind=self.memory_kind)
        shapes = expert_shapes(cfg)
        rng = np.random.default_rng(seed)
        np_dtype = jnp.dtype(dtype)
        buffers = {n: (INIT_STD * rng.standard_normal(shape, np.float32)).astype(np_dtype) for n, shape in shapes.items()}
        packed = pack_expert(buffers, np_dtype, quantize)
        self.experts: dict[tuple[int, int], jax.Array] = {}
        keys = [(layer, e) for layer in cfg.moe_layer_ids for e in range(cfg.num_experts)]
        for i, key in enumerate(keys):
            self.experts[key] = jax.device_put(packed, host)
            if progress and (i + 1) % max(1, len(keys) // 10) == 0:
                jax.block_until_ready(self.experts[key])
                print(f"  synthetic experts in {self.memory_kind}: {i + 1}/{len(keys)}", file=sys.stderr, flush=True)
        jax.block_until_ready(list(self.experts.values()))
        self.expert_bytes = packed.nbytes
        self.expert_shapes = {n: (shape, np_dtype) for n, shape in shapes.items()}
        self.host_bytes = self.expert_bytes * len(self.experts)

    def get(self, key):
        return self.experts[key]


@dataclass
class SyntheticModel:
    cfg: ModelConfig
    dtype: object
    device: object
    seed: int
    non_expert: dict  # pure-dict tree of device arrays, routed experts left out
    layer_parts: list
    globals_parts: dict
    store: SyntheticExpertStore | None

    @classmethod
    def build(cls, cfg: ModelConfig, seed: int = 0, device=None, with_store: bool = True, progress: bool = False,
              quantize: str | None = None):
        device = device or jax.devices()[0]
        dtype = jnp.dtype(cfg.dtype)
        graphdef, abstract_state = abstract_model(cfg, dtype)
        pure = abstract_state.to_pure_dict()
        abstract = {k: v for k, v in pure.items() if k != "layers"}
        abstract["layers"] = {}
        for i, tree in pure["layers"].items():
            abstract["layers"][i] = split_layer(tree)[0]
        non_expert = random_tree(abstract, seed, device)
        restored = jax.tree.map(lambda x: x, non_expert)  # same arrays, fresh containers
        for i, tree in pure["layers"].items():
            if split_layer(tree)[1] is not None:
                restored["layers"][i]["moe"]["experts"] = {n: jnp.zeros((0,), dtype) for n in expert_shapes(cfg)}
        nnx.replace_by_pure_dict(abstract_state, restored)
        model = nnx.merge(graphdef, abstract_state)
        layer_parts = []
        for layer in model.layers:  # as OffloadEngine.load
            g, experts_state, rest = nnx.split(layer, ExpertWeight, ...)
            static, leaves = flat_state(g, experts_state, rest)
            layer_parts.append((layer.is_moe, static, leaves, rest))
        g_norm, norm_state = nnx.split(model.final_norm)
        globals_parts = {"embedding": model.embed.embedding[...], "head": model.head_matrix(),
                         "norm": flat_state(g_norm, norm_state)}
        check_quantize(quantize, cfg.hidden_size, cfg.moe_intermediate_size)
        store = SyntheticExpertStore(cfg, dtype, device, seed, progress, quantize) if with_store else None
        return cls(cfg, dtype, device, seed, non_expert, layer_parts, globals_parts, store)

    @property
    def non_expert_bytes(self) -> int:
        return tree_bytes(self.non_expert)

    def engine(self, num_slots: int, policy: str = "on-demand", predictor="previous-token",
               link=None) -> OffloadEngine:
        """An OffloadEngine over these pieces. Predictor policies get `predictor`: an object, or previous-token
        (default), frequency, gate-lookahead (reads the random routers: says nothing about replayed routing),
        or a trained predictor directory."""
        if self.store is None:
            raise JaxmoeError("SyntheticModel built without an expert store")
        if num_slots < self.cfg.num_experts_per_tok:
            raise JaxmoeError(f"{num_slots} slots: fewer than one layer's top-k ({self.cfg.num_experts_per_tok})")
        num_slots = min(num_slots, self.cfg.num_experts * len(self.cfg.moe_layer_ids))
        built = None
        if policy in PREDICTOR_POLICIES:
            if predictor is not None and not isinstance(predictor, str):
                built = predictor  # a predictor object (e.g. ReplayLookahead)
            else:
                cls = {"previous-token": PreviousTokenPredictor, "frequency": FrequencyPredictor}.get(predictor or "previous-token")
                built = cls(len(self.cfg.moe_layer_ids), self.cfg.num_experts) if cls else None
        engine = OffloadEngine(self.cfg, self.store, self.layer_parts, self.globals_parts, num_slots, policy,
                               built, link, None, self.device)
        if policy in PREDICTOR_POLICIES and built is None and predictor not in (None, "gate-lookahead"):
            engine.predictor = engine.build_predictor(predictor)  # a trained predictor directory
        return engine

    def resident_bytes(self) -> int:
        return self.non_expert_bytes + (self.store.host_bytes if self.store else 0)

    def resident_engine(self) -> ResidentEngine:
        """Every weight on the device: the non-expert arrays shared with the offloaded engines, random
        expert stacks [E, ...] drawn on the device layer by layer."""
        cfg, dtype = self.cfg, self.dtype
        graphdef, abstract_state = abstract_model(cfg, dtype)
        pure = abstract_state.to_pure_dict()
        full = jax.tree.map(lambda x: x, self.non_expert)
        for i, tree in pure["layers"].items():
            experts = split_layer(tree)[1]
            if experts is not None:
                full["layers"][i]["moe"]["experts"] = random_tree(experts, self.seed + 1 + i, self.device, on_device=True)
        nnx.replace_by_pure_dict(abstract_state, full)
        return ResidentEngine(cfg, graphdef, abstract_state)


# ----------------------------------------------------------------------------------------------
# routing sources

@dataclass
class RoutingSource:
    """Recorded routing of a source model: expert_ids [N, L_s, k_s] over tokens of documents."""

    expert_ids: np.ndarray
    doc_id: np.ndarray
    num_experts: int
    description: str

    @property
    def num_layers(self) -> int:
        return self.expert_ids.shape[1]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[2]

    def documents(self) -> list[np.ndarray]:
        """Row indices of each document, in order (tokens of a document are stored in order)."""
        ids, starts = np.unique(self.doc_id, return_index=True)
        order = np.argsort(starts)
        return [np.flatnonzero(self.doc_id == ids[j]) for j in order]


def load_routing(path, split: str | None = "validation") -> RoutingSource:
    """A trace directory (`predictors.trace`; only expert_ids/doc_id are read) or a compact routing .npz."""
    path = Path(path)
    if path.is_file():
        with np.load(path) as z:
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
            return RoutingSource(z["expert_ids"].astype(np.int32), z["doc_id"].astype(np.int32),
                                 int(meta.get("num_experts", int(z["expert_ids"].max()) + 1)),
                                 meta.get("description", str(path)))
    from predictors.trace_format import read_manifest

    manifest = read_manifest(path)
    keep = {int(d) for d, info in manifest["documents"].items() if split is None or info["split"] == split}
    if not keep:  # no such split: every document
        keep, split = {int(d) for d in manifest["documents"]}, None
    ids, docs = [], []
    for name in manifest["shards"]:
        with np.load(path / name) as shard:
            doc = shard["doc_id"]
            rows = np.isin(doc, list(keep))
            if rows.any():
                ids.append(shard["expert_ids"][rows].astype(np.int32))
                docs.append(doc[rows].astype(np.int32))
    if not ids:
        raise JaxmoeError(f"{path}: no tokens in split {split!r}")
    model = manifest.get("model", {})
    desc = (f"trace {path} ({model.get('name', '?')}: {model.get('num_moe_layers', '?')} MoE layers x "
            f"{model.get('num_experts', '?')} experts, top-{model.get('top_k', '?')}; split {split or 'all'})")
    return RoutingSource(np.concatenate(ids), np.concatenate(docs), int(model.get("num_experts", 0)) or
                         int(max(a.max() for a in ids)) + 1, desc)


def save_routing(source: RoutingSource, path, **extra_meta) -> Path:
    """Compact routing file: expert_ids (uint8 where they fit) + doc_id + meta, under 1 MB instead of the trace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = source.expert_ids.astype(np.uint8 if source.num_experts <= 256 else np.int16)
    meta = {"num_experts": source.num_experts, "description": f"compact copy of {source.description}", **extra_meta}
    np.savez_compressed(path, expert_ids=ids, doc_id=source.doc_id.astype(np.int32), meta=np.array(json.dumps(meta)))
    return path


# ----------------------------------------------------------------------------------------------
# mapping a source routing onto the target's experts

MAPPING_DOC = (
    "target MoE layer p replays source layer p mod L_s; the source's E_s experts are split into E_s "
    "contiguous groups of the target's E_t experts (group of e = [floor(e*E_t/E_s), floor((e+1)*E_t/E_s)), at "
    "least one expert; several source experts share one target expert when E_t < E_s); each of a token's "
    "source experts, in the source's rank order, contributes m = ceil(k_t/k_s) members of its group (all of "
    "them if the group has <= m; else m consecutive members from an offset hashed from (the token's top "
    "partner source expert, p div L_s), so fine-grained target experts split a coarse source expert by "
    "context and every target expert is reachable); the first k_t distinct candidates are the token's "
    "experts, padded if collisions leave fewer with the next unused ids after the last one (mod E_t)")


def _mix(*values: int) -> int:
    h = 0x811C9DC5
    for v in values:
        h = ((h ^ (int(v) & 0xFFFFFFFF)) * 0x01000193) & 0xFFFFFFFF
        h ^= h >> 15
    return h


def map_token(src: np.ndarray, num_src_experts: int, num_experts: int, top_k: int, salt: int = 0) -> list[int]:
    """One token's source experts (rank order, [k_s]) -> its k_t distinct target experts (see MAPPING_DOC)."""
    k_s = len(src)
    m = -(-top_k // k_s)
    out: list[int] = []
    for rank, e in enumerate(int(x) for x in src):
        lo = e * num_experts // num_src_experts
        hi = max(lo + 1, (e + 1) * num_experts // num_src_experts)
        g = hi - lo
        if g <= m:
            picks = range(lo, hi)
        else:
            partner = int(src[1] if rank == 0 and k_s > 1 else src[0])
            start = _mix(partner, e, salt) % g
            picks = [lo + (start + j) % g for j in range(m)]
        for t in picks:
            if t not in out:
                out.append(t)
    out = out[:top_k]
    nxt = (out[-1] + 1) % num_experts if out else 0
    while len(out) < top_k:
        if nxt not in out:
            out.append(nxt)
        nxt = (nxt + 1) % num_experts
    return out


def map_routing(src_ids: np.ndarray, num_src_experts: int, num_experts: int, top_k: int, num_layers: int) -> np.ndarray:
    """src_ids [T, L_s, k_s] -> int32 [T, num_layers, top_k] target routing (MAPPING_DOC)."""
    t_len, l_src, _ = src_ids.shape
    if top_k > num_experts:
        raise JaxmoeError(f"top-k {top_k} exceeds {num_experts} experts")
    out = np.empty((t_len, num_layers, top_k), np.int32)
    cache: dict = {}
    for p in range(num_layers):
        sl, salt = p % l_src, p // l_src
        for t in range(t_len):
            key = (tuple(src_ids[t, sl]), salt)
            row = cache.get(key)
            if row is None:
                row = cache[key] = map_token(src_ids[t, sl], num_src_experts, num_experts, top_k, salt)
            out[t, p] = row
    return out


SYNTHETIC_ROUTING_DOC = ("seeded synthetic routing (no trace): per layer a random permutation of experts with "
                         "Zipf(alpha={alpha}) popularity; each token keeps each of the previous token's experts "
                         "at that layer with probability {reuse}, the rest drawn by popularity without replacement")


def synthetic_routing(num_tokens: int, num_layers: int, num_experts: int, top_k: int, seed: int,
                      alpha: float = 1.0, reuse: float = 0.3) -> np.ndarray:
    """int32 [T, L, k]: distinct experts per token (SYNTHETIC_ROUTING_DOC)."""
    rng = np.random.default_rng(seed)
    out = np.empty((num_tokens, num_layers, top_k), np.int32)
    for p in range(num_layers):
        perm = rng.permutation(num_experts)
        pop = 1.0 / np.arange(1, num_experts + 1) ** alpha
        pop = pop / pop.sum()
        prev: list[int] = []
        for t in range(num_tokens):
            chosen = [e for e in prev if rng.random() < reuse]
            weights = pop.copy()
            weights[[int(np.flatnonzero(perm == e)[0]) for e in chosen]] = 0  # not again
            rest = rng.choice(num_experts, size=top_k - len(chosen), replace=False, p=weights / weights.sum())
            chosen += [int(perm[r]) for r in rest]
            out[t, p] = chosen
            prev = chosen
    return out


def routing_stats(tables: list[np.ndarray], num_experts: int) -> dict:
    """Properties of replayed routing tables [T, L, k]: coverage of the experts, consecutive-token reuse,
    load skew (share of the busiest 10% of experts), distinct experts per token."""
    reuse, coverage, skew, distinct = [], [], [], []
    for table in tables:
        t_len, num_layers, k = table.shape
        for p in range(num_layers):
            col = table[:, p]
            counts = np.bincount(col.ravel(), minlength=num_experts)
            coverage.append(np.count_nonzero(counts) / num_experts)
            top = np.sort(counts)[::-1][: max(1, num_experts // 10)]
            skew.append(top.sum() / counts.sum())
            for t in range(t_len):
                distinct.append(len(set(col[t].tolist())))
                if t:
                    reuse.append(len(set(col[t].tolist()) & set(col[t - 1].tolist())) / k)
    return {
        "consecutive_token_reuse": float(np.mean(reuse)) if reuse else None,
        "reuse_if_random": tables[0].shape[2] / num_experts,
        "expert_coverage_per_layer": float(np.mean(coverage)),
        "top10pct_expert_share": float(np.mean(skew)),
        "distinct_experts_per_token_min": int(min(distinct)),
    }


class Replay:
    """`OffloadEngine.routing_override`: token position p of the selected prompt -> row p of its table.

    tables: per prompt, int32 [T, num_moe_layers, k] covering at least every prompt + decode position."""

    def __init__(self, tables: list[np.ndarray], moe_layer_ids):
        self.tables = tables
        self.pos_of_layer = {layer: p for p, layer in enumerate(moe_layer_ids)}
        self.current = 0
        self.last_position = 0  # the last token position routed (read by ReplayLookahead)

    def select(self, index: int) -> None:
        self.current = index

    def __call__(self, layer: int, positions: np.ndarray, ids_host: np.ndarray) -> np.ndarray:
        table = self.tables[self.current]
        self.last_position = int(positions[-1])
        rows = np.minimum(positions, len(table) - 1)  # padded prefill rows (invalid, ignored) clamp
        out = table[rows, self.pos_of_layer[layer]]
        if out.shape != ids_host.shape:
            raise JaxmoeError(f"replayed routing {out.shape} does not match the model's {ids_host.shape}")
        return out

    def decode_routing(self, position: int) -> np.ndarray:
        """int32[num_moe_layers, k]: every MoE layer's routing of decode position `position` (what a
        whole-token decode step takes, see `OffloadEngine._speculate`)."""
        table = self.tables[self.current]
        self.last_position = position
        return table[min(position, len(table) - 1)]

    def decode_requests(self, index: int, first: int, count: int) -> list[list[set]]:
        """Per decode token (positions first .. first+count-1): per MoE layer, the set of (layer, expert) keys."""
        table = self.tables[index]
        layers = list(self.pos_of_layer)
        return [[{(layer, int(e)) for e in table[min(pos, len(table) - 1), p]} for p, layer in enumerate(layers)]
                for pos in range(first, first + count)]


# gate-lookahead recall@k of the trained default model by horizon 1..3 (traces/default/locality/locality.json,
# "baselines" -> "recall_at_k" -> "gate-lookahead", 47k validation tokens); horizon 4 extrapolated (x0.83 per step)
DEFAULT_LOOKAHEAD_RECALL = (0.730, 0.592, 0.492, 0.41)


def lookahead_recall(trace_path) -> tuple[tuple[float, ...], str]:
    """(recall@k by horizon, where from): the trace's locality report (or what a compact routing file copied
    from it) when present, else the defaults above."""
    if trace_path is not None and Path(trace_path).is_file():
        with np.load(trace_path) as z:
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
        if "lookahead_recall" in meta:
            return tuple(meta["lookahead_recall"]), f"{trace_path} ({meta.get('lookahead_recall_from', '?')})"
        return DEFAULT_LOOKAHEAD_RECALL, "the default model's measured gate-lookahead recall (constants in bench/synthetic.py)"
    path = Path(trace_path) / "locality" / "locality.json" if trace_path is not None else None
    if path is not None and path.is_file():
        try:
            measured = json.loads(path.read_text())["baselines"]["recall_at_k"]["gate-lookahead"]
            values = [float(measured[str(h)]) for h in sorted(int(h) for h in measured)]
            while len(values) < 4:
                values.append(values[-1] * 0.83)
            return tuple(values[:4]), str(path)
        except (KeyError, ValueError, TypeError):
            pass
    return DEFAULT_LOOKAHEAD_RECALL, "the default model's measured gate-lookahead recall (constants in bench/synthetic.py)"


class ReplayLookahead:
    """Predictor for replayed routing whose accuracy matches the trained model's gate-lookahead predictor.

    The synthetic model's routers are random, so no real predictor says anything about the replayed
    routing. This one reads the replayed *future* routing and degrades it: for horizon j each true expert
    stays in the predicted top-k with probability recall[j-1], each dropped one is replaced by a random
    wrong expert, so its recall@k equals the measured gate-lookahead recall of the default model at that
    horizon; ranks k..2k-1 are random wrong experts too (recall@2k = recall@k: conservative). Seeded,
    precomputed per prompt (no cost on the decode path beyond a lookup). Positions past the last MoE layer
    wrap to the next token."""

    name = "replay-lookahead"

    def __init__(self, replay: Replay, num_experts: int, recall=DEFAULT_LOOKAHEAD_RECALL, seed: int = 0,
                 horizon: int = 4):
        self.replay, self.num_experts, self.recall, self.seed = replay, num_experts, tuple(recall), seed
        self.num_positions = len(replay.pos_of_layer)
        self.horizon = horizon
        self._ranked: dict[int, np.ndarray] = {}
        self._scores: dict[int, np.ndarray] = {}

    def reset(self) -> None:
        pass

    def observe(self, pos, expert_ids) -> None:
        pass

    def ranked(self, index: int) -> np.ndarray:
        """int32 [T, L, horizon, 2k]: predicted experts, best first, for prompt `index`."""
        if index not in self._ranked:
            table = self.replay.tables[index]
            t_len, num_pos, k = table.shape
            width = min(2 * k, self.num_experts)
            rng = np.random.default_rng((self.seed, index))
            out = np.empty((t_len, num_pos, self.horizon, width), np.int32)
            for t in range(t_len):
                for pos in range(num_pos):
                    for j in range(1, self.horizon + 1):
                        q = pos + j
                        true = table[min(t + q // num_pos, t_len - 1), q % num_pos]
                        keep = rng.random(k) < self.recall[min(j, len(self.recall)) - 1]
                        wrong = np.setdiff1d(np.arange(self.num_experts), true)
                        wrong = rng.permutation(wrong)[: width - int(keep.sum())]
                        kept = true[keep]
                        out[t, pos, j - 1] = np.concatenate([kept, wrong])[:width]
            self._ranked[index] = out
        return self._ranked[index]

    def scores(self, index: int) -> np.ndarray:
        """float32 [T, L, horizon, E], read-only: `ranked(index)` as scores (2k, 2k - 1, ..., 1 down the
        ranking, 0 elsewhere), built once per prompt so that `predict` is a lookup."""
        if index not in self._scores:
            ranked = self.ranked(index)
            t_len, num_pos, horizon, width = ranked.shape
            scores = np.zeros((t_len, num_pos, horizon, self.num_experts), np.float32)
            np.put_along_axis(scores, ranked.astype(np.int64),
                              np.broadcast_to(np.arange(width, 0, -1, dtype=np.float32), ranked.shape), axis=3)
            scores.flags.writeable = False
            self._scores[index] = scores
        return self._scores[index]

    def predict(self, pos, hidden, router_logits, horizon):
        scores = self.scores(self.replay.current)
        return scores[min(self.replay.last_position, len(scores) - 1), pos, :horizon]  # [H, E]


class AllHits:
    """`routing_override` that sends every token to experts 0..k-1 of each layer: with k slots per MoE layer
    every request after the first hits, so a run measures the offloaded engine's pure compute time."""

    def __init__(self, top_k: int, num_moe_layers: int):
        self.top_k, self.num_moe_layers = top_k, num_moe_layers

    def __call__(self, layer, positions, ids_host):
        return np.broadcast_to(np.arange(self.top_k, dtype=np.int32), ids_host.shape).copy()

    def decode_routing(self, position: int) -> np.ndarray:
        return np.broadcast_to(np.arange(self.top_k, dtype=np.int32), (self.num_moe_layers, self.top_k)).copy()


def routing_tables(source: RoutingSource | None, cfg: ModelConfig, num_prompts: int, tokens_per_prompt: int,
                   seed: int = 0) -> tuple[list[np.ndarray], dict]:
    """Per prompt, the target routing [tokens_per_prompt, num_moe_layers, k] and a description."""
    num_layers, e_t, k_t = len(cfg.moe_layer_ids), cfg.num_experts, cfg.num_experts_per_tok
    if source is None:
        tables = [synthetic_routing(tokens_per_prompt, num_layers, e_t, k_t, seed + i) for i in range(num_prompts)]
        info = {"source": "synthetic", "mapping": SYNTHETIC_ROUTING_DOC.format(alpha=1.0, reuse=0.3),
                "notice": "NO TRACE: routing is synthetic (Zipf popularity + temporal reuse), not recorded"}
    else:
        docs = source.documents()
        long_enough = [d for d in docs if len(d) >= tokens_per_prompt]
        pool = long_enough or docs
        tables, used = [], []
        for i in range(num_prompts):
            rows = pool[i % len(pool)]
            if len(rows) < tokens_per_prompt:  # short documents: repeat (noted below)
                rows = np.resize(rows, tokens_per_prompt)
            rows = rows[:tokens_per_prompt]
            used.append(int(source.doc_id[rows[0]]))
            tables.append(map_routing(source.expert_ids[rows], source.num_experts, e_t, k_t, num_layers))
        info = {"source": source.description, "documents": used,
                "source_shape": f"{source.num_layers} MoE layers x {source.num_experts} experts, top-{source.top_k}",
                "target_shape": f"{num_layers} MoE layers x {e_t} experts, top-{k_t}",
                "mapping": MAPPING_DOC, "documents_repeated": not long_enough}
        source_stats = routing_stats([source.expert_ids[pool[i % len(pool)][:tokens_per_prompt]]
                                      for i in range(num_prompts)], source.num_experts)
        info["source_stats"] = source_stats
    info["stats"] = routing_stats(tables, e_t)
    return tables, info


def replayed_routing(cfg: ModelConfig, source: RoutingSource | None, trace_path, predictor: str, num_prompts: int,
                     prompt_tokens: int, tokens: int, seed: int):
    """Random prompts and their replayed routing (`routing_tables`) -> (prompts, Replay, the predictor for
    the prefetching policies: a ReplayLookahead for "replay-lookahead", else the spec string, routing info)."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, cfg.vocab_size, prompt_tokens).tolist() for _ in range(num_prompts)]
    tables, routing = routing_tables(source, cfg, num_prompts, prompt_tokens + tokens, seed)
    replay = Replay(tables, cfg.moe_layer_ids)
    if predictor == "replay-lookahead":
        recall, recall_from = lookahead_recall(trace_path)
        spec = predictor
        predictor = ReplayLookahead(replay, cfg.num_experts, recall, seed)
        for i in range(num_prompts):  # precomputed now, not inside a timed generation
            predictor.ranked(i)
        routing["predictor"] = (f"{spec}: the replayed future routing degraded to recall@k "
                                f"{', '.join(f'{r:.2f}' for r in recall)} at horizons 1-{len(recall)} (from {recall_from})")
    else:
        routing["predictor"] = predictor + (" (reads the random routers: meaningless here)" if predictor == "gate-lookahead" else "")
    return prompts, replay, predictor, routing


def host_bytes_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def layers_fitting_host(cfg: ModelConfig, expert_bytes: int, fraction: float = 0.85) -> int | None:
    """How many decoder layers keep the experts within `fraction` of available host memory (None: all fit)."""
    avail = host_bytes_available()
    if avail is None:
        return None
    per_layer = cfg.num_experts * expert_bytes
    total = per_layer * len(cfg.moe_layer_ids)
    if total <= fraction * avail:
        return None
    fit_moe = max(1, int(fraction * avail // per_layer))
    return cfg.moe_layer_ids[min(fit_moe, len(cfg.moe_layer_ids)) - 1] + 1
