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
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.errors import JaxmoeError


@dataclass(frozen=True, eq=False)
class FusedGateLookahead:
    """ProMoE pre-gating on the device: later layers' routers (norm scale folded in) applied to the
    RMS-normalised hidden state. params: (kernels f32[L + horizon, d, E] with layers 0..horizon-1
    repeated at the end, selection_bias f32[L + horizon, E] or None, logit_bias f32[L + horizon, E] or None)."""

    horizon: int
    eps: float
    sigmoid: bool  # DeepSeek-V3-style sigmoid router with a selection bias

    def init_state(self):
        return ()

    def __call__(self, params, state, pos, hidden, router_logits, ids):
        kernels, bias, logit_bias = params
        h = hidden.astype(jnp.float32)
        normed = h * jax.lax.rsqrt(jnp.mean(h * h) + self.eps)
        window = jax.lax.dynamic_slice_in_dim(kernels, pos + 1, self.horizon)  # [H, d, E]
        scores = jnp.einsum("d,hde->he", normed, window)
        if logit_bias is not None:
            scores = scores + jax.lax.dynamic_slice_in_dim(logit_bias, pos + 1, self.horizon)
        if self.sigmoid:
            scores = jax.nn.sigmoid(scores) + jax.lax.dynamic_slice_in_dim(bias, pos + 1, self.horizon)
        return scores, state


def fuse_gate_lookahead(kernels_ext: np.ndarray, bias_ext, num_layers: int, eps: float, horizon: int,
                        logit_bias_ext=None):
    """The host predictor's repeated tables (`GateLookaheadPredictor`: kernels_ext f32[>= L + H, d, E] with
    the norm scale folded in, bias_ext and logit_bias_ext f32[>= L + H, E] or None) -> (scorer, params); only
    the first L + horizon rows go to the device."""
    rows = num_layers + horizon
    table = lambda t: None if t is None else jnp.asarray(t[:rows], jnp.float32)  # noqa: E731
    params = (table(kernels_ext), table(bias_ext), table(logit_bias_ext))
    return FusedGateLookahead(horizon, float(eps), bias_ext is not None), params


@dataclass(frozen=True, eq=False)
class FusedLLaPor:
    """LLaPor for one query on the device: the arithmetic of the host predictor's `predict`
    (`predictors.llapor.LLaPorPredictor`: centrings folded into the weights, only the `horizon` rows asked
    for, only the target layers' lookahead kernels), not the training network's batched forward, which
    computes every horizon and every layer's lookahead. params: `fuse_llapor`'s dict. state: f32[L, D],
    the history feature already projected (hist @ W_hist, centred) per MoE position."""

    horizon: int
    num_moe_layers: int
    width: int
    top_k: int
    activation: str
    depth: int
    uses_history: bool
    uses_current: bool
    uses_lookahead: bool

    def init_state(self):
        return jnp.zeros((self.num_moe_layers, self.width), jnp.float32)

    def __call__(self, params, state, pos, hidden, router_logits, ids):
        from predictors.llapor import LN_EPS, NORM_EPS

        p, rows = params, jnp.arange(self.horizon)
        act = jax.nn.relu if self.activation == "relu" else partial(jax.nn.gelu, approximate=True)
        if self.uses_history:  # observe(pos, ids) first, as the runtime calls the host predictor
            state = jax.lax.dynamic_update_index_in_dim(state, p["w_hist"][ids].sum(0), pos, 0)
        h = hidden.astype(jnp.float32)
        r = router_logits.astype(jnp.float32)
        r = r - jnp.mean(r)
        h_scale = jax.lax.rsqrt(jnp.mean(h * h) + NORM_EPS)
        # every input feature of the trunk in one row per horizon, so one matmul projects them all (on
        # XLA:CPU each op of a program this small costs microseconds, so fewer, wider ops are faster)
        features = [h * h_scale, r * jax.lax.rsqrt(jnp.mean(r * r) + NORM_EPS)]
        if self.uses_current:  # the top-k of the logits, weighted by a softmax over them, as a dense [E]
            vals, top = jax.lax.top_k(r, self.top_k)
            features.append(jnp.zeros_like(r).at[top].set(jax.nn.softmax(vals)))
        x = jnp.concatenate(features)
        x = jnp.broadcast_to(x, (self.horizon, x.shape[0]))  # [H, F]
        if self.uses_lookahead:
            g = jnp.einsum("d,hde->he", h, p["kernels_ext"][pos + 1 + rows]) * h_scale  # [H, E], zero-mean
            g = g * jax.lax.rsqrt(jnp.mean(g * g, -1, keepdims=True) + NORM_EPS)
            x = jnp.concatenate([x, g], 1)
        u = x @ p["w_in"] + p["b_r"] + p["src_hor"][pos, : self.horizon]  # [H, D]
        if self.uses_history:
            u = u + state[p["tgt_layer"][pos, : self.horizon]]
        u = u * jax.lax.rsqrt(jnp.mean(u * u, -1, keepdims=True) + LN_EPS)  # zero-mean already
        a = act(u * p["ln_scale"] + p["ln_bias"])
        for i in range(self.depth):
            a = a + act(a @ p[f"block{i}_w"] + p[f"block{i}_b"])
        out = jnp.einsum("hd,hde->he", a, p["heads"][: self.horizon]) + p["tgt_bias"][pos, : self.horizon]
        if self.uses_lookahead:
            out = out + p["gain"][pos, : self.horizon, None] * g
        return out, state


def fuse_llapor(predictor, horizon: int):
    """A host `LLaPorPredictor` -> (scorer, params) for `horizon` (at most the trained horizon)."""
    cfg = predictor.cfg
    if horizon > cfg.horizon:
        raise JaxmoeError(f"LLaPor predictor was trained for horizon {cfg.horizon}, asked for {horizon}")
    pr = predictor
    # the input projections stacked in the order FusedLLaPor concatenates its features
    w_in = [pr.c_w_h, pr.c_w_r]
    if pr.c_w_cur is not None:
        w_in.append(pr.c_w_cur)
    if pr.kernels is not None:
        w_in.append(pr.c_w_g)
    arrays = {"w_in": np.concatenate(w_in), "b_r": pr.c_b_r, "src_hor": pr.c_src_hor, "tgt_layer": pr.tgt_layer,
              "ln_scale": pr.ln_scale, "ln_bias": pr.ln_bias, "heads": pr.heads, "tgt_bias": pr.tgt_bias_of}
    for i, (w, b) in enumerate(pr.blocks):
        arrays[f"block{i}_w"], arrays[f"block{i}_b"] = w, b
    if pr.c_w_hist is not None:
        arrays["w_hist"] = pr.c_w_hist
    if pr.kernels is not None:
        arrays.update(kernels_ext=pr.kernels_ext, gain=pr.gain)
    params = {k: jnp.asarray(v) for k, v in arrays.items()}
    scorer = FusedLLaPor(horizon, cfg.num_moe_layers, cfg.width, cfg.top_k, cfg.activation, cfg.depth,
                         pr.c_w_hist is not None, pr.c_w_cur is not None, pr.kernels is not None)
    return scorer, params
