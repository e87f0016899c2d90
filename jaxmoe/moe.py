"""The MoE block (router + routed experts + optional shared expert) and the routed-expert kernels.

Routed-expert weights are stacked over a leading "slot" axis: `w_gate, w_up: [S, d, f]`,
`w_down: [S, f, d]` (arrays, or `jaxmoe.expert_quant.QuantizedStack`s the offloaded kernels index alike), and
where the model has them (GPT-OSS) the biases `bias = (b_gate [S, f], b_up [S, f], b_down [S, d])`. The FFN
each expert applies is an `ExpertFFN` (static). In the resident model slot == expert id; the offloading
runtime passes a fixed-size pool of device slots and slot ids instead. Interchangeable kernels:
  - `experts_gather`: gathers each token's k expert matrices (few tokens: decode).
  - `experts_grouped`: sorts token-expert pairs by slot and runs `jax.lax.ragged_dot` (resident prefill).
  - `experts_bucketed`: sorts pairs into a [groups, rows] table sized on the host and scans one FFN per
    used slot; cost independent of the number of slots (offloaded prefill over a large slot pool).
  - `experts_reference`: a naive per-expert loop, the reference the fast paths are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe.config import ModelConfig
from jaxmoe.expert_quant import weight_row
from jaxmoe.layers import SwiGLUMLP, linear, normal_param
from jaxmoe.routing import RouterSpec, router_logits, select_experts

GATHER_MAX_TOKENS = 8  # up to this many tokens the gather kernel is used, above it the grouped one
MIN_BUCKET_ROWS = 8  # experts_bucketed: smallest rows-per-group bucket


class ExpertWeight(nnx.Param):
    """A routed-expert weight stacked over experts (leading axis). Offloading keeps these on the host."""


@dataclass(frozen=True, slots=True)
class ExpertFFN:
    """The function one routed expert applies (hashable: a static jit argument).

    "swiglu" (Mixtral, Qwen, DeepSeek, GLM, OLMoE): silu(x Wg) * (x Wu), then Wd.
    "gpt_oss": g = min(x Wg + bg, limit), u = clip(x Wu + bu, -limit, limit), then
    (g * sigmoid(alpha * g) * (u + 1)) Wd + bd, as transformers' GptOssExperts.
    Biases are added wherever the model has them (`bias` of the kernels), for either activation."""

    activation: str = "swiglu"
    alpha: float = 1.702
    limit: float = 7.0

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "ExpertFFN":
        return cls(cfg.expert_activation, float(cfg.swiglu_alpha), float(cfg.swiglu_limit))

    def glu(self, gate, up):
        """gate, up: [..., f] (x Wg + bg, x Wu + bu) -> [..., f], in their dtype."""
        if self.activation == "swiglu":
            return jax.nn.silu(gate) * up
        gate = jnp.minimum(gate, self.limit)
        up = jnp.clip(up, -self.limit, self.limit)
        return gate * jax.nn.sigmoid(gate * self.alpha) * (up + 1)


SWIGLU = ExpertFFN()
EXPERT_NAMES = ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")  # canonical order; biases optional


def expert_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{name: shape} of one routed expert's tensors, in EXPERT_NAMES order (biases only where the model has them)."""
    d, f = cfg.hidden_size, cfg.moe_intermediate_size
    shapes = {"w_gate": (d, f), "w_up": (d, f), "w_down": (f, d)}
    if cfg.expert_bias:
        shapes.update(b_gate=(f,), b_up=(f,), b_down=(d,))
    return shapes


def slot_bias(slots: dict):
    """Slot buffers {name: [S, ...]} -> (b_gate, b_up, b_down) or None (the kernels' `bias`)."""
    return (slots["b_gate"], slots["b_up"], slots["b_down"]) if "b_gate" in slots else None


def expert_ffn(x, w_gate, w_up, w_down, ffn: ExpertFFN = SWIGLU, bias=None):
    """One expert over rows x: [R, d]; w_gate, w_up: [d, f]; w_down: [f, d]; bias: (b_gate [f], b_up [f],
    b_down [d]) or None -> [R, d]."""
    b_gate, b_up, b_down = (None,) * 3 if bias is None else bias
    return linear(ffn.glu(linear(x, w_gate, b_gate), linear(x, w_up, b_up)), w_down, b_down)


def _rows(bias, index):
    """bias: (b_gate, b_up, b_down) stacked over slots, or None -> the rows `index` of each (or None)."""
    return None if bias is None else tuple(b[index] for b in bias)


