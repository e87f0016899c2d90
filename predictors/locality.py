"""CLI: python -m predictors.locality TRACE_DIR [--max-tokens N] [--model DIR] [--out-dir DIR] [--no-plots]

Routing-locality report of a trace (`predictors.trace`): prints a table, writes
TRACE_DIR/locality/locality.json and PNG plots next to it (load.png, reuse.png, coactivation.png, recall.png).

  load          per MoE layer: share of the routed (token, expert) pairs each expert got; max/mean and
                min/mean of the per-expert counts, their coefficient of variation, entropy (bits) and entropy
                normalised by log2(E); unused experts. Over all tokens of both splits.
  reuse         per MoE layer: fraction of a token's k experts also chosen by the previous token of the same
                document at that layer (random routing: k/E); `window_coverage[w]` the fraction chosen by any
                of the previous w tokens (what an LRU-ish cache of recent experts would hold). All tokens
                that have a predecessor.
  coactivation  per pair of consecutive MoE layers (p, p+1): conditional probabilities P(e' at p+1 | e at p)
                counted on the train split; `recall_at_k`: validation recall of predicting p+1's experts as the
                top-k of the summed rows of p's chosen experts; mutual information (bits) of the (e, e')
                pair distribution and MI / min(H(e), H(e')).
  baselines     recall@k (k = experts per token) on the validation split of the training-free predictors of
                `predictors.base` (previous-token, frequency warmed with the train split's counts, and
                gate-lookahead built from the model's routers; the model directory comes from the manifest
                or --model) at horizons 1..3, replayed as the runtime calls them: `reset()` at each document
                start, then per token and MoE position p `observe(p, chosen)` and `predict(p, hidden, logits, 3)`.
                Horizon j targets position p + j, wrapping to the next token's first MoE layers. A target
                counts when its token lies in the document and has a predecessor there (the first token of a
                document has no history for any predictor to use). Ties in the scores break towards lower
                expert ids (stable sort), as in `predictors.evaluate`.

--max-tokens N keeps the first N tokens of each split (whole or cut documents; faster on big traces).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from jaxmoe.errors import JaxmoeError
from predictors.base import FrequencyPredictor, GateLookaheadPredictor, PreviousTokenPredictor
from predictors.trace_format import ARRAYS, TraceData, load_trace, read_manifest

HORIZONS = 3
WINDOWS = (1, 2, 4, 8, 16)
OUT_SUBDIR = "locality"
REPORT_FILE = "locality.json"


# -- helpers ----------------------------------------------------------------------------------------------
def truncate(trace: TraceData, max_tokens: int | None) -> TraceData:
    if max_tokens is None or trace.num_tokens <= max_tokens:
        return trace
    return TraceData(**{k: getattr(trace, k)[:max_tokens] for k in ARRAYS}, manifest=trace.manifest)


def previous_index(trace: TraceData) -> np.ndarray:
    """int[N]: row of the previous token of the same document, -1 where there is none."""
    prev = np.full(trace.num_tokens, -1, np.int64)
    same = (trace.doc_id[1:] == trace.doc_id[:-1]) & (trace.position[1:] == trace.position[:-1] + 1)
    prev[1:] = np.where(same, np.arange(trace.num_tokens - 1), -1)
    return prev


def khot(expert_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """int[..., k] -> bool[..., E]."""
    out = np.zeros((*expert_ids.shape[:-1], num_experts), bool)
    np.put_along_axis(out, expert_ids.astype(np.int64), True, axis=-1)
    return out


def topk_hits(scores: np.ndarray, truth: np.ndarray, k: int) -> np.ndarray:
    """scores float[..., E], truth bool[..., E] -> |top-k(scores) ∩ truth| (stable: ties -> lower ids)."""
    top = np.argsort(-scores, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(truth, top, -1).sum(-1)


def entropy_bits(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


# -- statistics --------------------------------------------------------------------------------------------
def load_stats(trace: TraceData) -> list[dict]:
    E, L = trace.num_experts, trace.num_moe_layers
    out = []
    for p in range(L):
        counts = np.bincount(trace.expert_ids[:, p].reshape(-1).astype(np.int64), minlength=E).astype(np.float64)
        share = counts / counts.sum()
        mean = counts.mean()
        h = entropy_bits(share)
        out.append({
            "share": share.round(6).tolist(),
            "max_over_mean": float(counts.max() / mean),
            "min_over_mean": float(counts.min() / mean),
            "cv": float(counts.std() / mean),
            "entropy_bits": h,
            "normalized_entropy": h / np.log2(E) if E > 1 else 1.0,
            "unused_experts": int((counts == 0).sum()),
        })
    return out


def reuse_stats(trace: TraceData, top_k: int) -> dict:
    """Consecutive-token reuse per layer and coverage of a token's experts by the last w tokens."""
    prev = previous_index(trace)
    hot = khot(trace.expert_ids, trace.num_experts)  # [N, L, E]
    has_prev = prev >= 0
    seen = np.zeros_like(hot)
    back = np.arange(trace.num_tokens)
    coverage = {}
    for w in range(1, max(WINDOWS) + 1):
        back = np.where(back >= 0, prev[np.maximum(back, 0)], -1)  # the token w steps back (-1: none)
        seen |= hot[np.maximum(back, 0)] & (back >= 0)[:, None, None]
        if w in WINDOWS:
            covered = (seen & hot).sum(-1) / top_k  # [N, L]
            coverage[str(w)] = covered[has_prev].mean(0).tolist() if has_prev.any() else [0.0] * hot.shape[1]
    per_layer = coverage["1"]
    q = top_k / trace.num_experts
    return {"per_layer": per_layer, "mean": float(np.mean(per_layer)), "tokens": int(has_prev.sum()),
            "random_expectation": q, "window_coverage": coverage,
            # independent uniformly random routing: 1 - (1 - k/E)^w
            "random_window_coverage": {str(w): 1 - (1 - q) ** w for w in WINDOWS}}


