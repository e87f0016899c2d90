"""LLaPor: PreScope's Learnable Layer-Aware Predictor of the next MoE layers' routing.

One small network scores the experts of MoE positions p+1 ... p+H (H <= MAX_HORIZON, wrapping to the
next token's first MoE layers) from what the runtime has in hand at MoE position p:

    x     = rms(hidden_p) @ W_h + std(router_logits_p) @ W_r + b       [D]    ExpertFlow's hybrid of the
                                                                              intermediate state and pre-gating
            (+ cur_p @ W_c)                                                   cur_p: layer p's own choice
    g_j   = std(rms(hidden_p) @ K[t_j])      t_j = (p + j) mod L        [H, E] pre-gating of the target layer
    u_j   = x + src[p] + hor[j] (+ hist_j @ W_hist) (+ g_j @ W_g)       [H, D] layer-aware: source-position
                                                                              and horizon embeddings
    a_j   = act(LayerNorm(u_j));  b_j = a_j + act(a_j @ W_m + b_m)      [H, D] act: relu (default) or gelu;
                                                                              `depth` such residual blocks
    out_j = b_j @ heads[j] + tgt_bias[t_j] (+ gain[p, j] * g_j)         [H, E]

Horizon: a learned horizon embedding inside the shared trunk *and* one output head per horizon
(heads: [H, D, E]). The trunk is shared so every horizon trains the same features; the per-horizon heads
cost only H*D*E weights, and let the far horizons (whose targets include the next token's layers) use
the features differently from horizon 1. Which target layer is meant is the pair (p, j), carried by the
two embeddings; a per-target-layer bias gives each layer its own expert prior.

`hist_j` (optional, `use_history`) is the k-hot routing most recently observed at the target layer of
horizon j: the previous token's for targets later in this token, this token's for wrapped targets —
exactly what `PreviousTokenPredictor` predicts, fed as a feature so the network can weigh temporal
locality against the hidden state.

`cur_p` (optional, `use_current`) is layer p's own routing decision as the network sees it cheaply: the
top-k of router_logits_p as a k-hot weighted by the softmax over those k logits [E]. Layer p's MoE output
(which the next layer's router reads, through the residual stream) is, to first order, this vector times
one direction per expert, so W_c learns those directions; from the standardised logits alone a ReLU trunk
has to learn the top-k selection itself.

`g_j` (optional, `use_lookahead`) is ProMoE's gate lookahead as a feature: K[l] is MoE layer l's
router with its pre-router norm scale folded in (scale[:, None] * router, [d, E]), a frozen copy of the
model's weights saved with the predictor; it enters the trunk and, through a learned per-(p, j) gain,
the output directly, so training starts from the gate-lookahead scores and learns the corrections
(the hidden state drifts between layers; wrapped targets belong to the next token). Selection biases
of sigmoid routers (DeepSeek-V3) are not part of the feature; the target bias can learn them.

Sizes (d, E, L, H, D) come from the trace manifest / the saved config, never from constants. Training
(Flax NNX + optax) is in `predictors.train`; inference is `LLaPorPredictor`, a pure-numpy forward of the
exported weights (tens of microseconds per call on a host CPU).

On disk, PRED_DIR/llapor.json holds `LLaPorConfig` (+ provenance) and PRED_DIR/params/ the orbax
checkpoint of the parameters (a pure dict of arrays).
May import jax/flax/orbax (training, save/restore) and `jaxmoe.errors`; the predictor itself runs numpy.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe.errors import JaxmoeError
from predictors.base import MAX_HORIZON

CONFIG_FILE = "llapor.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1
NORM_EPS = 1e-6  # RMS / standardisation epsilon of the input features (not the model's)
LN_EPS = 1e-5
ACTIVATIONS = ("relu", "gelu")


@dataclass(frozen=True, slots=True)
class LLaPorConfig:
    """hidden_size d, num_experts E, num_moe_layers L, horizon H, width D of the trunk."""

    hidden_size: int
    num_experts: int
    num_moe_layers: int
    top_k: int
    horizon: int = MAX_HORIZON
    width: int = 256
    depth: int = 2  # residual MLP blocks in the trunk
    use_history: bool = True
    use_lookahead: bool = False
    activation: str = "relu"  # "relu" | "gelu" (tanh approximation)
    use_current: bool = False  # layer p's weighted top-k as a feature (False in predictors saved before it existed)

    def __post_init__(self):
        if not 1 <= self.horizon <= MAX_HORIZON:
            raise JaxmoeError(f"LLaPor horizon must be in 1..{MAX_HORIZON}, got {self.horizon}")
        if self.activation not in ACTIVATIONS:
            raise JaxmoeError(f"LLaPor activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")


def target_table(num_moe_layers: int, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (target layer int[L, H], tokens ahead int[L, H]) of horizon j+1 from source position p."""
    ahead = np.arange(num_moe_layers)[:, None] + np.arange(1, horizon + 1)[None, :]
    return ahead % num_moe_layers, ahead // num_moe_layers


