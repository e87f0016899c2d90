"""Predictors: output shapes, LLaPor learning (and not learning from shuffled labels), save/restore,
numpy forward vs Flax forward, the train and evaluate CLIs. Runs on synthetic traces whose routing is a
known nonlinear function of the hidden state (so a learner can beat the training-free baselines)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from predictors.base import MAX_HORIZON, FrequencyPredictor, GateLookaheadPredictor, PreviousTokenPredictor
from predictors.trace_format import load_trace, write_manifest, write_shard

D, L, E, K = 32, 4, 16, 2


def synthetic_trace(trace_dir: Path, *, docs=48, doc_len=48, val_docs=12, seed=0, routers=None, norm_scales=None,
                    eps=1e-6, shuffle_labels=False) -> Path:
    """Tokens follow a noisy successor chain; the residual stream mixes in the previous token and is
    updated nonlinearly between MoE layers; each layer routes with its router on the RMS-normed state.
    shuffle_labels: expert ids (and weights) permuted across tokens, so they carry no signal."""
    rng = np.random.default_rng(seed)
    vocab = 48
    emb = rng.normal(size=(vocab, D))
    mix = rng.normal(size=(L, D, D)) / math.sqrt(D)
    routers = rng.normal(size=(L, D, E)) if routers is None else np.asarray(routers, np.float64)
    norm_scales = 1 + 0.1 * rng.normal(size=(L, D)) if norm_scales is None else np.asarray(norm_scales, np.float64)
    successor = rng.integers(vocab, size=vocab)
    cols = {k: [] for k in ("doc_id", "position", "token", "hidden", "router_logits", "expert_ids", "expert_weights")}
    documents = {}
    for doc in range(docs):
        tok, ctx = int(rng.integers(vocab)), np.zeros(D)
        for t in range(doc_len):
            if t > 0:
                tok = int(successor[tok]) if rng.random() < 0.7 else int(rng.integers(vocab))
            h = emb[tok] + 0.5 * ctx
            ctx = h
            hidden, logits = np.zeros((L, D)), np.zeros((L, E))
            for layer in range(L):
                hidden[layer] = h
                normed = h / np.sqrt(np.mean(h * h) + eps) * norm_scales[layer]
                logits[layer] = normed @ routers[layer]
                h = h + 1.5 * np.tanh(h @ mix[layer])
            ids = np.argsort(-logits, -1, kind="stable")[:, :K]
            w = np.take_along_axis(np.exp(logits - logits.max(-1, keepdims=True)), ids, -1)
            for key, value in (("doc_id", doc), ("position", t), ("token", tok), ("hidden", hidden),
                               ("router_logits", logits), ("expert_ids", ids), ("expert_weights", w / w.sum(-1, keepdims=True))):
                cols[key].append(value)
        documents[str(doc)] = {"name": f"doc{doc}", "split": "validation" if doc >= docs - val_docs else "train",
                               "tokens": doc_len}
    arrays = {"doc_id": np.array(cols["doc_id"], np.int32), "position": np.array(cols["position"], np.int32),
              "token": np.array(cols["token"], np.int32), "hidden": np.array(cols["hidden"], np.float16),
              "router_logits": np.array(cols["router_logits"], np.float32),
              "expert_ids": np.array(cols["expert_ids"], np.int16),
              "expert_weights": np.array(cols["expert_weights"], np.float32)}
    if shuffle_labels:
        perm = rng.permutation(len(arrays["doc_id"]))
        arrays["expert_ids"], arrays["expert_weights"] = arrays["expert_ids"][perm], arrays["expert_weights"][perm]
    trace_dir.mkdir(parents=True)
    half = len(arrays["doc_id"]) // 2 // doc_len * doc_len  # two shards, split at a document boundary
    shards = [write_shard(trace_dir, i, {k: v[sl] for k, v in arrays.items()})
              for i, sl in enumerate((slice(0, half), slice(half, None)))]
    write_manifest(trace_dir, {"model": {"name": "synthetic", "hidden_size": D, "num_moe_layers": L, "num_experts": E,
                                         "top_k": K}, "shards": shards, "documents": documents,
                               "num_tokens": len(arrays["doc_id"])})
    return trace_dir


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    root = tmp_path_factory.mktemp("traces")
    return {"real": synthetic_trace(root / "real"), "shuffled": synthetic_trace(root / "shuffled", shuffle_labels=True)}


@pytest.fixture(scope="module")
def trained(traces):
    """LLaPor trained in process on the structured and on the shuffled trace -> {name: (cfg, params, report)}."""
    from predictors.train import train

    kw = dict(steps=1000, width=64, batch_size=128, lr=3e-3, progress=False, log=lambda *a: None)
    return {name: train(traces[name], seed=0, **kw) for name in ("real", "shuffled")}


def _replay_recall(predictor, trace_dir, k=K):
    from predictors.evaluate import replay

    return replay(predictor, load_trace(trace_dir, "validation"), MAX_HORIZON, k)


def test_every_predictor_output_shape(trained):
    from predictors.llapor import LLaPorPredictor

    rng = np.random.default_rng(1)
    predictors = [FrequencyPredictor(L, E), PreviousTokenPredictor(L, E),
                  GateLookaheadPredictor(rng.normal(size=(L, D, E)), np.ones((L, D)), 1e-6),
                  GateLookaheadPredictor(rng.normal(size=(L, D, E)), np.ones((L, D)), 1e-6, rng.normal(size=(L, E))),
                  LLaPorPredictor(*trained["real"][:2])]
    for predictor in predictors:
        predictor.reset()
        for p in range(L):
            predictor.observe(p, np.array([p, p + 1]))
            for horizon in range(1, MAX_HORIZON + 1):
                scores = predictor.predict(p, rng.normal(size=D).astype(np.float32),
                                           rng.normal(size=E).astype(np.float32), horizon)
                assert scores.shape == (horizon, E), predictor.name
                assert np.issubdtype(scores.dtype, np.floating) and np.isfinite(scores).all()


def _frequency(trace_dir):
    """The frequency predictor warmed on the train split: 'chance' given each layer's expert marginals."""
    train = load_trace(trace_dir, "train")
    freq = FrequencyPredictor(L, E)
    for p in range(L):
        freq.counts[p] = np.bincount(train.expert_ids[:, p].reshape(-1).astype(np.int64), minlength=E)
    return freq