def combine_pairs(y, weights, out_dtype=None):
    """y: [N, k, d] each token's k expert outputs (unweighted); weights: [N, k] -> [N, d] in `out_dtype`
    (default y's dtype; float32 for partial sums that are added up before rounding).

    Every kernel ends here, so a token's k contributions are always summed in routing order, in
    float32, and rounded once: the result cannot depend on which slot holds which expert (the slot
    assignment is timing-dependent in the offloaded runtime) or on how a kernel groups the pairs."""
    out = jnp.einsum("nkd,nk->nd", y, weights.astype(y.dtype), preferred_element_type=jnp.float32)
    return out.astype(out_dtype or y.dtype)


def experts_gather(x, slot_ids, weights, w_gate, w_up, w_down, out_dtype=None, ffn: ExpertFFN = SWIGLU, bias=None):
    """x: [N, d]; slot_ids: int32[N, k]; weights: [N, k]; w_*: [S, ...]; bias: (b_gate, b_up, b_down) [S, ...]
    or None -> [N, d] (`combine_pairs`)."""
    wg, wu, wd = w_gate[slot_ids], w_up[slot_ids], w_down[slot_ids]  # [N, k, d, f], [N, k, f, d]
    gate = jnp.einsum("nd,nkdf->nkf", x, wg.astype(x.dtype))
    up = jnp.einsum("nd,nkdf->nkf", x, wu.astype(x.dtype))
    b_gate, b_up, b_down = (None,) * 3 if bias is None else (b.astype(x.dtype) for b in _rows(bias, slot_ids))
    if bias is not None:
        gate, up = gate + b_gate, up + b_up
    y = jnp.einsum("nkf,nkfd->nkd", ffn.glu(gate, up), wd.astype(x.dtype))  # [N, k, d]
    if bias is not None:
        y = y + b_down
    return combine_pairs(y, weights, out_dtype)


def experts_grouped(x, slot_ids, weights, w_gate, w_up, w_down, out_dtype=None, ffn: ExpertFFN = SWIGLU, bias=None):
    """Same contract as `experts_gather`; groups token-expert pairs by slot and uses ragged_dot."""
    n, k = slot_ids.shape
    num_slots = w_gate.shape[0]
    flat_slots = slot_ids.reshape(-1)  # [N*k]
    order = jnp.argsort(flat_slots, stable=True)
    token_of = order // k  # [N*k]
    xs = x[token_of]  # [N*k, d]
    group_sizes = jnp.bincount(flat_slots, length=num_slots).astype(jnp.int32)
    gate = jax.lax.ragged_dot(xs, w_gate.astype(x.dtype), group_sizes)
    up = jax.lax.ragged_dot(xs, w_up.astype(x.dtype), group_sizes)
    if bias is not None:
        b_gate, b_up, b_down = (b.astype(x.dtype) for b in _rows(bias, flat_slots[order]))  # [N*k, ...]
        gate, up = gate + b_gate, up + b_up
    y = jax.lax.ragged_dot(ffn.glu(gate, up), w_down.astype(x.dtype), group_sizes)  # [N*k, d], sorted by slot
    if bias is not None:
        y = y + b_down
    pairs = jnp.zeros_like(y).at[order].set(y)  # back in (token, rank) order: `order` is a permutation
    return combine_pairs(pairs.reshape(n, k, -1), weights, out_dtype)


def plan_buckets(slot_ids, num_groups: int | None = None) -> tuple[int, int]:
    """Host side of `experts_bucketed`: slot_ids int[N, k] (numpy, -1 = skipped) -> (num_groups,
    rows_per_group): the number of distinct slots used (or the given fixed `num_groups`, which must be
    at least that) and the largest pair count of one slot, rounded up to powers of two (at least
    MIN_BUCKET_ROWS rows) so few shapes compile."""
    flat = np.asarray(slot_ids).reshape(-1)
    used = flat[flat >= 0]
    counts = np.unique(used, return_counts=True)[1] if used.size else np.zeros(1, np.int64)
    pow2 = lambda n: 1 << max(0, int(n) - 1).bit_length()  # noqa: E731
    if num_groups is None:
        num_groups = pow2(max(1, len(counts)))
    elif num_groups < len(counts):
        raise ValueError(f"num_groups {num_groups} < {len(counts)} distinct slots")
    return num_groups, max(MIN_BUCKET_ROWS, pow2(counts.max()))