# -- the network (Flax NNX, used for training) --------------------------------------------------------------
def _features(hidden, router_logits):
    """hidden: [B, d], router_logits: [B, E] (float32) -> RMS-normalised hidden, standardised logits."""
    h = hidden * jax.lax.rsqrt(jnp.mean(hidden * hidden, -1, keepdims=True) + NORM_EPS)
    z = router_logits - jnp.mean(router_logits, -1, keepdims=True)
    z = z * jax.lax.rsqrt(jnp.mean(z * z, -1, keepdims=True) + NORM_EPS)
    return h, z


def current_routing(router_logits, top_k: int):
    """router_logits float32[B, E] -> float32[B, E]: the top-k experts, weighted by a softmax over their logits."""
    vals, ids = jax.lax.top_k(router_logits, top_k)  # [B, k]
    return (jax.nn.one_hot(ids, router_logits.shape[-1]) * jax.nn.softmax(vals, -1)[..., None]).sum(-2)


class Frozen(nnx.Variable):
    """A constant saved with the parameters but not trained (the model's folded router kernels)."""


VARIABLES = (nnx.Param, Frozen)


def lookahead_scores(normed, kernels):
    """normed float32[B, d] (RMS-normalised hidden), kernels [L, d, E] -> standardised scores [B, L, E]."""
    g = jnp.einsum("bd,lde->ble", normed, kernels)
    g = g - jnp.mean(g, -1, keepdims=True)
    return g * jax.lax.rsqrt(jnp.mean(g * g, -1, keepdims=True) + NORM_EPS)


