"""The embedded default model (our training -> HF format -> our converter -> our runtime), the HF
export round trip, and a smoke run of the trainer."""

import json

import numpy as np
import pytest

import jax.numpy as jnp
from flax import nnx

from jaxmoe.default_model import ASSET_DIR, DEFAULT_PROMPT, default_model_dir

needs_default_model = pytest.mark.skipif(not (ASSET_DIR / "config.json").is_file(), reason="default model not trained yet")


@pytest.fixture(scope="module")
def converted_default(tmp_path_factory):
    import os

    cache = tmp_path_factory.mktemp("jaxmoe-cache")
    old = os.environ.get("JAXMOE_CACHE")
    os.environ["JAXMOE_CACHE"] = str(cache)
    try:
        yield default_model_dir(progress=False)
    finally:
        if old is None:
            del os.environ["JAXMOE_CACHE"]
        else:
            os.environ["JAXMOE_CACHE"] = old


@needs_default_model
def test_committed_checkpoint_matches_transformers(converted_default):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxmoe.checkpoint import load_resident

    tok = AutoTokenizer.from_pretrained(ASSET_DIR, local_files_only=True)
    hf = AutoModelForCausalLM.from_pretrained(ASSET_DIR, dtype=torch.float32, local_files_only=True).eval()
    cfg, graphdef, state = load_resident(converted_default, dtype="float32")
    assert cfg.num_layers >= 8 and cfg.num_experts >= 32 and cfg.num_experts_per_tok >= 4
    model = nnx.merge(graphdef, state)
    for text in [DEFAULT_PROMPT, "import os\n\nclass Path:\n    def __init__(self, name):\n"]:
        ids = [cfg.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
        t = len(ids)
        ours, _, _ = model(jnp.asarray([ids]), jnp.arange(t)[None], model.init_cache(1, t))
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits.numpy()
        assert np.abs(np.asarray(ours) - ref).max() <= 1e-3 * max(1.0, np.abs(ref).max())


@needs_default_model
def test_second_use_hits_the_cache(converted_default):
    assert default_model_dir(progress=False) == converted_default


@needs_default_model
def test_report_has_held_out_loss():
    report = json.loads((ASSET_DIR / "train_report.json").read_text())
    assert report["held_out_loss"] > 0 and report["steps"] > 0 and report["parameters"] > 0


def test_export_round_trip(converted_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from convert.converter import convert
    from convert.export import export_hf
    from jaxmoe.checkpoint import load_resident

    hf_dir, model_dir = converted_model("qwen3_moe")
    cfg, _, state = load_resident(model_dir)
    export_hf(cfg, state.to_pure_dict(), tmp_path / "exported", dtype="float32")
    tokens = torch.tensor([[5, 9, 31, 2, 77, 40]])
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)(tokens).logits
        b = AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32)(tokens).logits
    assert torch.equal(a, b)
    convert(tmp_path / "exported", tmp_path / "again", progress=False)
    _, _, again = load_resident(tmp_path / "again")
    for x, y in zip(jax_leaves(state), jax_leaves(again), strict=True):
        np.testing.assert_array_equal(x, y)


def jax_leaves(state):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(state)]


def test_trainer_smoke(tmp_path):
    from jaxmoe.train import main

    out = tmp_path / "model"
    rc = main(["--out", str(out), "--steps", "2", "--max-docs", "12", "--layers", "1", "--vocab", "300",
               "--experts", "4", "--top-k", "2", "--seq-len", "32", "--batch", "4", "--hidden", "32",
               "--head-dim", "8", "--expert-size", "16"])
    assert rc == 0
    report = json.loads((out / "train_report.json").read_text())
    assert np.isfinite(report["held_out_loss"]) and report["steps"] == 2
    assert main(["--out", str(out), "--steps", "1"]) == 2  # refuses to overwrite


@needs_default_model
def test_committed_llapor_drives_presched_with_identical_output(converted_default):
    """The shipped predictor (predictors/assets/default-llapor) matches the default model and changes only speed."""
    import jaxmoe
    from pathlib import Path

    llapor = Path(__file__).resolve().parents[1] / "predictors" / "assets" / "default-llapor"
    resident = jaxmoe.load(converted_default)
    prompt = resident.tokenizer.encode(DEFAULT_PROMPT)
    expected = resident.generate(prompt, 12).generated_ids
    engine = jaxmoe.load(converted_default, cache_slots=24, policy="presched", predictor=str(llapor))
    result = engine.generate(prompt, 12)
    assert result.generated_ids == expected
    assert result.stats["predictor"] == "llapor" and result.stats["decode_cache"]["prefetches"] > 0
