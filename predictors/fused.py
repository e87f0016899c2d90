"""Predictors evaluated inside the MoE layer's own jitted program (fused pre-gating).

On the host a predictor costs one call per MoE layer of every token: numpy dispatch, the hidden state
copied to the host, and the planner waiting for both. Fused, the layer's jitted program (`moe_front` in
jaxmoe.offload) scores the next layers' experts right after its router, from the same hidden state
and router logits, and the scores come back in the one small device-to-host copy the layer already
makes (its routing decision). The host then only plans.

A fused predictor is a pair (`FusedScorer`, params): the scorer is static for `jax.jit` (hashed by
identity, so one compilation per engine), the params a tuple of device arrays. Its `state` is what it
remembers between calls (LLaPor's routing history), kept on the device and threaded through the
layers' programs:

    scorer(params, state, pos, hidden f32[d], router_logits f32[E], ids int32[k])
        -> (scores f32[horizon, E] for MoE positions pos+1 .. pos+horizon, new state)

`ids` are the experts the token chose at `pos` (the predictor's `observe`); the scores are the host
predictor's `predict(pos, hidden, router_logits, horizon)` up to float rounding. `pos` is a traced
int32, so every MoE layer shares the compilation.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe.errors import JaxmoeError


@dataclass(frozen=True, eq=False)
class FusedGateLookahead:
    """ProMoE pre-gating on the device: later layers' routers (norm scale folded in) applied to the
    RMS-normalised hidden state. params: (kernels f32[L + horizon, d, E] with layers 0..horizon-1
    repeated at the end, selection_bias f32[L + horizon, E] or None)."""

    horizon: int
    num_experts: int
    eps: float
    sigmoid: bool  # DeepSeek-V3-style sigmoid router with a selection bias

    def init_state(self):
        return ()

    def __call__(self, params, state, pos, hidden, router_logits, ids):
        kernels, bias = params
        h = hidden.astype(jnp.float32)
        normed = h * jax.lax.rsqrt(jnp.mean(h * h) + self.eps)
        window = jax.lax.dynamic_slice_in_dim(kernels, pos + 1, self.horizon)  # [H, d, E]
        scores = jnp.einsum("d,hde->he", normed, window)
        if self.sigmoid:
            scores = jax.nn.sigmoid(scores) + jax.lax.dynamic_slice_in_dim(bias, pos + 1, self.horizon)
        return scores, state


def fuse_gate_lookahead(folded_kernels: np.ndarray, selection_bias, eps: float, horizon: int):
    """folded_kernels: f32[L, d, E] (norm scale folded in); selection_bias: f32[L, E] or None -> (scorer, params)."""
    num_layers, _, num_experts = folded_kernels.shape
    repeat = 1 + -(-horizon // num_layers)  # enough copies that pos + 1 + horizon never runs off the end
    kernels = jnp.asarray(np.concatenate([folded_kernels] * (repeat + 1))[: num_layers + horizon + 1], jnp.float32)
    bias = None
    if selection_bias is not None:
        bias = jnp.asarray(np.concatenate([selection_bias] * (repeat + 1))[: num_layers + horizon + 1], jnp.float32)
    scorer = FusedGateLookahead(horizon, num_experts, float(eps), selection_bias is not None)
    return scorer, (kernels, bias)


@dataclass(frozen=True, eq=False)
class FusedLLaPor:
    """LLaPor's Flax network on the device (`predictors.llapor.LLaPor`, batch of one). params: the
    network's flat state leaves. state: f32[L, E], the k-hot routing most recently observed at each MoE
    position (the host predictor's history feature)."""

    graph: object  # jaxmoe.engine.StaticGraph of the network
    horizon: int
    num_moe_layers: int
    num_experts: int
    uses_history: bool

    def init_state(self):
        return jnp.zeros((self.num_moe_layers, self.num_experts), jnp.float32)

    def __call__(self, params, state, pos, hidden, router_logits, ids):
        net = self.graph.merge(params)
        if self.uses_history:  # observe(pos, ids), then predict, as the runtime calls the host predictor
            state = jax.lax.dynamic_update_index_in_dim(state, jax.nn.one_hot(ids, self.num_experts).sum(0), pos, 0)
        targets = (pos + jnp.arange(1, self.horizon + 1)) % self.num_moe_layers
        history = state[targets][None] if self.uses_history else None
        pos_b = jnp.reshape(pos, (1,))
        scores = net(hidden[None].astype(jnp.float32), router_logits[None].astype(jnp.float32), pos_b, history)
        return scores[0, : self.horizon], state


def fuse_llapor(cfg, params: dict, horizon: int):
    """LLaPor config + flat numpy params (`predictors.llapor.restore`) -> (scorer, params) for `horizon`
    (at most the trained horizon)."""
    from jaxmoe.engine import flat_state
    from predictors.llapor import VARIABLES, LLaPor, load_into

    if horizon > cfg.horizon:
        raise JaxmoeError(f"LLaPor predictor was trained for horizon {cfg.horizon}, asked for {horizon}")
    kernels = params.get("lookahead_kernels") if cfg.use_lookahead else None
    net = LLaPor(cfg, nnx.Rngs(0), lookahead_kernels=None if kernels is None else jnp.asarray(kernels))
    load_into(net, params)
    graphdef, state = nnx.split(net, VARIABLES)
    graph, leaves = flat_state(graphdef, state)
    scorer = FusedLLaPor(graph, horizon, cfg.num_moe_layers, cfg.num_experts, cfg.use_history)
    return scorer, tuple(jnp.asarray(x) for x in leaves)
