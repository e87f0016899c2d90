"""CLI: python -m predictors.evaluate --model DIR --traces TRACE_DIR [--predictor PRED_DIR] --output-json PATH

Replays the validation split of a routing trace through every predictor exactly as the offloading
runtime calls them: `reset()` at each document start, then for each token and MoE position p
`observe(p, true ids)` followed by `predict(p, hidden, router_logits, H)` (the order of
`jaxmoe.offload`: a layer's routing is known before its prefetch is planned). Scores for horizon j are
checked against the experts the target position (p + j, wrapping to the next token) really chose:

    recall@k     |top-k ∩ chosen| / |chosen|        (k = the model's experts per token)
    recall@2k    |top-2k ∩ chosen| / |chosen|
    precision@k  |top-k ∩ chosen| / k               (= recall@k when each token picks k distinct experts)

averaged over every (token, position) whose target lies inside the document. The frequency predictor is
warmed on the train split's counts first. Stateless predictors (gate-lookahead, LLaPor, whose only state
is the last routing seen per position) are run batched, which gives the same scores (checked by the
tests); the others call by call. Per-call cost (µs) of predict and observe is measured call by call for
all of them. Writes `{"<predictor>": {"<horizon>": {...}}, "cost_us": {...}}` to PATH, a PNG plot next
to it, and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from jaxmoe.errors import JaxmoeError
from predictors.base import MAX_HORIZON, FrequencyPredictor, GateLookaheadPredictor, PreviousTokenPredictor
from predictors.trace_format import TraceData, load_trace
from predictors.train import history_khot, khot, target_indices

METRICS = ("recall_at_k", "recall_at_2k", "precision_at_k")
COST_TOKENS = 200  # tokens (x MoE positions) timed call by call per predictor


class Metrics:
    """Running sums of the three metrics per horizon."""

    def __init__(self, horizon: int, top_k: int):
        self.top_k = top_k
        self.sums = np.zeros((len(METRICS), horizon))
        self.count = np.zeros(horizon)

    def add(self, scores: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> None:
        """scores float32[B, H, E], truth k-hot float32[B, H, E], valid bool[B, H]."""
        order = np.argsort(-scores, -1, kind="stable")
        k = self.top_k
        hit_k = np.take_along_axis(truth, order[..., :k], -1).sum(-1)  # [B, H]
        hit_2k = np.take_along_axis(truth, order[..., : 2 * k], -1).sum(-1)
        chosen = np.maximum(truth.sum(-1), 1)
        for i, value in enumerate((hit_k / chosen, hit_2k / chosen, hit_k / k)):
            self.sums[i] += (value * valid).sum(0)
        self.count += valid.sum(0)

    def result(self) -> dict:
        return {str(j + 1): {m: float(self.sums[i, j] / max(self.count[j], 1)) for i, m in enumerate(METRICS)}
                for j in range(len(self.count))}


def _truth(trace: TraceData, tgt_tok, tgt_layer, rows, pos):
    tok = tgt_tok[rows, pos]  # [B, H]
    return khot(trace.expert_ids[np.maximum(tok, 0), tgt_layer[pos]], trace.num_experts), tok >= 0


def documents(trace: TraceData) -> list[tuple[int, int]]:
    """[start, end) token ranges of the documents, in trace order."""
    cut = np.flatnonzero((trace.doc_id[1:] != trace.doc_id[:-1]) | (trace.position[1:] != trace.position[:-1] + 1)) + 1
    bounds = [0, *cut.tolist(), trace.num_tokens]
    return list(zip(bounds[:-1], bounds[1:]))


def replay(predictor, trace: TraceData, horizon: int, top_k: int) -> dict:
    """Call-by-call replay as the runtime drives a predictor -> metrics per horizon."""
    tgt_tok, _, tgt_layer = target_indices(trace, horizon)
    metrics = Metrics(horizon, top_k)
    L = trace.num_moe_layers
    for start, end in documents(trace):
        predictor.reset()
        scores = np.empty((end - start, L, horizon, trace.num_experts), np.float32)
        for t in range(start, end):
            for p in range(L):
                predictor.observe(p, trace.expert_ids[t, p].astype(np.int64))
                scores[t - start, p] = predictor.predict(p, trace.hidden[t, p].astype(np.float32),
                                                         trace.router_logits[t, p], horizon)
        rows = np.repeat(np.arange(start, end), L)
        pos = np.tile(np.arange(L), end - start)
        truth, valid = _truth(trace, tgt_tok, tgt_layer, rows, pos)
        metrics.add(scores.reshape(-1, horizon, trace.num_experts), truth, valid)
    return metrics.result()


def batched_scores(predictor, trace: TraceData, rows, pos, hist_tok, tgt_layer, horizon: int) -> np.ndarray:
    """Scores float32[B, H, E] of a stateless predictor for pairs (rows, pos), equal to its replay's."""
    hidden = trace.hidden[rows, pos].astype(np.float32)
    logits = trace.router_logits[rows, pos]
    if isinstance(predictor, GateLookaheadPredictor):
        layers = tgt_layer[pos, :horizon]  # [B, H]
        normed = hidden / np.sqrt(np.mean(hidden * hidden, -1, keepdims=True) + predictor.eps)
        x = normed[:, None, :] * predictor.norm_scales[layers]  # [B, H, d]
        scores = np.einsum("bhd,bhde->bhe", x, predictor.router_kernels[layers])
        if predictor.logit_bias is not None:
            scores = scores + predictor.logit_bias[layers]
        if predictor.selection_bias is not None:
            scores = 1.0 / (1.0 + np.exp(-scores)) + predictor.selection_bias[layers]
        return scores
    if predictor.horizon != horizon:
        raise JaxmoeError(f"batched replay needs the predictor's trained horizon {predictor.horizon}, got {horizon}")
    history = history_khot(trace, hist_tok, tgt_layer, pos, rows)
    return predictor.forward_batch(hidden, logits, pos, history)


