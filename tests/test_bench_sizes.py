"""bench.sizes: real-size shapes, synthetic engines, routing replay, the Belady bound, and a CPU smoke run."""

import json

import numpy as np
import pytest

from bench.shapes import SHAPE_NAMES, describe, model_config
from bench.__main__ import main as bench_main
from bench.sizes import min_transfers
from bench.synthetic import (
    NOTICE, Replay, ReplayLookahead, RoutingSource, map_routing, routing_tables, save_routing, synthetic_routing,
)

# total parameters of the public releases (bfloat16 shapes; the Hub model cards: 46.7B, 30.5B, 15.7B, 6.9B, 106B
# without GLM's multi-token-prediction layer, 21B and 117B for gpt-oss, 230B for MiniMax-M2 without its MTP modules)
PUBLIC_PARAMS = {"mixtral-8x7b": 46_702_792_704, "qwen3-30b-a3b": 30_532_122_624,
                 "deepseek-v2-lite": 15_706_484_224, "olmoe-1b-7b": 6_919_161_856, "glm-4.5-air": 106_852_251_264,
                 "gpt-oss-20b": 20_914_757_184, "gpt-oss-120b": 116_829_156_672, "minimax-m2": 228_689_764_864,
                 # Qwen3-Next-80B-A3B without its multi-token-prediction module, counted by hand from config.json:
                 # embeddings 2 * 151936 * 2048, 48 MoE blocks of 1,614,809,088 (512 experts, router, gated shared
                 # expert), 12 gated attention blocks of 27,263,488, 36 Gated DeltaNet blocks of 33,718,464, norms
                 "qwen3-next-80b-a3b": 79_674_391_296,
                 # Qwen3.5-35B-A3B's language model (no vision tower, no multi-token prediction), by hand: embeddings
                 # 2 * 248320 * 2048, 40 MoE blocks of 808,978,432 (256 experts, router, gated shared expert),
                 # 10 gated attention blocks of 27,263,488, 30 Gated DeltaNet blocks of 33,718,464, norms
                 "qwen3.5-35b-a3b": 34_660_610_688}
EXPERTS = {"mixtral-8x7b": (8, 2, 32), "qwen3-30b-a3b": (128, 8, 48), "deepseek-v2-lite": (64, 6, 26),
           "olmoe-1b-7b": (64, 8, 16), "glm-4.5-air": (128, 8, 45), "gpt-oss-20b": (32, 4, 24),
           "gpt-oss-120b": (128, 4, 36), "minimax-m2": (256, 8, 62),
           "qwen3-next-80b-a3b": (512, 10, 48), "qwen3.5-35b-a3b": (256, 8, 40)}  # experts per layer, top-k, MoE layers