class LLaPor(nnx.Module):
    def __init__(self, cfg: LLaPorConfig, rngs: nnx.Rngs, lookahead_kernels=None):
        """lookahead_kernels: float32[L, d, E] (see `router_lookahead_kernels`), required with use_lookahead."""
        d, E, L, H, D = cfg.hidden_size, cfg.num_experts, cfg.num_moe_layers, cfg.horizon, cfg.width
        self.cfg = cfg
        self.in_hidden = nnx.Linear(d, D, use_bias=False, rngs=rngs)
        self.in_logits = nnx.Linear(E, D, rngs=rngs)
        if cfg.use_current:
            self.in_current = nnx.Linear(E, D, use_bias=False, rngs=rngs)
        self.src_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (L, D)))
        self.hor_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (H, D)))
        if cfg.use_history:
            self.in_history = nnx.Linear(E, D, use_bias=False, rngs=rngs)
        self.norm = nnx.LayerNorm(D, epsilon=LN_EPS, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(D, D, rngs=rngs) for _ in range(cfg.depth)])
        self.heads = nnx.Param(jax.random.normal(rngs.params(), (H, D, E)) / math.sqrt(D))
        self.tgt_bias = nnx.Param(jnp.zeros((L, E)))
        if cfg.use_lookahead:
            if lookahead_kernels is None:
                lookahead_kernels = jnp.zeros((L, d, E))  # placeholder, restored from a checkpoint
            if tuple(lookahead_kernels.shape) != (L, d, E):
                raise JaxmoeError(f"lookahead kernels have shape {tuple(lookahead_kernels.shape)}, expected {(L, d, E)}")
            self.lookahead_kernels = Frozen(jnp.asarray(lookahead_kernels, jnp.float32))
            self.in_lookahead = nnx.Linear(E, D, use_bias=False, rngs=rngs)
            self.lookahead_gain = nnx.Param(jnp.ones((L, H)))

    def __call__(self, hidden, router_logits, pos, history=None):
        """hidden float32[B, d], router_logits float32[B, E], pos int[B], history float32[B, H, E] or None
        -> logits float32[B, H, E] over the experts of positions pos+1 .. pos+H."""
        cfg = self.cfg
        h, z = _features(hidden, router_logits)
        x = self.in_hidden(h) + self.in_logits(z)  # [B, D]
        if cfg.use_current:
            x = x + self.in_current(current_routing(router_logits, cfg.top_k))
        u = x[:, None, :] + self.src_embed[...][pos][:, None, :] + self.hor_embed[...][None]  # [B, H, D]
        if cfg.use_history:
            u = u + self.in_history(history)
        tgt_layer = (pos[:, None] + jnp.arange(1, cfg.horizon + 1)[None, :]) % cfg.num_moe_layers  # [B, H]
        if cfg.use_lookahead:
            g = lookahead_scores(h, self.lookahead_kernels[...])  # [B, L, E]: every layer's, then gathered
            g = jnp.take_along_axis(g, tgt_layer[..., None], 1)  # [B, H, E]
            u = u + self.in_lookahead(g)
        act = nnx.relu if cfg.activation == "relu" else nnx.gelu
        a = act(self.norm(u))
        for block in self.blocks:
            a = a + act(block(a))  # [B, H, D]
        b = a
        out = jnp.einsum("bhd,hde->bhe", b, self.heads[...]) + self.tgt_bias[...][tgt_layer]
        if cfg.use_lookahead:
            out = out + self.lookahead_gain[...][pos][..., None] * g
        return out


def router_lookahead_kernels(model_dir: Path) -> np.ndarray:
    """float32[L, d, E]: each MoE layer's router with its pre-router RMSNorm scale folded in, restored
    from the converted model's non-expert pieces only (no expert weights are read)."""
    from jaxmoe.checkpoint import abstract_model, restore_piece, split_layer, with_sharding
    from jaxmoe.config import load_config

    cfg = load_config(model_dir)
    _, abstract_state = abstract_model(cfg, jnp.float32)
    layers = nnx.to_pure_dict(abstract_state)["layers"]
    device = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    kernels = []
    for i in cfg.moe_layer_ids:
        dense, _ = split_layer(layers[i])
        tree = restore_piece(model_dir, f"layer_{i:03d}/dense", with_sharding(dense, device))
        scale = np.asarray(tree["post_attn_norm"]["scale"], np.float32)
        kernels.append(scale[:, None] * np.asarray(tree["moe"]["router"], np.float32))
    return np.stack(kernels)


# -- save / restore -----------------------------------------------------------------------------------------
def params_of(model: LLaPor) -> dict:
    """The parameters as a flat dict name -> float32 numpy array (the exported weights)."""
    flat = {}
    for path, value in nnx.to_flat_state(nnx.state(model, VARIABLES)):
        flat[".".join(str(k) for k in path)] = np.asarray(value.get_value() if hasattr(value, "get_value") else value[...], np.float32)
    return flat


def abstract_params(cfg: LLaPorConfig) -> dict:
    model = nnx.eval_shape(lambda: LLaPor(cfg, nnx.Rngs(0)))
    return {".".join(str(k) for k in path): jax.ShapeDtypeStruct(v.shape, jnp.float32)
            for path, v in nnx.to_flat_state(nnx.state(model, VARIABLES))}