def replay_batched(predictor, trace: TraceData, horizon: int, top_k: int) -> dict:
    tgt_tok, hist_tok, tgt_layer = target_indices(trace, horizon)
    metrics = Metrics(horizon, top_k)
    rows, pos = np.meshgrid(np.arange(trace.num_tokens), np.arange(trace.num_moe_layers), indexing="ij")
    rows, pos = rows.reshape(-1), pos.reshape(-1)
    for start in range(0, len(rows), 4096):
        r, p = rows[start:start + 4096], pos[start:start + 4096]
        scores = batched_scores(predictor, trace, r, p, hist_tok, tgt_layer, horizon)
        truth, valid = _truth(trace, tgt_tok, tgt_layer, r, p)
        metrics.add(scores, truth, valid)
    return metrics.result()


def call_cost_us(predictor, trace: TraceData, horizon: int, tokens: int = COST_TOKENS) -> dict:
    """Mean wall time of one predict and one observe call (µs), timed call by call."""
    predictor.reset()
    L = trace.num_moe_layers
    hidden = trace.hidden[:tokens].astype(np.float32)
    logits, ids = trace.router_logits[:tokens], trace.expert_ids[:tokens].astype(np.int64)
    t_predict = t_observe = 0.0
    calls = 0
    for t in range(len(hidden)):
        for p in range(L):
            a = time.perf_counter()
            predictor.observe(p, ids[t, p])
            b = time.perf_counter()
            predictor.predict(p, hidden[t, p], logits[t, p], horizon)
            c = time.perf_counter()
            t_observe += b - a
            t_predict += c - b
            calls += 1
    predictor.reset()
    return {"predict": round(1e6 * t_predict / calls, 2), "observe": round(1e6 * t_observe / calls, 2)}


def build_predictors(model_dir: Path, train_trace: TraceData, predictor_dir: Path | None) -> dict:
    from jaxmoe.checkpoint import load_resident

    from flax import nnx

    cfg, _, state = load_resident(model_dir)
    pure = nnx.to_pure_dict(state)
    L, E = len(cfg.moe_layer_ids), cfg.num_experts
    frequency = FrequencyPredictor(L, E)
    for p in range(L):  # the same counts as observing every train token in order
        frequency.counts[p] = np.bincount(train_trace.expert_ids[:, p].reshape(-1).astype(np.int64), minlength=E)
    predictors = {
        "frequency": frequency,
        "previous-token": PreviousTokenPredictor(L, E),
        "gate-lookahead": GateLookaheadPredictor.from_layer_trees([pure["layers"][i] for i in cfg.moe_layer_ids],
                                                                  cfg.rms_norm_eps, cfg.norm_unit_offset),
    }
    if predictor_dir is not None:
        from predictors.llapor import LLaPorPredictor

        llapor = LLaPorPredictor.load(predictor_dir)
        if (llapor.num_moe_layers, llapor.num_experts, llapor.hidden_size) != (L, E, cfg.hidden_size):
            raise JaxmoeError(f"--predictor {predictor_dir}: trained for {llapor.num_moe_layers} MoE layers x "
                              f"{llapor.num_experts} experts (d={llapor.hidden_size}), the model has {L} x {E} (d={cfg.hidden_size})")
        if llapor.horizon < MAX_HORIZON:
            raise JaxmoeError(f"--predictor {predictor_dir}: trained for horizon {llapor.horizon}, evaluation needs {MAX_HORIZON}")
        predictors["llapor"] = llapor
    return cfg, predictors