def test_llapor_learns_structure_but_not_shuffled_labels(traces, trained):
    from predictors.llapor import LLaPorPredictor

    def recall(predictor, name):
        return {j: v["recall_at_k"] for j, v in _replay_recall(predictor, traces[name]).items()}

    real = recall(LLaPorPredictor(*trained["real"][:2]), "real")
    prev = recall(PreviousTokenPredictor(L, E), "real")
    chance = recall(_frequency(traces["real"]), "real")
    for j in ("1", "2", "3", "4"):
        assert real[j] > chance[j] + 0.25, (j, real, chance)
        assert real[j] > prev[j] + 0.15, (j, real, prev)
    assert real["1"] > 0.65, real
    assert trained["real"][2]["final_val_recall_at_k"]["1"] > 0.65

    # shuffled labels: nothing to learn beyond each layer's marginal expert frequencies
    shuffled = recall(LLaPorPredictor(*trained["shuffled"][:2]), "shuffled")
    chance = recall(_frequency(traces["shuffled"]), "shuffled")
    for j in ("1", "2", "3", "4"):
        assert shuffled[j] < chance[j] + 0.04, (j, shuffled, chance)
        assert trained["shuffled"][2]["final_val_recall_at_k"][j] < chance[j] + 0.04


def test_orbax_round_trip_identical_predictions(tmp_path, traces, trained):
    from predictors.llapor import LLaPorPredictor, save

    cfg, params, _ = trained["real"]
    save(tmp_path / "pred", cfg, params)
    before, after = LLaPorPredictor(cfg, params), LLaPorPredictor.load(tmp_path / "pred")
    assert after.cfg == cfg
    trace = load_trace(traces["real"], "validation")
    for t in range(6):
        for p in range(L):
            for predictor in (before, after):
                predictor.observe(p, trace.expert_ids[t, p].astype(np.int64))
            args = (p, trace.hidden[t, p].astype(np.float32), trace.router_logits[t, p], MAX_HORIZON)
            np.testing.assert_array_equal(before.predict(*args), after.predict(*args))


