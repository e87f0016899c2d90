"""The predictor interface and the training-free predictors.

Layers are addressed by *MoE-layer position* p (index into `cfg.moe_layer_ids`, dense layers skipped).
At position p of the current token a predictor sees the residual hidden state entering that MoE block
and that layer's router logits, and scores the experts of the next `horizon` positions p+1 ... p+H;
positions past the last MoE layer wrap to the next token's first MoE layers.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

MAX_HORIZON = 4


class Predictor(Protocol):
    name: str

    def reset(self) -> None:
        """Forget per-sequence history (a new prompt starts)."""

    def predict(self, pos: int, hidden: np.ndarray, router_logits: np.ndarray, horizon: int) -> np.ndarray:
        """hidden: float32[d]; router_logits: float32[E] -> float32[horizon, E] scores (higher = likelier)."""

    def observe(self, pos: int, expert_ids: np.ndarray) -> None:
        """The experts the current token actually chose at MoE position `pos` (int[k])."""


def target_positions(pos: int, horizon: int, num_moe_layers: int) -> list[int]:
    return [(pos + j) % num_moe_layers for j in range(1, horizon + 1)]


class FrequencyPredictor:
    """Per-layer LFU: how often each expert was chosen so far in this run."""

    name = "frequency"

    def __init__(self, num_moe_layers: int, num_experts: int):
        self.counts = np.zeros((num_moe_layers, num_experts), np.float32)

    def reset(self) -> None:
        pass  # frequencies persist across requests, like an LFU cache

    def predict(self, pos, hidden, router_logits, horizon):
        return self.counts[target_positions(pos, horizon, len(self.counts))]

    def observe(self, pos, expert_ids):
        self.counts[pos, expert_ids] += 1


class PreviousTokenPredictor:
    """The experts the previous token chose at the same layer."""

    name = "previous-token"

    def __init__(self, num_moe_layers: int, num_experts: int):
        self.last = np.zeros((num_moe_layers, num_experts), np.float32)
        self.pending = np.zeros_like(self.last)

    def reset(self) -> None:
        self.last[:] = 0
        self.pending[:] = 0

    def predict(self, pos, hidden, router_logits, horizon):
        rows = target_positions(pos, horizon, len(self.last))
        # a wrapped row targets the next token: the current token's choice there is the freshest history
        return np.stack([self.pending[r] if r <= pos and self.pending[r].any() else self.last[r] for r in rows])

    def observe(self, pos, expert_ids):
        row = np.zeros(self.last.shape[1], np.float32)
        row[expert_ids] = 1
        self.pending[pos] = row
        if pos == len(self.last) - 1:  # token finished: its routing becomes "previous"
            self.last[:] = self.pending
            self.pending[:] = 0


class GateLookaheadPredictor:
    """ProMoE-style pre-gating: apply later layers' pre-router norm + router to the current hidden state.

    router_kernels: float32[L, d, E]; norm_scales: float32[L, d]; selection_bias: float32[L, E] or None;
    logit_bias: float32[L, E] or None (GPT-OSS's routers add a bias to their logits).
    """

    name = "gate-lookahead"

    def __init__(self, router_kernels, norm_scales, eps: float, selection_bias=None, logit_bias=None):
        self.router_kernels = np.asarray(router_kernels, np.float32)
        self.norm_scales = np.asarray(norm_scales, np.float32)
        self.eps = eps
        self.selection_bias = None if selection_bias is None else np.asarray(selection_bias, np.float32)
        # norm scale folded into the kernels, layers 0..L-1 repeated: positions p+1..p+H (wrapping, also
        # past one token when H > L) are one contiguous slice, so a call is one batched matmul
        folded = self.norm_scales[:, :, None] * self.router_kernels  # [L, d, E]
        copies = 2 + MAX_HORIZON // len(folded)
        self._kernels_ext = np.concatenate([folded] * copies)  # [(2 + H/L) L, d, E]
        self._bias_ext = None if self.selection_bias is None else np.concatenate([self.selection_bias] * copies)
        self.logit_bias = None if logit_bias is None else np.asarray(logit_bias, np.float32)
        self._logit_bias_ext = None if logit_bias is None else np.concatenate([self.logit_bias] * copies)

    def reset(self) -> None:
        pass

    def predict(self, pos, hidden, router_logits, horizon):
        h = np.asarray(hidden, np.float32)
        normed = h * np.float32(1.0 / np.sqrt(np.dot(h, h) / len(h) + self.eps))  # [d]
        scores = np.matmul(normed, self._kernels_ext[pos + 1 : pos + 1 + horizon])  # [H, E]
        if self._logit_bias_ext is not None:
            scores = scores + self._logit_bias_ext[pos + 1 : pos + 1 + horizon]
        if self._bias_ext is not None:  # sigmoid routers with a selection bias (DeepSeek-V3)
            scores = 1.0 / (1.0 + np.exp(-scores)) + self._bias_ext[pos + 1 : pos + 1 + horizon]
        return scores

    def observe(self, pos, expert_ids):
        pass

    def to_fused(self, horizon: int):
        """-> (scorer, params): this predictor inside the layer's jitted program (`predictors.fused`)."""
        from predictors.fused import fuse_gate_lookahead

        return fuse_gate_lookahead(self._kernels_ext, self._bias_ext, len(self.router_kernels), self.eps, horizon,
                                   self._logit_bias_ext)

    @classmethod
    def from_layer_trees(cls, moe_layer_trees: list[dict], eps: float, norm_unit_offset: bool = False) -> "GateLookaheadPredictor":
        """From the pure-dict state of each MoE layer (keys post_attn_norm.scale, moe.router, moe.router_bias,
        moe.router_logit_bias); norm_unit_offset: the norms scale by 1 + weight (ModelConfig.norm_unit_offset)."""
        kernels = np.stack([np.asarray(t["moe"]["router"], np.float32) for t in moe_layer_trees])
        scales = np.stack([np.asarray(t["post_attn_norm"]["scale"], np.float32) for t in moe_layer_trees])
        if norm_unit_offset:
            scales = scales + np.float32(1.0)
        bias = None
        if "router_bias" in moe_layer_trees[0]["moe"]:
            bias = np.stack([np.asarray(t["moe"]["router_bias"], np.float32) for t in moe_layer_trees])
        logit_bias = None
        if "router_logit_bias" in moe_layer_trees[0]["moe"]:
            logit_bias = np.stack([np.asarray(t["moe"]["router_logit_bias"], np.float32) for t in moe_layer_trees])
        return cls(kernels, scales, eps, bias, logit_bias)
