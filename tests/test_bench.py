"""The benchmark harness end to end on a tiny model under the link emulator (no timing assertions)."""

import json

from bench.policies import main


def test_policy_benchmark_smoke(converted_model, tmp_path, capsys):
    _, model_dir = converted_model("mixtral")
    rc = main(["--model", str(model_dir), "--cache", "0.5", "--policies", "on-demand,presched,prefetch@previous-token,oracle",
               "--repeats", "1", "--prompts", "1", "--max-new-tokens", "20", "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "policies.json").read_text())
    assert [r["policy"] for r in report["runs"]] == ["on-demand", "presched", "prefetch", "oracle"]
    assert [r["predictor"] for r in report["runs"]] == [None, "gate-lookahead", "previous-token", None]
    assert report["emulated_link"] and "auto" in report["emulated_link"]
    for r in report["runs"]:
        assert r["decode_tokens_per_s"] > 0 and 0 <= r["hit_rate"] <= 1 and r["cache_slots"] == 9
        assert r["vs_oracle"] is not None
        assert r["measured_compile_s"] == 0  # the warm-up compiled every program the measured passes ran
    table = (tmp_path / "policies.md").read_text()
    assert "EMULATED LINK" in table and "| presched |" in table and "| prefetch@previous-token |" in table
    assert "EMULATED LINK" in capsys.readouterr().out
    assert main(["--model", str(model_dir), "--policies", "on-demand@frequency", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--policies on-demand@frequency" in err[0] and "take a predictor" in err[0]


def test_policy_benchmark_speculation_modes_side_by_side(converted_model, tmp_path, capsys):
    _, model_dir = converted_model("mixtral")
    rc = main(["--model", str(model_dir), "--cache", "1.0", "--policies", "on-demand", "--speculate", "off,on",
               "--repeats", "1", "--prompts", "1", "--max-new-tokens", "8", "--link", "none", "--out", str(tmp_path)])
    assert rc == 0
    runs = json.loads((tmp_path / "policies.json").read_text())["runs"]
    assert [(r["policy"], r["speculate"]) for r in runs] == [("on-demand", "off"), ("on-demand", "on")]
    assert [r["whole_token_fraction"] for r in runs] == [0.0, 1.0]
    assert runs[1]["whole_token_redone_fraction"] == 0.0  # every expert cached by the warm-up
    assert [r["vs_on_demand"] for r in runs] == [1.0, 1.0]  # each against its own mode's on-demand
    table = (tmp_path / "policies.md").read_text()
    assert "| on-demand (speculate off) |" in table and "| 1.00 (0.00) |" in table
    assert main(["--model", str(model_dir), "--speculate", "sometimes", "--out", str(tmp_path)]) == 2
    assert "--speculate 'sometimes'" in capsys.readouterr().err


def test_policy_benchmark_quantized_experts_side_by_side(converted_model, tmp_path, capsys):
    _, model_dir = converted_model("mixtral")
    rc = main(["--model", str(model_dir), "--cache", "0.5", "--policies", "on-demand", "--quantize-experts", "none,int8",
               "--repeats", "1", "--prompts", "1", "--max-new-tokens", "8", "--out", str(tmp_path)])
    assert rc == 0
    runs = json.loads((tmp_path / "policies.json").read_text())["runs"]
    assert [r["quantize_experts"] for r in runs] == [None, "int8"]
    native, int8 = runs
    assert int8["expert_bytes"] < native["expert_bytes"] / 2 and int8["cache_slots"] == native["cache_slots"]
    assert int8["h2d_gb_per_token"] < native["h2d_gb_per_token"]  # same routing, smaller copies
    assert [r["vs_on_demand"] for r in runs] == [1.0, 1.0]  # each against its own quantization's on-demand
    table = (tmp_path / "policies.md").read_text()
    assert "| on-demand, unquantized experts |" in table and "| on-demand, int8 experts |" in table
    assert main(["--model", str(model_dir), "--quantize-experts", "int2", "--out", str(tmp_path)]) == 2
    assert "--quantize-experts 'int2'" in capsys.readouterr().err


def test_predictor_cost_smoke(converted_model, tmp_path):
    from bench.__main__ import main as bench_main

    _, model_dir = converted_model("mixtral")
    rc = bench_main(["predictor-cost", "--model", str(model_dir), "--predictors", "gate-lookahead", "--calls", "3",
                     "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "predictor_cost.json").read_text())
    assert [(r["predictor"], r["horizon"]) for r in report["rows"]] == [("gate-lookahead", 1), ("gate-lookahead", 4)]
    for r in report["rows"]:
        assert r["host_predict_us"] > 0 and r["moe_front_us"] > 0 and r["fused_extra_us"] >= 0
    assert report["resident_decode_step_us"] > 0
    assert "gate-lookahead" in (tmp_path / "predictor_cost.md").read_text()
    assert bench_main(["predictor-cost", "--model", str(model_dir), "--calls", "0", "--out", str(tmp_path)]) == 2


def test_host_overhead_smoke(tmp_path):
    from bench.__main__ import main as bench_main

    rc = bench_main(["host-overhead", "--shape", "olmoe-1b-7b", "--layers", "2", "--tokens", "3", "--prompts", "1",
                     "--repeats", "1", "--policies", "on-demand,presched", "--out", str(tmp_path),
                     "--profile", str(tmp_path / "trace")])
    assert rc == 0
    assert list((tmp_path / "trace").rglob("*.xplane.pb"))  # the profiler trace of one generation
    report = json.loads((tmp_path / "host_overhead.json").read_text())
    assert [r["policy"] for r in report["runs"]] == ["on-demand", "presched"]
    for r in report["runs"]:
        assert r["decode_hit_rate"] == 1.0  # every expert cached and warm: the figure is host work, not transfers
        assert r["us_per_moe_layer"] > 0 and r["breakdown_us"]["total"] > 0
        assert all(v >= 0 for k, v in r["breakdown_us"].items() if k != "rest")
        assert r["whole_token_us_per_moe_layer"] > 0 and r["whole_token_redone"] == 0
    assert report["resident_us_per_moe_layer"] > 0
    assert "SYNTHETIC WEIGHTS" in (tmp_path / "host_overhead.md").read_text()
    assert bench_main(["host-overhead", "--policies", "oracle", "--out", str(tmp_path)]) == 2


def test_quant_quality_benchmark(converted_model, tmp_path, capsys):
    """Each mode's KL is positive and grows as bits shrink; the teacher-forced pass reproduces the engine's own
    prefill logits; the expert bytes are what the offloaded engine moves per expert."""
    import numpy as np

    import jaxmoe
    from bench.quant_quality import main as quant_quality, window_log_probs
    from tests.test_offload import run_prefill

    _, model_dir = converted_model("qwen2_moe")
    rc = quant_quality(["--model", str(model_dir), "--modes", "int8,int4", "--tokens", "12", "--windows", "2",
                        "--out", str(tmp_path)])
    assert rc == 0
    rows = {r["mode"]: r for r in json.loads((tmp_path / "quant_quality.json").read_text())["rows"]}
    assert 0 < rows["int8"]["kl_mean"] < rows["int4"]["kl_mean"] < 0.05
    assert all(0.5 <= r["top1_agreement"] <= 1 and r["loss"] > 0 for r in rows.values())
    for mode, row in rows.items():
        assert row["expert_bytes"] == jaxmoe.load(model_dir, cache_slots=2, quantize_experts=mode).store.expert_bytes
    assert "| int4 |" in (tmp_path / "quant_quality.md").read_text()

    engine = jaxmoe.load(model_dir)
    prompt = [5, 9, 2, 7, 11, 3, 8]
    last = window_log_probs(engine, np.asarray([prompt], np.int32))[0, -1]
    logits = run_prefill(engine, prompt)[0].astype(np.float64)
    np.testing.assert_allclose(last, logits - logits.max() - np.log(np.exp(logits - logits.max()).sum()), atol=1e-5)

    capsys.readouterr()
    assert quant_quality(["--model", str(model_dir), "--modes", "int3", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--modes" in err[0] and "int3" in err[0]
