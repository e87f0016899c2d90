"""bench.replay: the virtual-time cache follows the runtime's rules, so its stalls can be worked out by hand."""

import json

import numpy as np
import pytest

from bench.__main__ import main as bench_main
from bench.replay import Recording, replay


def cyclic_recording(tokens: int, scores: str | None = None) -> Recording:
    """Two MoE layers (model layers 0 and 1), 4 experts, top-1: layer 0 always routes to expert 0 and
    layer 1 to expert 1; one prefill layer pair first. scores: None, "right" (the predictor names the
    next layer's expert) or "wrong" (it names another one)."""
    rec = Recording(layer_of_pos=(0, 1), num_layers=2, num_experts=4, top_k=1)
    rec.observe(0, False, [[0]], None)
    rec.observe(1, False, [[1]], None)
    for _ in range(tokens):
        for pos in (0, 1):
            s = None
            if scores is not None:
                s = np.zeros((4, 4), np.float32)
                nxt = 1 - pos
                s[:, nxt if scores == "right" else (nxt + 2) % 4] = 1.0
            rec.observe(pos, True, [[pos]], s)
    return rec


def test_on_demand_stalls_one_transfer_per_miss():
    # 1 slot: the two layers evict each other, every decode layer misses and waits one full transfer
    r = replay([cyclic_recording(5)], "on-demand", 1, compute_s=1.0, transfer_s=1.0)
    assert r["hit_rate"] == 0.0
    assert r["stall_per_token_layers"] == pytest.approx(2.0)
    assert r["speed_vs_stall_free"] == pytest.approx(0.5)
    # 2 slots: both experts stay after prefill, no stall at all
    r = replay([cyclic_recording(5)], "on-demand", 2, compute_s=1.0, transfer_s=1.0)
    assert (r["hit_rate"], r["stall_per_token_layers"]) == (1.0, 0.0)


def test_right_predictions_hide_transfers_and_wrong_ones_cost_link_time():
    # random routing over 4 experts at 2 layers, 2 slots: the running layer's expert is pinned, the other
    # slot can take the next layer's expert while this one computes (T_x = T_c / 2)
    rec = Recording(layer_of_pos=(0, 1), num_layers=2, num_experts=4, top_k=1)
    rng = np.random.default_rng(0)
    experts = rng.integers(0, 4, size=(40, 2))
    for t, (a, b) in enumerate(experts):
        for pos, e in ((0, a), (1, b)):
            nxt_e = b if pos == 0 else experts[min(t + 1, 39), 0]
            right = np.zeros((4, 4), np.float32)
            right[0, nxt_e] = 1.0
            rec.observe(pos, True, [[e]], right)
    wrong = Recording(**{k: getattr(rec, k) for k in ("layer_of_pos", "num_layers", "num_experts", "top_k")})
    for pos, d, ids, s in zip(rec.positions, rec.decoding, rec.ids, rec.scores):
        w = np.zeros_like(s)
        w[0, (int(np.argmax(s[0])) + 1) % 4] = 1.0
        wrong.observe(pos, d, ids, w)
    on_demand = replay([rec], "on-demand", 2, 1.0, 0.5)
    good = replay([rec], "presched", 2, 1.0, 0.5)
    bad = replay([wrong], "presched", 2, 1.0, 0.5)
    oracle = replay([rec], "oracle", 2, 1.0, 0.5)
    assert oracle["speed_vs_stall_free"] == pytest.approx(1.0, abs=0.02)  # T_x < T_c: everything hidden
    assert good["speed_vs_stall_free"] > on_demand["speed_vs_stall_free"] + 0.1
    assert good["prefetch_precision"] > 0.8
    # the calibration learns that wrong guesses are wrong and stops fetching them: no better than on-demand
    assert bad["speed_vs_stall_free"] <= on_demand["speed_vs_stall_free"] + 1e-9
    assert bad["hit_rate"] <= on_demand["hit_rate"] + 1e-9


def test_replay_cli_writes_report(tmp_path, capsys):
    argv = ["--prompts", "1", "--max-new-tokens", "4", "--cache", "0.25", "--policies", "on-demand,presched,oracle",
            "--out", str(tmp_path)]
    assert bench_main(["replay", *argv]) == 0
    report = json.loads((tmp_path / "replay.json").read_text())
    runs = {r["policy"]: r for r in report["runs"]}
    assert set(runs) == {"on-demand", "presched", "oracle"}
    for r in runs.values():
        assert 0 < r["speed_vs_stall_free"] <= 1.0 and 0 <= r["hit_rate"] <= 1.0
    assert runs["oracle"]["vs_oracle"] == 1.0
    assert "| 25% (64) | presched |" in (tmp_path / "replay.md").read_text()
    # POLICY@PREDICTOR entries belong to bench policies: refused here with one line, before any recording
    assert bench_main(["replay", "--policies", "prefetch@frequency", "--out", str(tmp_path / "refused")]) == 2
    assert not (tmp_path / "refused").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --policies prefetch@frequency:") and "Traceback" not in "".join(err)