def experts_bucketed(x, slot_ids, weights, w_gate, w_up, w_down, num_groups: int, rows_per_group: int,
                     out_dtype=None, ffn: ExpertFFN = SWIGLU, bias=None):
    """Same contract as `experts_gather` (slot_ids -1: pair skipped), at a cost independent of the number of
    slots S: token-expert pairs are sorted by slot into a table of `num_groups` groups x `rows_per_group`
    rows, and a scan runs one FFN per used slot over its rows ([R, d] @ [d, f]; unused groups skipped).

    XLA lowers `ragged_dot` on CPU and (without cuDNN's path) on GPU to a dense product against every
    group, O(S) -- fatal over a pool of hundreds of slots. Here the work is num_groups x rows_per_group
    rows. The caller must guarantee at most `num_groups` distinct slots and at most `rows_per_group`
    pairs per slot (`plan_buckets`, from the routing the offloading runtime already has on the host);
    pairs beyond either are dropped."""
    n, k = slot_ids.shape
    num_slots = w_gate.shape[0]
    pairs = n * k
    flat = slot_ids.reshape(-1)
    key = jnp.where(flat >= 0, flat, num_slots)  # skipped pairs sort last
    order = jnp.argsort(key, stable=True)  # [P]
    sorted_key = key[order]
    index = jnp.arange(pairs)
    is_start = jnp.concatenate([jnp.ones(1, bool), sorted_key[1:] != sorted_key[:-1]])
    group = jnp.cumsum(is_start) - 1  # group of each sorted pair
    row = index - jax.lax.cummax(jnp.where(is_start, index, 0))  # its row within the group
    keep = (sorted_key < num_slots) & (group < num_groups) & (row < rows_per_group)
    table = jnp.full((num_groups, rows_per_group), -1, jnp.int32)
    table = table.at[jnp.where(keep, group, num_groups), row].set(order.astype(jnp.int32), mode="drop")
    group_slot = jnp.full((num_groups,), -1, jnp.int32)
    group_slot = group_slot.at[jnp.where(keep & is_start, group, num_groups)].set(sorted_key.astype(jnp.int32), mode="drop")

    def one_group(pair_out, slot_and_rows):
        slot, rows = slot_and_rows

        def run(pair_out):
            present = rows >= 0
            token = jnp.where(present, rows, 0) // k
            w = [weight_row(m, slot) for m in (w_gate, w_up, w_down)]
            y = expert_ffn(x[token], *w, ffn, _rows(bias, slot))  # [R, d]
            return pair_out.at[jnp.where(present, rows, pairs)].set(y, mode="drop")  # each pair written once

        return jax.lax.cond(slot >= 0, run, lambda pair_out: pair_out, pair_out), None

    pair_out, _ = jax.lax.scan(one_group, jnp.zeros((pairs, x.shape[1]), x.dtype), (group_slot, table))
    # skipped pairs (and any dropped beyond the table) keep zeros; their weight is zeroed too
    return combine_pairs(pair_out.reshape(n, k, -1), jnp.where(slot_ids >= 0, weights, 0), out_dtype)


def experts_reference(x, slot_ids, weights, w_gate, w_up, w_down, ffn: ExpertFFN = SWIGLU, bias=None):
    """Naive reference: every slot's FFN over every token, masked by the routing. O(S) compute."""
    out = jnp.zeros_like(x)
    for s in range(w_gate.shape[0]):
        token_weight = jnp.where(slot_ids == s, weights, 0).sum(-1)  # [N]
        y = expert_ffn(x, w_gate[s], w_up[s], w_down[s], ffn, _rows(bias, s))
        out = out + y * token_weight[:, None].astype(x.dtype)
    return out


