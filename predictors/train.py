"""CLI: python -m predictors.train --traces TRACE_DIR --out PRED_DIR [--horizon 4] [--steps N] [--seed S] [--force]

Trains LLaPor (`predictors.llapor`) on the train split of a routing trace with optax AdamW and a softmax
cross-entropy against the k-hot set of experts each of the next H MoE positions chose; validates recall@k
on the validation split every `--eval-every` steps (printed, and stored in PRED_DIR/train_report.json).
Writes into a temporary sibling directory and renames it into place, so PRED_DIR is whole or absent.

Also the trace -> supervision helpers shared with `predictors.evaluate`: for every (token t, MoE position
p, horizon j) the token and layer whose routing is the target, and the token whose routing at that layer
was observed most recently (the history feature).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from jaxmoe.errors import JaxmoeError
from predictors.base import MAX_HORIZON
from predictors.trace_format import TraceData, load_trace, read_manifest

REPORT_FILE = "train_report.json"


# -- supervision from a trace ---------------------------------------------------------------------------
def neighbour_tokens(trace: TraceData) -> tuple[np.ndarray, np.ndarray]:
    """-> (next, prev) int[N]: index of the next / previous token of the same document, -1 if none."""
    same = (trace.doc_id[1:] == trace.doc_id[:-1]) & (trace.position[1:] == trace.position[:-1] + 1)
    idx = np.arange(trace.num_tokens)
    nxt = np.full(trace.num_tokens, -1, np.int64)
    prv = np.full(trace.num_tokens, -1, np.int64)
    nxt[:-1] = np.where(same, idx[1:], -1)
    prv[1:] = np.where(same, idx[:-1], -1)
    return nxt, prv


def target_indices(trace: TraceData, horizon: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (tgt_tok int[N, L, H], hist_tok int[N, L, H], tgt_layer int[L, H]).

    Horizon j from (t, p) targets layer (p + j) mod L of token tgt_tok (t, or a later token of the same
    document when p + j wraps; -1 past the document's end). hist_tok is the token whose routing at the
    target layer a runtime has seen last: the target token's predecessor (-1 at a document start).
    """
    from predictors.llapor import target_table

    L = trace.num_moe_layers
    tgt_layer, ahead = target_table(L, horizon)  # [L, H]
    nxt, prv = neighbour_tokens(trace)
    steps = [np.arange(trace.num_tokens)]  # steps[a][t]: the token a ahead of t (-1 if none)
    for _ in range(int(ahead.max())):
        prev_step = steps[-1]
        steps.append(np.where(prev_step >= 0, nxt[np.maximum(prev_step, 0)], -1))
    tgt_tok = np.stack([steps[a] for a in ahead.reshape(-1)], -1).reshape(trace.num_tokens, L, horizon)
    hist_tok = np.where(tgt_tok >= 0, prv[np.maximum(tgt_tok, 0)], -1)
    return tgt_tok.astype(np.int32), hist_tok.astype(np.int32), tgt_layer.astype(np.int32)