@pytest.mark.parametrize("variant", ["trained", "lookahead-gelu-depth2"])
def test_numpy_forward_equals_flax_forward(traces, trained, variant):
    from flax import nnx

    from predictors.evaluate import batched_scores
    from predictors.llapor import LLaPor, LLaPorConfig, LLaPorPredictor, load_into, params_of
    from predictors.train import history_khot, target_indices

    if variant == "trained":
        cfg, params, _ = trained["real"]
        model = LLaPor(cfg, nnx.Rngs(3))
        load_into(model, params)
    else:  # random weights: every optional path of the forward (history, lookahead, current, gelu, 2 blocks)
        cfg = LLaPorConfig(D, E, L, K, width=48, depth=2, use_lookahead=True, activation="gelu", use_current=True)
        kernels = np.random.default_rng(4).normal(size=(L, D, E)).astype(np.float32)
        model = LLaPor(cfg, nnx.Rngs(4), kernels)
        params = params_of(model)
        np.testing.assert_array_equal(params["lookahead_kernels"], kernels)
    trace = load_trace(traces["real"], "validation")
    _, hist_tok, tgt_layer = target_indices(trace, cfg.horizon)
    rows = np.repeat(np.arange(40), L)
    pos = np.tile(np.arange(L), 40)
    hidden = trace.hidden[rows, pos].astype(np.float32)
    history = history_khot(trace, hist_tok, tgt_layer, pos, rows)
    flax_out = np.asarray(model(hidden, trace.router_logits[rows, pos], pos, history))
    numpy_pred = LLaPorPredictor(cfg, params)
    np.testing.assert_allclose(numpy_pred.forward_batch(hidden, trace.router_logits[rows, pos], pos, history),
                               flax_out, rtol=1e-4, atol=1e-4)
    # call by call, with the history built by observe() as the runtime does, gives the same scores
    numpy_pred.reset()
    for t in range(40):
        for p in range(L):
            numpy_pred.observe(p, trace.expert_ids[t, p].astype(np.int64))
            got = numpy_pred.predict(p, trace.hidden[t, p].astype(np.float32), trace.router_logits[t, p], MAX_HORIZON)
            np.testing.assert_allclose(got, flax_out[t * L + p], rtol=1e-4, atol=1e-4)
            short = numpy_pred.predict(p, trace.hidden[t, p].astype(np.float32), trace.router_logits[t, p], 2)
            np.testing.assert_allclose(short, got[:2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batched_scores(numpy_pred, trace, rows, pos, hist_tok, tgt_layer, MAX_HORIZON),
                               flax_out, rtol=1e-4, atol=1e-4)


def _tiny_model(model_dir: Path):
    """A random 4-layer, 16-expert MoE model saved in the converted layout -> its (routers, norm scales)."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from flax import nnx

    from jaxmoe.checkpoint import WEIGHTS_DIR, pieces_of_layer, save_piece
    from jaxmoe.config import ModelConfig, save_config
    from jaxmoe.model import MoEModel

    cfg = ModelConfig(family="mixtral", vocab_size=48, hidden_size=D, num_layers=L, num_heads=2, num_kv_heads=2,
                      head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=128,
                      moe_layers=(True,) * L, num_experts=E, num_experts_per_tok=K, moe_intermediate_size=16,
                      dtype="float32")
    pure = nnx.to_pure_dict(nnx.state(MoEModel(cfg, nnx.Rngs(0), dtype=jnp.float32)))
    model_dir.mkdir(parents=True)
    with ocp.StandardCheckpointer() as checkpointer:
        save_piece(checkpointer, model_dir / WEIGHTS_DIR, "globals", {k: v for k, v in pure.items() if k != "layers"})
        for i, tree in pure["layers"].items():
            for name, piece in pieces_of_layer(i, tree).items():
                save_piece(checkpointer, model_dir / WEIGHTS_DIR, name, piece)
        checkpointer.wait_until_finished()
    save_config(cfg, model_dir)
    layers = [pure["layers"][i] for i in range(L)]
    return (np.stack([np.asarray(t["moe"]["router"]) for t in layers]),
            np.stack([np.asarray(t["post_attn_norm"]["scale"]) for t in layers]))


def test_train_and_evaluate_clis(tmp_path, capsys):
    from predictors import evaluate, train

    routers, scales = _tiny_model(tmp_path / "model")
    trace_dir = synthetic_trace(tmp_path / "trace", docs=10, doc_len=24, val_docs=3, routers=routers,
                                norm_scales=scales)
    pred = tmp_path / "pred"
    assert train.main(["--traces", str(trace_dir), "--out", str(pred), "--steps", "40", "--width", "32",
                       "--model", str(tmp_path / "model")]) == 0
    report = json.loads((pred / "train_report.json").read_text())
    assert report["config"]["use_lookahead"]  # the model's routers, folded with their norm scales, ride along
    saved = json.loads((pred / "llapor.json").read_text())
    assert saved["config"] == report["config"] and saved["trained_on"]["name"] == "synthetic"
    assert [c["step"] for c in report["curve"]] == [4 * i for i in range(1, 11)]
    assert set(report["final_val_recall_at_k"]) == {"1", "2", "3", "4"}

    out = tmp_path / "eval" / "predictors.json"
    capsys.readouterr()
    assert evaluate.main(["--model", str(tmp_path / "model"), "--traces", str(trace_dir), "--predictor", str(pred),
                          "--output-json", str(out)]) == 0
    table = capsys.readouterr().out
    got = json.loads(out.read_text())
    names = ("frequency", "previous-token", "gate-lookahead", "llapor")
    assert set(got) == {*names, "cost_us"}
    for name in names:
        assert name in table
        assert set(got[name]) == {"1", "2", "3", "4"}
        for metrics in got[name].values():
            assert set(metrics) == {"recall_at_k", "recall_at_2k", "precision_at_k"}
            assert 0 <= metrics["recall_at_k"] <= metrics["recall_at_2k"] <= 1
        assert got["cost_us"][name]["predict"] > 0
    # the routing is the model's own router at horizon 0, so looking ahead with it beats chance
    assert got["gate-lookahead"]["1"]["recall_at_k"] > K / E + 0.2
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # batched replay of the stateless predictors equals the runtime's call-by-call replay
    exact, _ = evaluate.evaluate(tmp_path / "model", trace_dir, pred, batched=False, log=lambda m: None)
    for name in names:
        for j in got[name]:
            for m, v in got[name][j].items():
                assert exact[name][j][m] == pytest.approx(v, abs=1e-6), (name, j, m)


def test_clis_refuse_bad_input(tmp_path, capsys, traces):
    from predictors import evaluate, train

    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep").write_text("x")
    assert train.main(["--traces", str(traces["real"]), "--out", str(out), "--steps", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--force" in err[0]
    assert [p.name for p in out.iterdir()] == ["keep"]
    assert train.main(["--traces", str(tmp_path / "nowhere"), "--out", str(tmp_path / "new"), "--steps", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new*"))
    assert train.main(["--traces", str(traces["real"]), "--out", str(tmp_path / "new"), "--steps", "5",
                       "--model", str(tmp_path / "nomodel")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --model") and not (tmp_path / "new").exists()
    with pytest.raises(SystemExit) as e:
        train.main(["--traces", str(traces["real"]), "--out", str(out), "--horizon", "x"])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: argument --horizon")
    assert evaluate.main(["--model", str(tmp_path / "nomodel"), "--traces", str(traces["real"]),
                          "--output-json", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