def random_source(tokens=400, layers=8, experts=32, k=4, seed=0) -> RoutingSource:
    rng = np.random.default_rng(seed)
    ids = np.stack([np.stack([rng.choice(experts, k, replace=False) for _ in range(layers)]) for _ in range(tokens)])
    doc = np.repeat(np.arange(tokens // 100), 100).astype(np.int32)
    return RoutingSource(ids.astype(np.int32), doc, experts, "random test routing")


@pytest.mark.parametrize("name", SHAPE_NAMES)
def test_shapes_are_the_public_releases(name):
    cfg = model_config(name)
    info = describe(cfg)
    assert info["total_params"] == PUBLIC_PARAMS[name]
    assert (cfg.num_experts, cfg.num_experts_per_tok, len(cfg.moe_layer_ids)) == EXPERTS[name]
    small = model_config(name, num_layers=2, scale=0.02)
    assert (small.num_experts, small.num_experts_per_tok, small.num_layers) == (cfg.num_experts, cfg.num_experts_per_tok, 2)
    assert small.hidden_size < cfg.hidden_size


@pytest.mark.parametrize("name", SHAPE_NAMES)
def test_replay_mapping_gives_k_distinct_target_experts(name):
    cfg = model_config(name)
    e_t, k_t, l_t = EXPERTS[name]
    src = random_source()
    mapped = map_routing(src.expert_ids[:120], src.num_experts, e_t, k_t, l_t)
    assert mapped.shape == (120, l_t, k_t)
    assert mapped.min() >= 0 and mapped.max() < e_t
    distinct = np.array([[len(set(row.tolist())) for row in token] for token in mapped])
    assert (distinct == k_t).all()
    # enough picks to reach every expert: 400 tokens at top-4 of 128, 4x as many for 512 experts (Qwen3-Next)
    wide = src if e_t <= 128 else random_source(tokens=400 * e_t // 128)
    reach = map_routing(wide.expert_ids, wide.num_experts, e_t, k_t, l_t)
    assert len(np.unique(reach[:, 0])) == e_t  # every target expert reachable
    # identical source tokens map identically (reuse is preserved)
    again = map_routing(src.expert_ids[:1].repeat(2, 0), src.num_experts, e_t, k_t, l_t)
    assert (again[0] == again[1]).all()
    tables, info = routing_tables(src, cfg, 2, 50)
    assert [t.shape for t in tables] == [(50, l_t, k_t)] * 2 and info["stats"]["distinct_experts_per_token_min"] == k_t
    synth = synthetic_routing(30, 3, e_t, k_t, seed=1)
    assert all(len(set(r.tolist())) == k_t for r in synth.reshape(-1, k_t)) and synth.max() < e_t


def test_min_transfers_is_beladys_choice_and_beats_lru():
    from scheduler.eviction import LRU, Belady

    rng = np.random.default_rng(3)
    for trial in range(20):
        steps = [{(int(layer), int(e)) for e in rng.choice(12, 3, replace=False)}
                 for _ in range(40) for layer in range(2)]
        slots = int(rng.integers(3, 15))
        ours = min_transfers(steps, slots)
        assert ours == min_transfers(steps, slots, Belady(steps))
        assert sum(ours) <= sum(min_transfers(steps, slots, LRU()))
    assert sum(min_transfers(steps, 24)) == 0  # everything fits: the warm start is free


def test_replay_lookahead_matches_recall():
    cfg = model_config("olmoe-1b-7b", num_layers=4)
    tables, _ = routing_tables(random_source(), cfg, 1, 80)
    replay = Replay(tables, cfg.moe_layer_ids)
    pred = ReplayLookahead(replay, cfg.num_experts, recall=(0.7, 0.5, 0.3, 0.2))
    ranked, k = pred.ranked(0), cfg.num_experts_per_tok
    for j, want in ((1, 0.7), (2, 0.5)):
        got = np.mean([len(set(tables[0][t + (p + j) // 4, (p + j) % 4].tolist()) & set(ranked[t, p, j - 1, :k].tolist())) / k
                       for t in range(70) for p in range(4)])
        assert abs(got - want) < 0.06
    replay.last_position = 5
    scores = pred.predict(1, None, None, 2)
    assert scores.shape == (2, cfg.num_experts) and (np.sort(scores, 1)[:, -1] > 0).all()


def test_bench_entry_point_rejects_unknown_subcommand(capsys):
    assert bench_main(["sizez"]) == 2
    assert "unknown subcommand 'sizez'" in capsys.readouterr().err


def test_cpu_smoke_run_writes_json_and_markdown(tmp_path):
    routing = save_routing(random_source(tokens=300), tmp_path / "routing.npz")
    out = tmp_path / "out"
    argv = ["--shape", "olmoe-1b-7b", "--layers", "2", "--scale", "0.02", "--policies", "on-demand,prefetch",
            "--cache", "0.125", "--tokens", "5", "--prompt-tokens", "10", "--repeats", "1", "--bandwidth-repeats", "3",
            "--trace", str(routing), "--peer", "none", "--out", str(out)]
    assert bench_main(["sizes", *argv]) == 0  # through the one entry point, `python -m bench sizes`
    report = json.loads((out / "sizes-olmoe-1b-7b.json").read_text())
    md = (out / "sizes-olmoe-1b-7b.md").read_text()
    assert report["notice"] == NOTICE and "SYNTHETIC WEIGHTS" in NOTICE and "SYNTHETIC WEIGHTS" in md
    assert report["model"]["experts_per_layer"] == 64 and report["reduced"] == {"layers": 2, "scale": 0.02}
    assert report["routing"]["source"].startswith("compact copy of random test routing")
    assert report["routing"]["stats"]["distinct_experts_per_token_min"] == 8
    bw = report["bandwidth"]
    assert bw["pinned_host_gbps"] > 0 and bw["pageable_gbps"] > 0 and bw["pinned_host_burst_gbps"] > 0
    assert report["compute"]["hit_rate"] == 1.0 and report["compute"]["s_per_token"] > 0
    bound = report["bounds"]["0.125"]
    for key in ("belady_min_h2d_gb_per_token", "bound_tokens_per_s", "per_token_bound_tokens_per_s", "compute_s_per_token"):
        assert bound[key] >= 0
    assert bound["per_token_bound_tokens_per_s"] <= bound["bound_tokens_per_s"] * (1 + 1e-9)
    assert [r["policy"] for r in report["runs"]] == ["on-demand", "prefetch"]
    for r in report["runs"]:
        assert r["cache_slots"] == 16 and 0 < r["fraction_of_bound"] and r["decode_tokens_per_s"] > 0
        assert 0 <= r["hit_rate"] <= 1 and r["peak_device_bytes"] > 0
    # on-demand moves at least what Belady must
    on_demand = report["runs"][0]
    assert on_demand["h2d_gb_per_token"] >= bound["belady_min_h2d_gb_per_token"] - 1e-12
    assert report["runs"][1]["predictor"] == "replay-lookahead"
    assert report["resident"]["decode_tokens_per_s"] > 0
    assert report["peer"] == {"skipped": "skipped: --peer none"}
    assert report["software"]["jax"] and report["device"]["platform"] == "cpu"
    for png in report.get("plots", []):
        assert (out / png).stat().st_size > 0


def test_int8_run_moves_int8_experts_and_sits_beside_the_unquantized_one(tmp_path):
    routing = save_routing(random_source(tokens=300), tmp_path / "routing.npz")
    out = tmp_path / "out"
    argv = ["--shape", "olmoe-1b-7b", "--layers", "2", "--scale", "0.02", "--policies", "on-demand", "--cache", "0.125",
            "--tokens", "4", "--prompt-tokens", "10", "--repeats", "1", "--bandwidth-repeats", "2", "--trace", str(routing),
            "--peer", "none", "--skip-resident", "--out", str(out), "--quantize-experts", "int8"]
    assert bench_main(["sizes", *argv]) == 0
    assert not (out / "sizes-olmoe-1b-7b.json").exists()
    report = json.loads((out / "sizes-olmoe-1b-7b-int8.json").read_text())
    d, f = report["hf_config"]["hidden_size"], report["hf_config"]["intermediate_size"]
    assert report["moved_expert_bytes"] == 3 * d * f + 4 * (2 * f + d) < report["model"]["expert_bytes"]
    assert report["bandwidth"]["expert_bytes"] == report["moved_expert_bytes"]
    (run,) = report["runs"]
    assert run["h2d_gb_per_token"] > 0 and run["policy"] == "on-demand"
    assert "**Experts int8**" in (out / "sizes-olmoe-1b-7b-int8.md").read_text()