def experts_capacity(x, slot_ids, weights, w_gate, w_up, w_down, capacity_factor: float = 2.0, ffn: ExpertFFN = SWIGLU,
                     bias=None):
    """Training kernel (GShard-style): token-expert pairs scattered into per-slot buffers [S, C, d]
    with C = ceil(capacity_factor * N * k / S), one batched matmul per weight, gathered back.
    Pairs beyond a slot's capacity are dropped (standard in MoE training; the load-balancing loss
    keeps drops rare). Never used for inference, which must not drop tokens."""
    n, k = slot_ids.shape
    num_slots, d = w_gate.shape[0], x.shape[1]
    capacity = max(1, int(-(-capacity_factor * n * k // num_slots)))
    flat = slot_ids.reshape(-1)  # [N*k]
    onehot = jax.nn.one_hot(flat, num_slots, dtype=jnp.int32)  # [N*k, S]
    rank = (jnp.cumsum(onehot, axis=0) - 1)[jnp.arange(n * k), flat]  # position of each pair in its slot
    keep = rank < capacity
    row = jnp.where(keep, flat * capacity + rank, num_slots * capacity)  # overflow -> a dump row
    token_of = jnp.arange(n * k) // k
    buf = jnp.zeros((num_slots * capacity + 1, d), x.dtype).at[row].set(x[token_of])
    buf = buf[:-1].reshape(num_slots, capacity, d)
    gate = jnp.einsum("scd,sdf->scf", buf, w_gate.astype(x.dtype))
    up = jnp.einsum("scd,sdf->scf", buf, w_up.astype(x.dtype))
    b_gate, b_up, b_down = (None,) * 3 if bias is None else (b.astype(x.dtype)[:, None] for b in bias)
    if bias is not None:
        gate, up = gate + b_gate, up + b_up
    y = jnp.einsum("scf,sfd->scd", ffn.glu(gate, up), w_down.astype(x.dtype))
    if bias is not None:
        y = y + b_down
    y = y.reshape(num_slots * capacity, d)
    y = jnp.concatenate([y, jnp.zeros((1, d), y.dtype)])[row]  # [N*k, d], dropped pairs -> 0
    y = y * (weights.reshape(-1) * keep)[:, None].astype(y.dtype)
    return jnp.zeros_like(x).at[token_of].add(y)


EXPERT_KERNELS = {"gather": experts_gather, "grouped": experts_grouped, "reference": experts_reference,
                  "capacity": experts_capacity}


def routed_experts(x, slot_ids, weights, w_gate, w_up, w_down, kernel: str = "auto", out_dtype=None,
                   ffn: ExpertFFN = SWIGLU, bias=None):
    """Dispatches to a kernel; "auto" picks gather for <= GATHER_MAX_TOKENS tokens, else grouped.
    out_dtype (gather and grouped only): see `combine_pairs`."""
    if kernel == "auto":
        kernel = "gather" if x.shape[0] <= GATHER_MAX_TOKENS else "grouped"
    extra = {} if out_dtype is None else {"out_dtype": out_dtype}
    return EXPERT_KERNELS[kernel](x, slot_ids, weights, w_gate, w_up, w_down, ffn=ffn, bias=bias, **extra)


class RoutedExperts(nnx.Module):
    """All routed experts of one layer, stacked: w_gate/w_up [E, d, f], w_down [E, f, d]; with `bias`,
    b_gate/b_up [E, f], b_down [E, d]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, dtype, rngs: nnx.Rngs,
                 bias: bool = False):
        e, d, f = num_experts, hidden_size, intermediate_size
        self.w_gate = ExpertWeight(normal_param(rngs, (e, d, f), dtype)[...])
        self.w_up = ExpertWeight(normal_param(rngs, (e, d, f), dtype)[...])
        self.w_down = ExpertWeight(normal_param(rngs, (e, f, d), dtype)[...])
        if bias:
            self.b_gate = ExpertWeight(jnp.zeros((e, f), dtype))
            self.b_up = ExpertWeight(jnp.zeros((e, f), dtype))
            self.b_down = ExpertWeight(jnp.zeros((e, d), dtype))

    def bias(self):
        """(b_gate, b_up, b_down) or None."""
        return (self.b_gate[...], self.b_up[...], self.b_down[...]) if hasattr(self, "b_gate") else None


class MoEBlock(nnx.Module):
    """Router + routed experts + optional (gated) shared expert."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.spec = RouterSpec.from_config(cfg)
        self.ffn = ExpertFFN.from_config(cfg)
        self.router = normal_param(rngs, (d, cfg.num_experts), dtype)
        if cfg.router_logit_bias:
            self.router_logit_bias = nnx.Param(jnp.zeros((cfg.num_experts,), dtype))
        if cfg.router_bias:
            self.router_bias = nnx.Param(jnp.zeros((cfg.num_experts,), jnp.float32))
        self.experts = RoutedExperts(cfg.num_experts, d, cfg.moe_intermediate_size, dtype, rngs, cfg.expert_bias)
        if cfg.shared_intermediate_size:
            self.shared = SwiGLUMLP(d, cfg.shared_intermediate_size, dtype, rngs)
            if cfg.shared_expert_gated:
                self.shared_gate = normal_param(rngs, (d, 1), dtype)

    def route(self, x):
        """x: [N, d] -> (expert_ids int32[N, k], expert_weights float32[N, k], logits float32[N, E])."""
        logit_bias = self.router_logit_bias[...] if hasattr(self, "router_logit_bias") else None
        logits = router_logits(x, self.router[...], logit_bias)
        bias = self.router_bias[...] if hasattr(self, "router_bias") else None
        ids, weights = select_experts(logits, self.spec, bias)
        return ids, weights, logits

    def shared_output(self, x):
        """x: [N, d] -> [N, d]: the shared expert's contribution (zeros if the model has none)."""
        if not hasattr(self, "shared"):
            return jnp.zeros_like(x)
        y = self.shared(x)
        if hasattr(self, "shared_gate"):
            y = jax.nn.sigmoid(linear(x, self.shared_gate[...])) * y
        return y

    def __call__(self, x, kernel: str = "auto"):
        """x: [B, T, d] -> ([B, T, d], routing dict of [B*T, ...] arrays)."""
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        ids, weights, logits = self.route(flat)
        w = self.experts
        routed = routed_experts(flat, ids, weights, w.w_gate[...], w.w_up[...], w.w_down[...], kernel, ffn=self.ffn,
                                bias=w.bias())
        out = routed + self.shared_output(flat)
        return out.reshape(b, t, d), {"expert_ids": ids, "expert_weights": weights, "router_logits": logits}
