"""Routing traces (predictors.trace) and the locality report (predictors.locality)."""

import json

import numpy as np
import pytest

from jaxmoe.errors import JaxmoeError
from predictors.locality import locality_report, main as locality_main
from predictors.trace import assign_splits, main as trace_main, stdlib_files, trace_documents
from predictors.trace_format import load_trace, read_manifest, write_manifest, write_shard

DOC_LENGTHS = (45, 20, 70)  # shorter than, equal to and past the 32-token prefill


@pytest.fixture(scope="module")
def tiny(converted_model):
    return converted_model("qwen3_moe")[1]


@pytest.fixture(scope="module")
def docs():
    rng = np.random.default_rng(0)
    return [(f"doc{i}.txt", rng.integers(3, 96, size=n).tolist()) for i, n in enumerate(DOC_LENGTHS)]


@pytest.fixture(scope="module")
def traced(tiny, docs, tmp_path_factory):
    out = tmp_path_factory.mktemp("trace") / "t"
    manifest = trace_documents(tiny, docs, out, max_tokens_per_doc=64, validation_fraction=0.3, seed=1,
                               shard_tokens=50, progress=False)
    return out, manifest


def test_manifest_and_shapes(tiny, docs, traced):
    from jaxmoe.config import load_config

    out, manifest = traced
    cfg = load_config(tiny)
    assert read_manifest(out) == manifest
    model = manifest["model"]
    assert model["family"] == "qwen3_moe" and model["num_layers"] == cfg.num_layers
    assert model["moe_layer_ids"] == list(cfg.moe_layer_ids) and model["num_experts"] == cfg.num_experts
    assert model["top_k"] == cfg.num_experts_per_tok and model["hidden_size"] == cfg.hidden_size
    assert len(model["config_sha256"]) == 64
    lengths = [min(n, 64) for n in DOC_LENGTHS]
    assert manifest["num_tokens"] == sum(lengths) and len(manifest["shards"]) >= 2
    assert [manifest["documents"][str(i)]["tokens"] for i in range(3)] == lengths
    assert not list(out.parent.glob(".t.tmp-*"))
    trace = load_trace(out)
    n, L, E, k, d = sum(lengths), len(cfg.moe_layer_ids), cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size
    assert trace.hidden.shape == (n, L, d) and trace.hidden.dtype == np.float16
    assert trace.router_logits.shape == (n, L, E) and trace.router_logits.dtype == np.float32
    assert trace.expert_ids.shape == (n, L, k) and trace.expert_ids.dtype == np.int16
    assert trace.expert_weights.shape == (n, L, k) and trace.expert_weights.dtype == np.float32
    for i, (_, ids) in enumerate(docs):
        rows = trace.doc_id == i
        assert trace.position[rows].tolist() == list(range(lengths[i]))
        assert trace.token[rows].tolist() == ids[:64]


