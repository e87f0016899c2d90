"""The MoE block (router + routed experts + optional shared expert) and the routed-expert kernels.

Routed-expert weights are stacked over a leading "slot" axis: `w_gate, w_up: [S, d, f]`,
`w_down: [S, f, d]`. In the resident model slot == expert id; the offloading runtime passes a
fixed-size pool of device slots and slot ids instead. Three interchangeable kernels:
  - `experts_gather`: gathers each token's k expert matrices (few tokens: decode).
  - `experts_grouped`: sorts token-expert pairs by slot and runs `jax.lax.ragged_dot` (prefill).
  - `experts_reference`: a naive per-expert loop, the reference the fast paths are tested against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.config import ModelConfig
from jaxmoe.layers import SwiGLUMLP, linear, normal_param, swiglu
from jaxmoe.routing import RouterSpec, router_logits, select_experts

GATHER_MAX_TOKENS = 8  # up to this many tokens the gather kernel is used, above it the grouped one


class ExpertWeight(nnx.Param):
    """A routed-expert weight stacked over experts (leading axis). Offloading keeps these on the host."""


def experts_gather(x, slot_ids, weights, w_gate, w_up, w_down):
    """x: [N, d]; slot_ids: int32[N, k]; weights: [N, k]; w_*: [S, ...] -> [N, d]."""
    wg, wu, wd = w_gate[slot_ids], w_up[slot_ids], w_down[slot_ids]  # [N, k, d, f], [N, k, f, d]
    h = jax.nn.silu(jnp.einsum("nd,nkdf->nkf", x, wg.astype(x.dtype)))
    h = h * jnp.einsum("nd,nkdf->nkf", x, wu.astype(x.dtype))
    y = jnp.einsum("nkf,nkfd->nkd", h, wd.astype(x.dtype))  # [N, k, d]
    return jnp.einsum("nkd,nk->nd", y, weights.astype(x.dtype))


def experts_grouped(x, slot_ids, weights, w_gate, w_up, w_down):
    """Same contract as `experts_gather`; groups token-expert pairs by slot and uses ragged_dot."""
    n, k = slot_ids.shape
    num_slots = w_gate.shape[0]
    flat_slots = slot_ids.reshape(-1)  # [N*k]
    order = jnp.argsort(flat_slots, stable=True)
    token_of = order // k  # [N*k]
    xs = x[token_of]  # [N*k, d]
    group_sizes = jnp.bincount(flat_slots, length=num_slots).astype(jnp.int32)
    h = jax.nn.silu(jax.lax.ragged_dot(xs, w_gate.astype(x.dtype), group_sizes))
    h = h * jax.lax.ragged_dot(xs, w_up.astype(x.dtype), group_sizes)
    y = jax.lax.ragged_dot(h, w_down.astype(x.dtype), group_sizes)  # [N*k, d]
    y = y * weights.reshape(-1)[order][:, None].astype(y.dtype)
    return jnp.zeros_like(x).at[token_of].add(y)


def experts_reference(x, slot_ids, weights, w_gate, w_up, w_down):
    """Naive reference: every slot's FFN over every token, masked by the routing. O(S) compute."""
    out = jnp.zeros_like(x)
    for s in range(w_gate.shape[0]):
        token_weight = jnp.where(slot_ids == s, weights, 0).sum(-1)  # [N]
        out = out + swiglu(x, w_gate[s], w_up[s], w_down[s]) * token_weight[:, None].astype(x.dtype)
    return out


def experts_capacity(x, slot_ids, weights, w_gate, w_up, w_down, capacity_factor: float = 2.0):
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
    h = jax.nn.silu(jnp.einsum("scd,sdf->scf", buf, w_gate.astype(x.dtype)))
    h = h * jnp.einsum("scd,sdf->scf", buf, w_up.astype(x.dtype))
    y = jnp.einsum("scf,sfd->scd", h, w_down.astype(x.dtype)).reshape(num_slots * capacity, d)
    y = jnp.concatenate([y, jnp.zeros((1, d), y.dtype)])[row]  # [N*k, d], dropped pairs -> 0
    y = y * (weights.reshape(-1) * keep)[:, None].astype(y.dtype)
    return jnp.zeros_like(x).at[token_of].add(y)


EXPERT_KERNELS = {"gather": experts_gather, "grouped": experts_grouped, "reference": experts_reference,
                  "capacity": experts_capacity}


def routed_experts(x, slot_ids, weights, w_gate, w_up, w_down, kernel: str = "auto"):
    """Dispatches to a kernel; "auto" picks gather for <= GATHER_MAX_TOKENS tokens, else grouped."""
    if kernel == "auto":
        kernel = "gather" if x.shape[0] <= GATHER_MAX_TOKENS else "grouped"
    return EXPERT_KERNELS[kernel](x, slot_ids, weights, w_gate, w_up, w_down)


class RoutedExperts(nnx.Module):
    """All routed experts of one layer, stacked: w_gate/w_up [E, d, f], w_down [E, f, d]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, dtype, rngs: nnx.Rngs):
        e, d, f = num_experts, hidden_size, intermediate_size
        self.w_gate = ExpertWeight(normal_param(rngs, (e, d, f), dtype)[...])
        self.w_up = ExpertWeight(normal_param(rngs, (e, d, f), dtype)[...])
        self.w_down = ExpertWeight(normal_param(rngs, (e, f, d), dtype)[...])


class MoEBlock(nnx.Module):
    """Router + routed experts + optional (gated) shared expert."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.spec = RouterSpec.from_config(cfg)
        self.router = normal_param(rngs, (d, cfg.num_experts), dtype)
        if cfg.router_bias:
            self.router_bias = nnx.Param(jnp.zeros((cfg.num_experts,), jnp.float32))
        self.experts = RoutedExperts(cfg.num_experts, d, cfg.moe_intermediate_size, dtype, rngs)
        if cfg.shared_intermediate_size:
            self.shared = SwiGLUMLP(d, cfg.shared_intermediate_size, dtype, rngs)
            if cfg.shared_expert_gated:
                self.shared_gate = normal_param(rngs, (d, 1), dtype)

    def route(self, x):
        """x: [N, d] -> (expert_ids int32[N, k], expert_weights float32[N, k], logits float32[N, E])."""
        logits = router_logits(x, self.router[...])
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
        routed = routed_experts(flat, ids, weights, w.w_gate[...], w.w_up[...], w.w_down[...], kernel)
        out = routed + self.shared_output(flat)
        return out.reshape(b, t, d), {"expert_ids": ids, "expert_weights": weights, "router_logits": logits}