def evaluate(model_dir: Path, trace_dir: Path, predictor_dir: Path | None = None, horizon: int = MAX_HORIZON,
             batched: bool = True, log=lambda msg: print(msg, file=sys.stderr)) -> tuple[dict, int]:
    """-> ({"<predictor>": {"<horizon>": {metric: float}}, "cost_us": {"<predictor>": {"predict", "observe"}}}, k)."""
    val = load_trace(trace_dir, "validation")
    train = load_trace(trace_dir, "train")
    from jaxmoe.config import load_config

    cfg = load_config(model_dir)
    shape = (len(cfg.moe_layer_ids), cfg.num_experts, cfg.hidden_size, cfg.num_experts_per_tok)
    got = (val.num_moe_layers, val.num_experts, val.hidden.shape[2], val.expert_ids.shape[2])
    if shape != got:
        raise JaxmoeError(f"{trace_dir}: trace shapes (MoE layers, experts, hidden, top-k) {got} do not match "
                          f"the model {model_dir} {shape}")
    cfg, predictors = build_predictors(model_dir, train, predictor_dir)
    k = cfg.num_experts_per_tok
    results, cost = {}, {}
    for name, predictor in predictors.items():
        t0 = time.perf_counter()
        stateless = isinstance(predictor, GateLookaheadPredictor) or hasattr(predictor, "forward_batch")
        if batched and stateless:
            results[name] = replay_batched(predictor, val, horizon, k)
        else:
            results[name] = replay(predictor, val, horizon, k)
        cost[name] = call_cost_us(predictor, val, horizon)
        log(f"evaluated {name} in {time.perf_counter() - t0:.1f}s")
    return {**results, "cost_us": cost}, k


def table(report: dict, k: int) -> str:
    names = [n for n in report if n != "cost_us"]
    horizons = sorted({h for n in names for h in report[n]}, key=int)
    head = f"{'predictor':<16}" + "".join(f"  {'h' + h + ' R@' + str(k):>9} {'R@' + str(2 * k):>6} {'P@' + str(k):>6}" for h in horizons)
    lines = [head + f"  {'predict µs':>10} {'observe µs':>10}", "-" * (len(head) + 22)]
    for n in names:
        row = f"{n:<16}" + "".join(f"  {report[n][h]['recall_at_k']:>9.3f} {report[n][h]['recall_at_2k']:>6.3f} "
                                   f"{report[n][h]['precision_at_k']:>6.3f}" for h in horizons)
        c = report["cost_us"][n]
        lines.append(row + f"  {c['predict']:>10.1f} {c['observe']:>10.1f}")
    return "\n".join(lines)


def plot(report: dict, k: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in report if n != "cost_us"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, metric, label in zip(axes, ("recall_at_k", "recall_at_2k"), (f"recall@{k}", f"recall@{2 * k}")):
        for n in names:
            hs = sorted(report[n], key=int)
            ax.plot([int(h) for h in hs], [report[n][h][metric] for h in hs], marker="o", label=n)
        ax.set_xlabel("horizon (MoE layers ahead)")
        ax.set_title(label)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation split")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (see python -m predictors.evaluate --help)\n")


def main(argv=None) -> int:
    p = _Parser(prog="python -m predictors.evaluate", description="Recall/precision of every expert predictor on a trace.")
    p.add_argument("--model", type=Path, required=True, help="converted model directory the trace was made with")
    p.add_argument("--traces", type=Path, required=True, help="trace directory")
    p.add_argument("--predictor", type=Path, default=None, help="trained LLaPor directory (python -m predictors.train)")
    p.add_argument("--output-json", type=Path, required=True, help="where to write the metrics (a .png plot goes next to it)")
    p.add_argument("--call-by-call", action="store_true", help="replay stateless predictors call by call too (slower)")
    args = p.parse_args(argv)
    try:
        report, k = evaluate(args.model, args.traces, args.predictor, batched=not args.call_by_call)
    except JaxmoeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.output_json.parent.mkdir(parents=True, exist_ok=True)
    args.output_json.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, k, args.output_json.with_suffix(".png"))
    print(table(report, k))
    print(f"wrote {args.output_json} and {args.output_json.with_suffix('.png')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