def coactivation_stats(train: TraceData, val: TraceData, top_k: int) -> dict:
    """Layer p -> p+1 co-occurrence counted on train; recall of predicting p+1 from p's choice on validation."""
    E, L = train.num_experts, train.num_moe_layers
    hot_tr = khot(train.expert_ids, E).astype(np.float64)
    hot_va = khot(val.expert_ids, E)
    pairs, conditional = [], []
    for p in range(L - 1):
        counts = hot_tr[:, p].T @ hot_tr[:, p + 1]  # [E, E]: tokens choosing e at p and e' at p+1
        cond = counts / np.maximum(counts.sum(1, keepdims=True), 1)  # P(e' at p+1 | e at p)
        scores = hot_va[:, p].astype(np.float64) @ cond  # [N, E]
        recall = float(topk_hits(scores, hot_va[:, p + 1], top_k).mean() / top_k)
        joint = counts / max(counts.sum(), 1)
        row, col = joint.sum(1), joint.sum(0)
        nz = joint > 0
        mi = float((joint[nz] * np.log2(joint[nz] / (row[:, None] * col[None, :])[nz])).sum())
        denom = min(entropy_bits(row), entropy_bits(col))
        pairs.append({"from": p, "to": p + 1, "recall_at_k": recall, "mutual_information_bits": mi,
                      "normalized_mi": mi / denom if denom > 0 else 0.0})
        conditional.append(cond.round(5).tolist())
    mean = float(np.mean([q["recall_at_k"] for q in pairs])) if pairs else None  # one MoE layer: no pairs
    return {"pairs": pairs, "mean_recall_at_k": mean, "conditional": conditional}