def khot(expert_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """int[..., k] -> float32[..., E] with ones at the chosen experts."""
    out = np.zeros((*expert_ids.shape[:-1], num_experts), np.float32)
    np.put_along_axis(out, expert_ids.astype(np.int64), 1.0, axis=-1)
    return out


def history_khot(trace: TraceData, hist_tok: np.ndarray, tgt_layer: np.ndarray, pos: np.ndarray,
                 rows: np.ndarray) -> np.ndarray:
    """History feature float32[B, H, E] of pairs (rows[b], pos[b]); zeros where nothing was observed."""
    tok = hist_tok[rows, pos]  # [B, H]
    layer = tgt_layer[pos]  # [B, H]
    hot = khot(trace.expert_ids[np.maximum(tok, 0), layer], trace.num_experts)
    return hot * (tok >= 0)[..., None]


# -- training -------------------------------------------------------------------------------------------
def _device_data(trace: TraceData, horizon: int):
    import jax.numpy as jnp

    tgt_tok, hist_tok, tgt_layer = target_indices(trace, horizon)
    return {"hidden": jnp.asarray(trace.hidden), "logits": jnp.asarray(trace.router_logits, jnp.float32),
            "ids": jnp.asarray(trace.expert_ids, jnp.int32), "tgt_tok": jnp.asarray(tgt_tok),
            "hist_tok": jnp.asarray(hist_tok), "tgt_layer": jnp.asarray(tgt_layer)}


def _gather(data, rows, pos, num_experts):
    """Model inputs and targets of pairs (rows, pos): the jnp twin of `history_khot` + target k-hot."""
    import jax
    import jax.numpy as jnp

    def hot(tok, layer):  # tok, layer: [B, H] -> [B, H, E], zero where tok < 0
        ids = data["ids"][jnp.maximum(tok, 0), layer]  # [B, H, k]
        return jax.nn.one_hot(ids, num_experts).sum(-2) * (tok >= 0)[..., None]

    layer = data["tgt_layer"][pos]
    tgt_tok = data["tgt_tok"][rows, pos]
    return (data["hidden"][rows, pos].astype(jnp.float32), data["logits"][rows, pos],
            hot(data["hist_tok"][rows, pos], layer), hot(tgt_tok, layer), tgt_tok >= 0)


def loss_fn(model, hidden, logits, pos, history, target, valid):
    """Softmax cross-entropy against the normalised k-hot target, mean over valid (pair, horizon)."""
    import jax
    import jax.numpy as jnp

    scores = model(hidden, logits, pos, history)  # [B, H, E]
    p_target = target / jnp.maximum(target.sum(-1, keepdims=True), 1.0)
    ce = -(p_target * jax.nn.log_softmax(scores, -1)).sum(-1)  # [B, H]
    return (ce * valid).sum() / jnp.maximum(valid.sum(), 1.0)


def validation_recall(predictor, trace: TraceData, horizon: int, top_k: int, max_pairs: int | None = None,
                      seed: int = 0) -> dict:
    """recall@k per horizon (str(j) -> float) of a numpy LLaPorPredictor over (a sample of) all pairs."""
    tgt_tok, hist_tok, tgt_layer = target_indices(trace, horizon)
    rows, pos = np.meshgrid(np.arange(trace.num_tokens), np.arange(trace.num_moe_layers), indexing="ij")
    rows, pos = rows.reshape(-1), pos.reshape(-1)
    if max_pairs is not None and len(rows) > max_pairs:
        pick = np.random.default_rng(seed).choice(len(rows), max_pairs, replace=False)
        rows, pos = rows[pick], pos[pick]
    hits = np.zeros(horizon)
    count = np.zeros(horizon)
    for start in range(0, len(rows), 4096):
        r, p = rows[start:start + 4096], pos[start:start + 4096]
        hist = history_khot(trace, hist_tok, tgt_layer, p, r)
        scores = predictor.forward_batch(trace.hidden[r, p], trace.router_logits[r, p], p, hist)  # [B, H, E]
        top = np.argsort(-scores, -1, kind="stable")[..., :top_k]
        tok = tgt_tok[r, p]
        truth = khot(trace.expert_ids[np.maximum(tok, 0), tgt_layer[p]], trace.num_experts)
        got = np.take_along_axis(truth, top, -1).sum(-1) / top_k  # [B, H]
        ok = tok >= 0
        hits += (got * ok).sum(0)
        count += ok.sum(0)
    return {str(j + 1): float(hits[j] / max(count[j], 1)) for j in range(horizon)}


def train(trace_dir: Path, horizon: int = MAX_HORIZON, steps: int = 10000, seed: int = 0, width: int = 256, depth: int = 2,
          batch_size: int = 512, lr: float = 2e-3, weight_decay: float = 1e-4, use_history: bool = True,
          lookahead_kernels: np.ndarray | None = None, activation: str = "relu", eval_every: int | None = None,
          use_current: bool = True,
          progress: bool = True, log=None):
    """-> (LLaPorConfig, flat numpy params, report dict). lookahead_kernels: float32[L, d, E] from
    `router_lookahead_kernels(model_dir)` turns on the gate-lookahead feature."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from tqdm import tqdm

    from predictors.llapor import Frozen, LLaPor, LLaPorConfig, LLaPorPredictor, params_of

    log = log or tqdm.write  # between progress-bar updates, not through them
    t0 = time.perf_counter()
    train_trace = load_trace(trace_dir, "train")
    val_trace = load_trace(trace_dir, "validation")
    N, L, d = train_trace.hidden.shape
    E, k = train_trace.num_experts, train_trace.expert_ids.shape[-1]
    if val_trace.hidden.shape[1:] != (L, d) or val_trace.num_experts != E:
        raise JaxmoeError(f"{trace_dir}: train and validation splits have different shapes")
    cfg = LLaPorConfig(hidden_size=d, num_experts=E, num_moe_layers=L, top_k=k, horizon=horizon, width=width, depth=depth,
                       use_history=use_history, use_lookahead=lookahead_kernels is not None, activation=activation,
                       use_current=use_current)
    data = _device_data(train_trace, horizon)
    model = LLaPor(cfg, nnx.Rngs(seed), lookahead_kernels)
    graphdef, params, frozen = nnx.split(model, nnx.Param, Frozen)
    warmup = max(1, min(200, steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay))
    opt_state = opt.init(params)

    @jax.jit
    def step(params, frozen, opt_state, key):
        k_rows, k_pos = jax.random.split(key)
        rows = jax.random.randint(k_rows, (batch_size,), 0, N)
        pos = jax.random.randint(k_pos, (batch_size,), 0, L)
        hidden, logits, history, target, valid = _gather(data, rows, pos, E)

        def f(p):
            return loss_fn(nnx.merge(graphdef, p, frozen), hidden, logits, pos, history, target, valid)

        loss, grads = jax.value_and_grad(f)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def evaluate(params, max_pairs):
        return validation_recall(LLaPorPredictor(cfg, params_of(nnx.merge(graphdef, params, frozen))), val_trace, horizon,
                                 k, max_pairs, seed)

    eval_every = eval_every or max(1, steps // 10)
    curve = []
    key = jax.random.key(seed)
    running = None
    bar = tqdm(range(1, steps + 1), desc="training llapor", unit="step", disable=not progress, file=sys.stderr)
    for i in bar:
        key, sub = jax.random.split(key)
        params, opt_state, loss = step(params, frozen, opt_state, sub)
        if i % 20 == 0 or i % eval_every == 0 or i == steps:
            loss = float(loss)
            running = loss if running is None else 0.9 * running + 0.1 * loss
            bar.set_postfix(loss=f"{running:.4f}")
        if i % eval_every == 0 or i == steps:
            recall = evaluate(params, 20000)
            curve.append({"step": i, "train_loss": running, "val_recall_at_k": recall})
            log(f"step {i:6d}  loss {running:.4f}  val recall@{k} " + "  ".join(f"h{j}={v:.3f}" for j, v in recall.items()))
    bar.close()
    final = evaluate(params, None)
    log("final val recall@%d " % k + "  ".join(f"h{j}={v:.3f}" for j, v in final.items()))
    report = {"config": dataclasses.asdict(cfg), "steps": steps, "batch_size": batch_size, "lr": lr,
              "weight_decay": weight_decay, "seed": seed, "train_tokens": int(N), "val_tokens": val_trace.num_tokens,
              "curve": curve, "final_val_recall_at_k": final, "seconds": round(time.perf_counter() - t0, 1)}
    return cfg, params_of(nnx.merge(graphdef, params, frozen)), report


def write_predictor(out_dir: Path, cfg, params: dict, report: dict, trace_model: dict, force: bool) -> None:
    """Saves into a temporary sibling directory, then renames it onto `out_dir`."""
    from predictors.llapor import save

    out_dir = Path(os.path.abspath(out_dir))
    tmp_dir = out_dir.parent / f".{out_dir.name}.training-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    try:
        save(tmp_dir, cfg, params, {"trained_on": trace_model})
        (tmp_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        if out_dir.exists():
            trash = out_dir.parent / f".{out_dir.name}.replaced-{os.getpid()}"
            out_dir.rename(trash)
            tmp_dir.rename(out_dir)
            if trash.is_dir() and not trash.is_symlink():
                shutil.rmtree(trash, ignore_errors=True)
            else:
                trash.unlink()
        else:
            tmp_dir.rename(out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def lookahead_model(trace_dir: Path, model_dir: Path | None, log=print) -> Path | None:
    """The model whose routers feed the lookahead feature: `model_dir`, else the trace's own model if it is
    still where the manifest says (None, with a note, if not). Refuses a model the trace was not made with."""
    import hashlib

    from jaxmoe.config import CONFIG_FILE

    traced = json.loads((Path(trace_dir) / "manifest.json").read_text()).get("model", {})
    if model_dir is None:
        model_dir = traced.get("model_dir")
        if not model_dir or not (Path(model_dir) / CONFIG_FILE).is_file():
            log(f"note: the trace's model {model_dir!r} is not here; training without the lookahead feature "
                "(pass --model DIR to use it)")
            return None
    model_dir = Path(model_dir)
    config = model_dir / CONFIG_FILE
    if not config.is_file():
        raise JaxmoeError(f"--model {model_dir}: no {CONFIG_FILE}; is it a model converted with `python -m convert`?")
    want = traced.get("config_sha256")
    if want and hashlib.sha256(config.read_bytes()).hexdigest() != want:
        raise JaxmoeError(f"--model {model_dir}: its {CONFIG_FILE} differs from the model {trace_dir} was traced with")
    return model_dir


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one `error: ...` line and exit 2 (no usage dump)
        self.exit(2, f"error: {message} (see python -m predictors.train --help)\n")


def main(argv=None) -> int:
    p = _Parser(prog="python -m predictors.train", description="Train the LLaPor expert-routing predictor on a trace.")
    p.add_argument("--traces", type=Path, required=True, help="trace directory (python -m predictors.trace)")
    p.add_argument("--out", type=Path, required=True, help="predictor directory to create")
    p.add_argument("--horizon", type=int, default=MAX_HORIZON, help=f"MoE positions ahead, 1..{MAX_HORIZON}")
    p.add_argument("--steps", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=256, help="trunk width D")
    p.add_argument("--depth", type=int, default=2, help="residual MLP blocks in the trunk")
    p.add_argument("--batch-size", type=int, default=512, help="(token, position) pairs per step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--no-history", action="store_true", help="without the most-recent-routing feature")
    p.add_argument("--no-current", action="store_true", help="without the current layer's weighted top-k feature")
    p.add_argument("--model", type=Path, default=None,
                   help="converted model of the trace, for the gate-lookahead feature (default: the trace manifest's model_dir)")
    p.add_argument("--no-lookahead", action="store_true", help="without the gate-lookahead feature")
    p.add_argument("--activation", choices=("relu", "gelu"), default="relu")
    p.add_argument("--eval-every", type=int, default=None, help="validation every N steps (default steps/10)")
    p.add_argument("--force", action="store_true", help="replace PRED_DIR if it exists")
    args = p.parse_args(argv)
    try:
        if args.out.exists() and not args.force:
            raise JaxmoeError(f"{args.out}: already exists; pass --force to replace it")
        if not 1 <= args.horizon <= MAX_HORIZON:
            raise JaxmoeError(f"--horizon must be in 1..{MAX_HORIZON}, got {args.horizon}")
        if min(args.steps, args.width, args.depth, args.batch_size) < 1:
            raise JaxmoeError("--steps, --width, --depth and --batch-size must be positive")
        manifest = read_manifest(args.traces)
        kernels = None
        if not args.no_lookahead:
            from predictors.llapor import router_lookahead_kernels

            model_dir = lookahead_model(args.traces, args.model, log=lambda m: print(m, file=sys.stderr))
            kernels = None if model_dir is None else router_lookahead_kernels(model_dir)
        cfg, params, report = train(args.traces, args.horizon, args.steps, args.seed, args.width, args.depth,
                                    args.batch_size, args.lr, use_history=not args.no_history, lookahead_kernels=kernels,
                                    activation=args.activation, eval_every=args.eval_every,
                                    use_current=not args.no_current)
        report["traces"] = str(args.traces)
        report["command"] = " ".join(["python -m predictors.train", *(sys.argv[1:] if argv is None else argv)])
        write_predictor(args.out, cfg, params, report, manifest.get("model", {}), args.force)
    except JaxmoeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} (validation recall@{cfg.top_k}: "
          + ", ".join(f"h{j} {v:.3f}" for j, v in report["final_val_recall_at_k"].items()) + ")", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