def test_decode_path_matches_full_forward(tiny, docs, traced):
    """Prefill + cached single-token decode routes exactly like one uncached forward over the document."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxmoe.checkpoint import load_resident

    cfg, graphdef, state = load_resident(tiny)

    @jax.jit
    def forward(state, tokens):  # right padding cannot change earlier (causal) positions: one compilation
        model = nnx.merge(graphdef, state)
        positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
        _, _, routing = model(tokens, positions, model.init_cache(1, tokens.shape[1]))
        return [{k: routing[l][k] for k in ("expert_ids", "router_logits", "hidden")} for l in cfg.moe_layer_ids]

    trace = load_trace(traced[0])
    for i, (_, ids) in enumerate(docs):
        ids = ids[:64]
        n = len(ids)
        tokens = np.zeros((1, 64), np.int32)
        tokens[0, :n] = ids
        routing = jax.device_get(forward(state, jnp.asarray(tokens)))
        full = {k: np.stack([r[k][:n] for r in routing], 1) for k in routing[0]}
        rows = trace.doc_id == i
        np.testing.assert_array_equal(trace.expert_ids[rows], full["expert_ids"])
        np.testing.assert_allclose(trace.router_logits[rows], full["router_logits"], atol=1e-3)
        np.testing.assert_allclose(trace.hidden[rows].astype(np.float32), full["hidden"], atol=2e-2, rtol=2e-3)


def test_splits(traced, docs):
    out, manifest = traced
    splits = {info["name"]: info["split"] for info in manifest["documents"].values()}
    assert set(splits) == {name for name, _ in docs}
    assert set(splits.values()) == {"train", "validation"}
    assert splits == assign_splits([name for name, _ in docs], 1, 0.3)  # deterministic
    train, val = load_trace(out, "train"), load_trace(out, "validation")
    assert train.num_tokens + val.num_tokens == manifest["num_tokens"]
    assert not set(train.doc_id.tolist()) & set(val.doc_id.tolist())
    for part, split in ((train, "train"), (val, "validation")):
        assert {manifest["documents"][str(d)]["split"] for d in part.doc_id.tolist()} == {split}


def test_refuses_existing_output(tiny, docs, traced, tmp_path):
    out, _ = traced
    with pytest.raises(JaxmoeError, match="--force"):
        trace_documents(tiny, docs, out, progress=False)
    target = tmp_path / "again"
    target.mkdir()
    (target / "stale.txt").write_text("x")
    trace_documents(tiny, docs[1:2], target, force=True, progress=False)
    assert not (target / "stale.txt").exists() and read_manifest(target)["num_tokens"] == DOC_LENGTHS[1]


def test_cli_errors(tiny, tmp_path, traced, capsys):
    text = tmp_path / "a.txt"
    text.write_text("def f():\n    return 1\n")
    assert trace_main(["--model", str(tiny), "--texts", str(text), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "tokenizer" in err[0]
    assert trace_main(["--model", str(tiny), "--texts", str(text), "--out", str(traced[0])]) == 2
    assert capsys.readouterr().err.startswith("error:")


def test_stdlib_selection():
    a, b = stdlib_files(3, seed=0), stdlib_files(3, seed=0)
    assert a == b and len(a) == 3 and all(name.startswith("stdlib/") and name.endswith(".py") for name, _ in a)
    assert [n for n, _ in stdlib_files(3, seed=1)] != [n for n, _ in a]


def test_locality_on_real_trace(traced, tmp_path, capsys):
    out, manifest = traced
    assert locality_main([str(out)]) == 0
    table = capsys.readouterr().out
    assert "previous-token" in table and "gate-lookahead" in table and "reuse@1" in table
    saved = json.loads((out / "locality" / "locality.json").read_text())
    report = saved
    for key in ("load", "reuse", "coactivation", "baselines", "tokens", "top_k", "moe_layer_ids"):
        assert key in saved
    assert saved["tokens"]["train"] + saved["tokens"]["validation"] == manifest["num_tokens"]
    assert {p.rsplit("/", 1)[-1] for p in report["plots"]} == {"load.png", "reuse.png", "coactivation.png", "recall.png"}
    assert all((out / "locality" / name).is_file() for name in ("load.png", "recall.png"))
    L = len(manifest["model"]["moe_layer_ids"])
    assert len(saved["load"]) == L and len(saved["reuse"]["per_layer"]) == L
    for st in saved["load"]:
        assert abs(sum(st["share"]) - 1) < 1e-4 and st["max_over_mean"] >= 1 >= st["min_over_mean"]
        assert 0 <= st["normalized_entropy"] <= 1 + 1e-9
    recall = saved["baselines"]["recall_at_k"]
    assert set(recall) == {"previous-token", "frequency", "gate-lookahead"}
    for name, by_h in recall.items():
        assert set(by_h) == {"1", "2", "3"} and all(0 <= r <= 1 for r in by_h.values())
    assert all(0 <= r <= 1 for r in saved["reuse"]["per_layer"])
    assert all(0 <= q["recall_at_k"] <= 1 for q in saved["coactivation"]["pairs"])
    assert locality_main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error:")


# -- the metrics on hand-made traces ------------------------------------------------------------------------
def synthetic_trace(path, expert_ids: np.ndarray, doc_lengths, E: int, d: int = 4):
    """expert_ids int[N, L, k] of documents laid out back to back; even docs train, odd validation."""
    n, L, k = expert_ids.shape
    doc_id = np.concatenate([np.full(m, i, np.int32) for i, m in enumerate(doc_lengths)])
    position = np.concatenate([np.arange(m, dtype=np.int32) for m in doc_lengths])
    rng = np.random.default_rng(0)
    arrays = {"doc_id": doc_id, "position": position, "token": np.zeros(n, np.int32),
              "hidden": rng.normal(size=(n, L, d)).astype(np.float16),
              "router_logits": rng.normal(size=(n, L, E)).astype(np.float32),
              "expert_ids": expert_ids.astype(np.int16), "expert_weights": np.full((n, L, k), 1 / k, np.float32)}
    path.mkdir()
    shard = write_shard(path, 0, arrays)
    documents = {str(i): {"name": f"d{i}", "split": "train" if i % 2 == 0 else "validation", "tokens": m}
                 for i, m in enumerate(doc_lengths)}
    write_manifest(path, {"model": {"name": "synthetic", "top_k": k, "num_experts": E, "hidden_size": d,
                                    "moe_layer_ids": list(range(L))},
                          "shards": [shard], "documents": documents, "num_tokens": n})
    return path


def direct_reuse(expert_ids, doc_lengths, val_docs):
    """Mean over validation tokens with a predecessor and all layers of |ids[t] ∩ ids[t-1]| / k."""
    values, start = [], 0
    for i, m in enumerate(doc_lengths):
        if i in val_docs:
            for t in range(start + 1, start + m):
                for layer in range(expert_ids.shape[1]):
                    both = set(expert_ids[t, layer].tolist()) & set(expert_ids[t - 1, layer].tolist())
                    values.append(len(both) / expert_ids.shape[2])
        start += m
    return float(np.mean(values))


@pytest.mark.parametrize("kind", ["repeat", "disjoint", "random"])
def test_previous_token_recall_matches_direct(kind, tmp_path):
    L, E, k, lengths = 3, 8, 2, (12, 9, 7, 11)
    n = sum(lengths)
    rng = np.random.default_rng(3)
    if kind == "repeat":  # every token repeats the routing of its predecessor
        ids = np.broadcast_to(np.array([[1, 5], [0, 2], [7, 3]]), (n, L, k)).copy()
    elif kind == "disjoint":  # consecutive tokens never share an expert
        ids = np.stack([np.where(np.arange(n)[:, None] % 2 == 0, [[0, 1]], [[4, 5]])] * L, 1) + np.arange(L)[None, :, None] % 2
    else:
        ids = np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(L)]) for _ in range(n)])
    trace_dir = synthetic_trace(tmp_path / kind, ids, lengths, E)
    report = locality_report(trace_dir, plots=False)
    recall = report["baselines"]["recall_at_k"]["previous-token"]
    expected = {"repeat": 1.0, "disjoint": 0.0}.get(kind, direct_reuse(ids, lengths, {1, 3}))
    for h in ("1", "2", "3"):  # horizons <= L: the target's predecessor at the target layer is always known
        assert recall[h] == pytest.approx(expected, abs=1e-9)
    assert "gate-lookahead" not in report["baselines"]["recall_at_k"] and report["notes"]
    # every validation token with a predecessor is a target at each (layer, horizon)
    assert report["baselines"]["targets"] == {h: (9 - 1 + 11 - 1) * L for h in ("1", "2", "3")}
    reuse = report["reuse"]["mean"]
    assert reuse == pytest.approx({"repeat": 1.0, "disjoint": 0.0}.get(kind, direct_reuse(ids, lengths, {0, 1, 2, 3})))
    if kind == "repeat":  # layer p's choice fully determines p+1's: co-activation recall 1
        assert report["coactivation"]["mean_recall_at_k"] == 1.0
