"""The MoE decoder-only language model as Flax NNX modules.

State tree (what `nnx.split` yields and what converted checkpoints hold):
  embed.embedding [V, d]
  layers[l].input_norm.scale, layers[l].attn.* (attention or Gated DeltaNet), layers[l].post_attn_norm.scale
  layers[l].mlp.{gate_proj, up_proj, down_proj}                       (dense layers)
  layers[l].moe.router [d, E], .router_bias [E], .router_logit_bias [E],
  layers[l].moe.experts.{w_gate, w_up, w_down} [E, ...] (+ .{b_gate, b_up, b_down} [E, ...])
  layers[l].moe.shared.*, .shared_gate [d, 1]                           (MoE layers)
  final_norm.scale [d], lm_head [d, V] (absent when embeddings are tied)

Each decoder layer exposes the pieces the offloading runtime calls one by one
(`attention_block`, `moe.route`, routed experts over slots, `moe.shared_output`); `__call__` chains
them for the fully resident model.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxmoe.attention import GQAttention
from jaxmoe.config import ModelConfig
from jaxmoe.gated_delta import GatedDeltaNet
from jaxmoe.layers import Embed, RMSNorm, SwiGLUMLP, normal_param
from jaxmoe.mla import MLAttention
from jaxmoe.moe import MoEBlock

ATTENTION_MODULES = {"gqa": GQAttention, "mla": MLAttention, "gated_delta": GatedDeltaNet}  # by layer_attention_kind


def lm_logits(final_norm: RMSNorm, head, h):
    """h: [..., d] (pre final norm); head: [d, V] -> float32 logits [..., V]."""
    h = final_norm(h)
    return jnp.einsum("...d,dv->...v", h, head.astype(h.dtype)).astype(jnp.float32)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.input_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, cfg.norm_float32_scale, cfg.norm_unit_offset)
        kind = cfg.layer_attention_kind(layer_id)
        if kind == "gqa":
            self.attn = GQAttention(cfg, dtype, rngs, window=cfg.layer_window(layer_id))
        else:
            self.attn = ATTENTION_MODULES[kind](cfg, dtype, rngs)
        self.post_attn_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, cfg.norm_float32_scale, cfg.norm_unit_offset)
        self.is_moe = cfg.moe_layers[layer_id]
        if self.is_moe:
            self.moe = MoEBlock(cfg, dtype, rngs)
        else:
            self.mlp = SwiGLUMLP(d, cfg.dense_intermediate_size, dtype, rngs)

    def attention_block(self, h, cache, positions):
        """h: [B, T, d] -> (h + attn(norm(h)), cache, ffn input post_attn_norm(h'): [B, T, d])."""
        attn_out, cache = self.attn(self.input_norm(h), cache, positions)
        h = h + attn_out
        return h, cache, self.post_attn_norm(h)

    def __call__(self, h, cache, positions, kernel: str = "auto"):
        """h: [B, T, d] -> (h: [B, T, d], cache, routing dict or None for dense layers)."""
        h, cache, x = self.attention_block(h, cache, positions)
        if self.is_moe:
            y, routing = self.moe(x, kernel)
            routing["hidden"] = h.reshape(-1, h.shape[-1])  # residual stream entering the MoE block
        else:
            y, routing = self.mlp(x), None
        return h + y, cache, routing


class MoEModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs | None, dtype=None):
        """rngs None: every weight zeros (`jaxmoe.layers.normal_param`), for the abstract model of a checkpoint."""
        dtype = jnp.dtype(dtype or cfg.dtype)
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.hidden_size, dtype, rngs)
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype, rngs) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, cfg.norm_float32_scale, cfg.norm_unit_offset)
        if not cfg.tie_word_embeddings:
            self.lm_head = normal_param(rngs, (cfg.hidden_size, cfg.vocab_size), dtype)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> list[dict]:
        """One cache dict per layer, preallocated for `max_len` positions (a KV cache), or a running state
        (Gated DeltaNet layers, whose size does not depend on max_len)."""
        dtype = dtype or self.embed.embedding[...].dtype
        return [type(layer.attn).init_cache(self.cfg, batch, max_len, dtype) for layer in self.layers]

    def head_matrix(self):
        """The output projection [d, V] (the transposed embedding when tied)."""
        return self.embed.embedding[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]

    def logits(self, h):
        """h: [..., d] (pre final norm) -> float32 logits [..., V]."""
        return lm_logits(self.final_norm, self.head_matrix(), h)

    def hidden_states(self, tokens, positions, cache, kernel: str = "auto"):
        """tokens, positions: int32[B, T] -> (h: [B, T, d] before the final norm, cache, routing list)."""
        h = self.embed(tokens)
        routing = []
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache):
            h, layer_cache, r = layer(h, layer_cache, positions, kernel)
            new_cache.append(layer_cache)
            routing.append(r)
        return h, new_cache, routing

    def __call__(self, tokens, positions, cache, kernel: str = "auto"):
        """tokens, positions: int32[B, T] -> (logits float32[B, T, V], cache, routing list per layer)."""
        h, cache, routing = self.hidden_states(tokens, positions, cache, kernel)
        return self.logits(h), cache, routing