def save(pred_dir: Path, cfg: LLaPorConfig, params: dict, extra: dict | None = None) -> None:
    """Writes PRED_DIR/llapor.json and PRED_DIR/params (orbax). `pred_dir` must not exist yet."""
    import orbax.checkpoint as ocp

    pred_dir = Path(pred_dir).absolute()
    pred_dir.mkdir(parents=True)
    doc = {"format": FORMAT_VERSION, "config": dataclasses.asdict(cfg), **(extra or {})}
    (pred_dir / CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(pred_dir / PARAMS_DIR, {k: np.asarray(v, np.float32) for k, v in params.items()})
        checkpointer.wait_until_finished()


def read_config(pred_dir: Path) -> tuple[LLaPorConfig, dict]:
    path = Path(pred_dir) / CONFIG_FILE
    if not path.is_file():
        raise JaxmoeError(f"{path}: not found; is {pred_dir} a predictor trained with `python -m predictors.train`?")
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != FORMAT_VERSION:
            raise JaxmoeError(f"{path}: unsupported predictor format {doc.get('format')!r}")
        return LLaPorConfig(**doc["config"]), doc
    except (ValueError, TypeError, KeyError) as e:
        raise JaxmoeError(f"{path}: invalid predictor config ({e})") from None


def restore(pred_dir: Path) -> tuple[LLaPorConfig, dict]:
    """-> (config, flat params name -> float32 numpy array)."""
    import orbax.checkpoint as ocp

    cfg, _ = read_config(pred_dir)
    path = Path(pred_dir).absolute() / PARAMS_DIR
    if not path.is_dir():
        raise JaxmoeError(f"{path}: missing predictor parameters; re-run `python -m predictors.train`")
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(path, abstract_params(cfg))
    return cfg, {k: np.asarray(v, np.float32) for k, v in restored.items()}


def load_into(model: LLaPor, params: dict) -> None:
    """Copies flat numpy params (as from `params_of` / `restore`) into a Flax model."""
    state = nnx.state(model, VARIABLES)
    flat = [(path, jnp.asarray(params[".".join(str(k) for k in path)])) for path, _ in nnx.to_flat_state(state)]
    nnx.update(model, nnx.from_flat_state(flat))


# -- host inference (numpy) ---------------------------------------------------------------------------------
def _relu(x):
    return np.maximum(x, np.float32(0))


def _gelu(x):  # tanh approximation, as flax.nnx.gelu (jax.nn.gelu approximate=True)
    return 0.5 * x * (1.0 + np.tanh(np.float32(math.sqrt(2.0 / math.pi)) * (x + np.float32(0.044715) * x * x * x)))


def current_routing_np(router_logits, top_k: int):
    """numpy twin of `current_routing`: float32[B, E] -> float32[B, E]."""
    ids = np.argpartition(-router_logits, top_k - 1, -1)[:, :top_k]  # [B, k]
    vals = np.take_along_axis(router_logits, ids, -1)
    w = np.exp(vals - vals.max(-1, keepdims=True))
    out = np.zeros_like(router_logits)
    np.put_along_axis(out, ids, w / w.sum(-1, keepdims=True), -1)
    return out


class LLaPorPredictor:
    """`predictors.base.Predictor` running LLaPor's forward in numpy on the host.

    Stateless except for the history feature (the most recent k-hot routing per MoE position).
    `forward_batch` is the same computation over many (token, position) pairs at once.
    """

    name = "llapor"

    def __init__(self, cfg: LLaPorConfig, params: dict):
        self.cfg = cfg
        self.num_experts, self.num_moe_layers, self.horizon = cfg.num_experts, cfg.num_moe_layers, cfg.horizon
        self.hidden_size = cfg.hidden_size
        p = {k: np.ascontiguousarray(v, np.float32) for k, v in params.items()}
        self.w_h, self.w_r, self.b_r = p["in_hidden.kernel"], p["in_logits.kernel"], p["in_logits.bias"]
        self.src, self.hor = p["src_embed"], p["hor_embed"]
        self.w_hist = p["in_history.kernel"] if cfg.use_history else None
        self.w_cur = p["in_current.kernel"] if cfg.use_current else None
        self.top_k = cfg.top_k
        self.ln_scale, self.ln_bias = p["norm.scale"], p["norm.bias"]
        self.blocks = [(p[f"blocks.{i}.kernel"], p[f"blocks.{i}.bias"]) for i in range(cfg.depth)]
        self.heads, self.tgt_bias = p["heads"], p["tgt_bias"]
        self.tgt_layer, _ = target_table(cfg.num_moe_layers, cfg.horizon)  # [L, H]
        self.src_hor = self.src[:, None, :] + self.hor[None, :, :]  # [L, H, D]: per-call embedding sum, precomputed
        self.tgt_bias_of = self.tgt_bias[self.tgt_layer]  # [L, H, E]
        # predict's copies with the mean-centring of LayerNorm (over D) and of the lookahead standardisation
        # (over E) folded in: both are linear, so centring the weights centres their outputs, two numpy ops fewer
        centre = lambda w: np.ascontiguousarray(w - w.mean(-1, keepdims=True), np.float32)
        self.c_w_h, self.c_w_r, self.c_b_r, self.c_src_hor = centre(self.w_h), centre(self.w_r), centre(self.b_r), centre(self.src_hor)
        self.c_w_cur = centre(self.w_cur) if self.w_cur is not None else None
        # the history feature, projected (and centred) once per observe (hist_j @ W_hist), so predict only gathers rows
        self.c_w_hist = centre(self.w_hist) if self.w_hist is not None else None
        self.history_proj = np.zeros((cfg.num_moe_layers, cfg.width), np.float32)
        self.mean_vec = np.full(cfg.width, 1.0 / cfg.width, np.float32)
        self.act = _relu if cfg.activation == "relu" else _gelu
        self.kernels = p.get("lookahead_kernels") if cfg.use_lookahead else None  # [L, d, E]
        if self.kernels is not None:
            self.w_g, self.gain = p["in_lookahead.kernel"], p["lookahead_gain"]
            # layers p+1 .. p+H as one contiguous slice, wrapped ones repeated at the end (as often as a
            # horizon longer than the model's MoE layers needs)
            repeated = np.concatenate([self.kernels] * (2 + cfg.horizon // cfg.num_moe_layers))
            self.kernels_ext = centre(repeated[: cfg.num_moe_layers + cfg.horizon])  # [L + H, d, E], centred over E
            self.c_w_g = centre(self.w_g)
            self.mean_e = np.full(cfg.num_experts, 1.0 / cfg.num_experts, np.float32)

    @classmethod
    def load(cls, pred_dir: Path) -> "LLaPorPredictor":
        cfg, params = restore(pred_dir)
        return cls(cfg, params)

    def reset(self) -> None:
        self.history_proj[:] = 0

    def to_fused(self, horizon: int):
        """-> (scorer, params): the network inside the layer's jitted program (`predictors.fused`)."""
        from predictors.fused import fuse_llapor

        return fuse_llapor(self, horizon)

    def observe(self, pos: int, expert_ids: np.ndarray) -> None:
        if self.w_hist is not None:  # k-hot @ W_hist == the sum of the chosen experts' rows
            self.history_proj[pos] = self.c_w_hist[np.unique(expert_ids)].sum(0)

    def predict(self, pos: int, hidden: np.ndarray, router_logits: np.ndarray, horizon: int) -> np.ndarray:
        # the same arithmetic as forward_batch, arranged for one call: scalars folded in after the matvecs,
        # centrings folded into the weights, row means as BLAS dots (a numpy op costs ~1-3 us at these
        # sizes, more than most of the arithmetic, so fewer ops matter)
        if horizon > self.horizon:
            raise JaxmoeError(f"LLaPor predictor was trained for horizon {self.horizon}, asked for {horizon}")
        h = np.asarray(hidden, np.float32)
        r = np.asarray(router_logits, np.float32)
        r = r - np.float32(r.sum() / r.size)
        h_scale = np.float32(1.0 / math.sqrt(float(h @ h) / h.size + NORM_EPS))
        r_scale = np.float32(1.0 / math.sqrt(float(r @ r) / r.size + NORM_EPS))
        x = (h @ self.c_w_h) * h_scale + (r @ self.c_w_r) * r_scale + self.c_b_r  # [D], zero-mean
        if self.w_cur is not None:  # top-k of the centred logits = top-k of the logits; softmax is shift-free
            ids = np.argpartition(r, -self.top_k)[-self.top_k:]
            w = np.exp(r[ids] - r[ids].max())
            x += (w / w.sum()) @ self.c_w_cur[ids]
        u = x + self.c_src_hor[pos, :horizon]  # [h, D]
        if self.w_hist is not None:
            u += self.history_proj[self.tgt_layer[pos, :horizon]]
        if self.kernels is not None:
            g = np.matmul(h, self.kernels_ext[pos + 1 : pos + 1 + horizon]) * h_scale  # [h, E], zero-mean
            g *= (1.0 / np.sqrt((g * g) @ self.mean_e + np.float32(NORM_EPS)))[:, None]
            u += g @ self.c_w_g
        u *= (1.0 / np.sqrt((u * u) @ self.mean_vec + np.float32(LN_EPS)))[:, None]  # u is zero-mean already
        a = self.act(u * self.ln_scale + self.ln_bias)
        for w, bias in self.blocks:
            a = a + self.act(a @ w + bias)  # [h, D]
        b = a
        out = np.matmul(b[:, None, :], self.heads[:horizon])[:, 0, :] + self.tgt_bias_of[pos, :horizon]  # [h, E]
        if self.kernels is not None:
            out += self.gain[pos, :horizon, None] * g
        return out

    def _trunk(self, u):
        """u: [N, D] -> b: [N, D] (LayerNorm, activation, residual MLP); 2-D so each matmul is one GEMM."""
        c = u - u.mean(-1, keepdims=True)
        var = (c * c).mean(-1, keepdims=True)
        a = self.act(c / np.sqrt(var + np.float32(LN_EPS)) * self.ln_scale + self.ln_bias)
        for w, bias in self.blocks:
            a = a + self.act(a @ w + bias)
        return a

    def forward_batch(self, hidden, router_logits, pos, history=None) -> np.ndarray:
        """hidden [B, d], router_logits [B, E], pos int[B], history [B, H, E] or None -> float32[B, H, E]."""
        h = np.asarray(hidden, np.float32)
        r = np.asarray(router_logits, np.float32)
        B, H, E = len(h), self.horizon, self.num_experts
        cur = None if self.w_cur is None else current_routing_np(r, self.top_k)  # from the raw logits
        h = h / np.sqrt(np.mean(h * h, -1, keepdims=True) + np.float32(NORM_EPS))
        r = r - r.mean(-1, keepdims=True)
        r = r / np.sqrt(np.mean(r * r, -1, keepdims=True) + np.float32(NORM_EPS))
        x = h @ self.w_h + r @ self.w_r + self.b_r  # [B, D]
        if self.w_cur is not None:
            x = x + cur @ self.w_cur
        u = x[:, None, :] + self.src_hor[pos]  # [B, H, D]
        if self.w_hist is not None:
            u = u + (np.asarray(history, np.float32).reshape(B * H, E) @ self.w_hist).reshape(B, H, -1)
        if self.kernels is not None:
            L, d = self.kernels.shape[:2]
            g = (h @ self.kernels.transpose(1, 0, 2).reshape(d, L * E)).reshape(B, L, E)  # every layer's
            g = np.take_along_axis(g, self.tgt_layer[pos][..., None], 1)  # [B, H, E]
            g = g - g.mean(-1, keepdims=True)
            g = g / np.sqrt(np.mean(g * g, -1, keepdims=True) + np.float32(NORM_EPS))
            u = u + (g.reshape(B * H, E) @ self.w_g).reshape(B, H, -1)
        b = self._trunk(u.reshape(B * H, -1)).reshape(B, H, -1)
        out = np.stack([b[:, j] @ self.heads[j] for j in range(H)], 1) + self.tgt_bias_of[pos]  # [B, H, E]
        if self.kernels is not None:
            out = out + self.gain[pos][..., None] * g
        return out