def replay_recall(predictor, trace: TraceData, top_k: int, horizon: int = HORIZONS) -> tuple[list[float], list[int]]:
    """Call-by-call replay (see module docstring) -> (recall@k per horizon, targets per horizon)."""
    L, E = trace.num_moe_layers, trace.num_experts
    hot = khot(trace.expert_ids, E)
    prev = previous_index(trace)
    starts = np.flatnonzero(prev < 0).tolist() + [trace.num_tokens]
    hits, counts = np.zeros(horizon), np.zeros(horizon, np.int64)
    ahead = np.array([[(p + j) // L for j in range(1, horizon + 1)] for p in range(L)])  # [L, H]
    layer = np.array([[(p + j) % L for j in range(1, horizon + 1)] for p in range(L)])
    for start, end in zip(starts[:-1], starts[1:]):
        predictor.reset()
        n = end - start
        scores = np.empty((n, L, horizon, E), np.float32)
        for t in range(start, end):
            for p in range(L):
                predictor.observe(p, trace.expert_ids[t, p].astype(np.int64))
                scores[t - start, p] = predictor.predict(p, trace.hidden[t, p].astype(np.float32),
                                                         trace.router_logits[t, p], horizon)
        tgt = np.arange(n)[:, None, None] + ahead[None]  # [n, L, H] document-relative target token
        valid = (tgt < n) & (tgt >= 1)
        truth = hot[start + np.minimum(tgt, n - 1), layer[None]]  # [n, L, H, E]
        got = topk_hits(scores, truth, top_k) / top_k
        hits += (got * valid).sum((0, 1))
        counts += valid.sum((0, 1))
    return (hits / np.maximum(counts, 1)).tolist(), counts.tolist()


def gate_lookahead(model_dir: Path, trace: TraceData) -> GateLookaheadPredictor:
    from flax import nnx

    from jaxmoe.checkpoint import load_resident

    cfg, _, state = load_resident(model_dir)
    shape = (len(cfg.moe_layer_ids), cfg.num_experts, cfg.hidden_size)
    if shape != (trace.num_moe_layers, trace.num_experts, trace.hidden.shape[2]):
        raise JaxmoeError(f"--model {model_dir}: (MoE layers, experts, hidden) {shape} do not match the trace's "
                          f"{(trace.num_moe_layers, trace.num_experts, trace.hidden.shape[2])}")
    pure = nnx.to_pure_dict(state)
    return GateLookaheadPredictor.from_layer_trees([pure["layers"][i] for i in cfg.moe_layer_ids], cfg.rms_norm_eps,
                                                   cfg.norm_unit_offset)


def baseline_recall(train: TraceData, val: TraceData, top_k: int, model_dir: Path | None, notes: list) -> dict:
    L, E = train.num_moe_layers, train.num_experts
    frequency = FrequencyPredictor(L, E)
    for p in range(L):  # the counts observing every train token would give
        frequency.counts[p] = np.bincount(train.expert_ids[:, p].reshape(-1).astype(np.int64), minlength=E)
    predictors = {"previous-token": PreviousTokenPredictor(L, E), "frequency": frequency}
    if model_dir is None:
        notes.append("gate-lookahead skipped: the manifest names no model directory (pass --model)")
    elif not Path(model_dir).is_dir():
        notes.append(f"gate-lookahead skipped: model directory {model_dir} not found (pass --model)")
    else:
        predictors["gate-lookahead"] = gate_lookahead(Path(model_dir), val)
    out, targets = {}, None
    for name, predictor in predictors.items():
        recall, targets = replay_recall(predictor, val, top_k)
        out[name] = {str(j + 1): r for j, r in enumerate(recall)}
    return {"recall_at_k": out, "targets": {str(j + 1): c for j, c in enumerate(targets)}}


# -- report ------------------------------------------------------------------------------------------------
def locality_report(trace_dir: Path, max_tokens: int | None = None, model_dir: Path | None = None,
                    out_dir: Path | None = None, plots: bool = True) -> dict:
    trace_dir = Path(trace_dir)
    manifest = read_manifest(trace_dir)
    if max_tokens is not None and max_tokens < 1:
        raise JaxmoeError("--max-tokens must be >= 1")
    splits = {info["split"] for info in manifest["documents"].values()}
    for split in ("train", "validation"):
        if split not in splits:
            raise JaxmoeError(f"{trace_dir}: no {split} documents; re-trace with more documents or another "
                              f"--validation-fraction / --seed")
    train = truncate(load_trace(trace_dir, "train"), max_tokens)
    val = truncate(load_trace(trace_dir, "validation"), max_tokens)
    both = TraceData(**{k: np.concatenate([getattr(train, k), getattr(val, k)]) for k in ARRAYS}, manifest=manifest)
    info = manifest.get("model", {})
    top_k = int(info.get("top_k", train.expert_ids.shape[2]))
    moe_layer_ids = info.get("moe_layer_ids", list(range(train.num_moe_layers)))
    notes: list[str] = []
    if model_dir is None and info.get("model_dir"):
        model_dir = Path(info["model_dir"])
    if model_dir is not None and Path(model_dir).is_dir() and info.get("config_sha256"):
        from predictors.trace import config_hash

        if config_hash(Path(model_dir)) != info["config_sha256"]:
            notes.append(f"{model_dir}/jaxmoe.json differs from the traced model's (hash mismatch)")
    report = {
        "trace_dir": str(trace_dir.resolve()),
        "model": info,
        "top_k": top_k,
        "num_experts": train.num_experts,
        "moe_layer_ids": moe_layer_ids,
        "tokens": {"train": train.num_tokens, "validation": val.num_tokens},
        "max_tokens": max_tokens,
        "load": load_stats(both),
        "reuse": reuse_stats(both, top_k),
        "coactivation": coactivation_stats(train, val, top_k),
        "baselines": baseline_recall(train, val, top_k, model_dir, notes),
        "notes": notes,
    }
    out_dir = Path(out_dir) if out_dir is not None else trace_dir / OUT_SUBDIR
    out_dir.mkdir(parents=True, exist_ok=True)
    if plots:
        report["plots"] = write_plots(report, out_dir)
    tmp = out_dir / f".{REPORT_FILE}.tmp"
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.rename(out_dir / REPORT_FILE)
    report["report_file"] = str(out_dir / REPORT_FILE)
    return report


def format_table(report: dict) -> str:
    k, E = report["top_k"], report["num_experts"]
    lines = [f"routing locality of {report['trace_dir']} ({report['model'].get('name', '?')}: "
             f"{len(report['moe_layer_ids'])} MoE layers x {E} experts, top-{k}; tokens train "
             f"{report['tokens']['train']}, validation {report['tokens']['validation']})", ""]
    reuse, coact = report["reuse"], report["coactivation"]["pairs"]
    lines.append(f"{'moe pos':>7} {'layer':>5} {'max/mean':>8} {'min/mean':>8} {'cv':>5} {'H/Hmax':>6} {'unused':>6} "
                 f"{'reuse@1':>7} {'cover@4':>7} {'cover@16':>8} {'coact->next':>11} {'NMI->next':>9}")
    for p, st in enumerate(report["load"]):
        nxt = coact[p] if p < len(coact) else None
        lines.append(
            f"{p:>7} {report['moe_layer_ids'][p]:>5} {st['max_over_mean']:>8.2f} {st['min_over_mean']:>8.2f} "
            f"{st['cv']:>5.2f} {st['normalized_entropy']:>6.3f} {st['unused_experts']:>6} "
            f"{reuse['per_layer'][p]:>7.3f} {reuse['window_coverage']['4'][p]:>7.3f} "
            f"{reuse['window_coverage']['16'][p]:>8.3f} "
            + (f"{nxt['recall_at_k']:>11.3f} {nxt['normalized_mi']:>9.3f}" if nxt else f"{'-':>11} {'-':>9}"))
    coact_mean = report["coactivation"]["mean_recall_at_k"]
    rand = reuse["random_window_coverage"]
    lines.append(f"mean consecutive-token reuse {reuse['mean']:.3f} (uniformly random routing: reuse@1 "
                 f"{reuse['random_expectation']:.3f}, cover@4 {rand['4']:.3f}, cover@16 {rand['16']:.3f})"
                 + (f"; layer->next-layer co-activation recall@{k} {coact_mean:.3f}" if coact_mean is not None else ""))
    lines.append("")
    base = report["baselines"]
    lines.append(f"baseline recall@{k} on validation     " + "  ".join(f"{'h=' + h:>6}" for h in base["targets"]))
    for name, rec in base["recall_at_k"].items():
        lines.append(f"  {name:<35}" + "  ".join(f"{rec[h]:>6.3f}" for h in base["targets"]))
    lines.append(f"  {'(targets)':<35}" + "  ".join(f"{c:>6}" for c in base["targets"].values()))
    for note in report["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def write_plots(report: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k, E = report["top_k"], report["num_experts"]
    layers = report["moe_layer_ids"]
    L = len(layers)
    files = []

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    share = np.array([st["share"] for st in report["load"]])  # [L, E]
    im = axes[0].imshow(share * E, aspect="auto", cmap="viridis", interpolation="nearest")
    axes[0].set(xlabel="expert", ylabel="MoE layer", title="expert load (share x E; 1 = uniform)",
                yticks=range(L), yticklabels=layers)
    fig.colorbar(im, ax=axes[0])
    for p in range(L):
        axes[1].plot(np.sort(share[p])[::-1] * E, label=f"layer {layers[p]}", alpha=0.8)
    axes[1].axhline(1.0, color="k", ls="--", lw=0.8)
    axes[1].set(xlabel="expert rank", ylabel="load / uniform", title="sorted expert load per layer")
    if L <= 12:
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    files.append(_save(fig, out_dir / "load.png"))

    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    cov = report["reuse"]["window_coverage"]
    for w, values in cov.items():
        line, = ax.plot(range(L), values, marker="o", label=f"last {w} token(s)")
        ax.axhline(report["reuse"]["random_window_coverage"][w], color=line.get_color(), ls="--", lw=0.8)
    ax.set(xlabel="MoE layer", ylabel=f"share of a token's {k} experts", ylim=(0, 1.02),
           title="experts already chosen by recent tokens (same layer; dashed: random routing)",
           xticks=range(L), xticklabels=layers)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    files.append(_save(fig, out_dir / "reuse.png"))

    cond = report["coactivation"]["conditional"]
    if cond:
        n = min(len(cond), 8)
        cols = min(n, 4)
        rows = -(-n // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
        for i in range(rows * cols):
            ax = axes[i // cols][i % cols]
            if i >= n:
                ax.axis("off")
                continue
            pair = report["coactivation"]["pairs"][i]
            ax.imshow(np.array(cond[i]), cmap="magma", interpolation="nearest", vmin=0)
            ax.set_title(f"P(e' @ {layers[pair['to']]} | e @ {layers[pair['from']]})\nrecall@{k} "
                         f"{pair['recall_at_k']:.2f}", fontsize=8)
            ax.set_xlabel("e'", fontsize=7)
            ax.set_ylabel("e", fontsize=7)
        fig.tight_layout()
        files.append(_save(fig, out_dir / "coactivation.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rec = report["baselines"]["recall_at_k"]
    horizons = list(report["baselines"]["targets"])
    width = 0.8 / max(len(rec), 1)
    for i, (name, values) in enumerate(rec.items()):
        ax.bar(np.arange(len(horizons)) + i * width, [values[h] for h in horizons], width, label=name)
    ax.axhline(k / E, color="k", ls="--", lw=0.8, label="random (k/E)")
    ax.set(xticks=np.arange(len(horizons)) + width * (len(rec) - 1) / 2, xticklabels=[f"h={h}" for h in horizons],
           ylabel=f"recall@{k}", ylim=(0, 1.02), title="training-free predictors (validation)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(_save(fig, out_dir / "recall.png"))
    return files


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m predictors.locality", description="Routing-locality report of a trace.")
    p.add_argument("trace_dir", type=Path, metavar="TRACE_DIR")
    p.add_argument("--max-tokens", type=int, default=None, help="use the first N tokens of each split")
    p.add_argument("--model", type=Path, default=None, help="model directory for gate-lookahead (default: the manifest's)")
    p.add_argument("--out-dir", type=Path, default=None, help="where to write locality.json and plots "
                                                               "(default: TRACE_DIR/locality)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = locality_report(args.trace_dir, args.max_tokens, args.model, args.out_dir, plots=not args.no_plots)
    except JaxmoeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    print(format_table(report))
    print(f"\nwrote {report['report_file']}" + (f" and {len(report['plots'])} plots" if report.get("plots") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
