"""`python -m convert` at the command line: every refusal and the successful layouts.

A refusal must exit 2 with exactly one `error: ...` line on stderr naming the file, tensor key or flag
at fault, no traceback, OUT_DIR absent afterwards (or untouched if it existed) and no temporary
`.NAME.converting-PID` / `.NAME.replaced-PID` debris next to it.

One tiny sharded Mixtral checkpoint (with a trained BPE tokenizer) is built per module and copied
into each test's tmp dir before being damaged. Every refusal runs in-process through
`convert.__main__.main` (fast); a representative subset also runs as a real `python -m convert`
subprocess to check the true exit status and that nothing else reaches stderr.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from convert.__main__ import main
from convert.converter import TOKENIZER_FILES
from convert.families import FAMILIES
from convert.source import INDEX_FILE
from jaxmoe.config import load_config
from jaxmoe.errors import JaxmoeError
from tests.hf_models import COMMON, build_hf_checkpoint

REPO = Path(__file__).resolve().parent.parent
FAMILY = "mixtral"
NUM_LAYERS = COMMON["num_hidden_layers"]
EXPERT_KEY = "model.layers.1.block_sparse_moe.experts.3.w1.weight"  # [intermediate, hidden] = [48, 32]
EXTRA_KEY = "model.layers.1.block_sparse_moe.extra_bias"


# ----------------------------------------------------------------------------- fixtures and helpers


def _add_tokenizer(hf_dir: Path) -> None:
    """A tiny trained byte-level BPE tokenizer saved the way the Hub ships one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0, 1, 2, 3 = the config's pad / bos / eos
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog", "mixture of experts on one accelerator"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=COMMON["vocab_size"], special_tokens=specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.save_pretrained(hf_dir)


@pytest.fixture(scope="module")
def hf_template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf_template")
    hf = build_hf_checkpoint(FAMILY, root / "hf")
    _add_tokenizer(hf)
    assert (hf / INDEX_FILE).is_file() and len(list(hf.glob("*.safetensors"))) > 1  # sharded, with an index
    return hf


@pytest.fixture
def hf_dir(hf_template, tmp_path) -> Path:
    return Path(shutil.copytree(hf_template, tmp_path / "hf"))


@pytest.fixture
def out_dir(tmp_path) -> Path:
    """OUT_DIR inside its own parent folder, so the parent's listing shows any debris."""
    (tmp_path / "models").mkdir()
    return tmp_path / "models" / "out"


def _cli(*argv) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "convert", *map(str, argv)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_subprocess(*argv) -> tuple[int, str]:
    """A real `python -m convert` -> (exit status, stderr)."""
    with _cli(*argv) as p:
        _, err = p.communicate(timeout=300)
    return p.returncode, err


def run_in_process(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse refusals exit through SystemExit
        rc = e.code
    return rc, capsys.readouterr().err


def snapshot(path: Path) -> dict:
    """Relative path -> bytes (None for folders) of everything under `path`."""
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def assert_refusal(rc: int, stderr: str, names: list[str]) -> None:
    assert rc == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"


def assert_no_debris(out_dir: Path, existed: bool) -> None:
    assert sorted(os.listdir(out_dir.parent)) == (["out"] if existed else [])


def read_index(hf: Path) -> dict:
    return json.loads((hf / INDEX_FILE).read_text())


def write_index(hf: Path, index: dict) -> None:
    (hf / INDEX_FILE).write_text(json.dumps(index, indent=2))


def shard_of(hf: Path, key: str) -> Path:
    return hf / read_index(hf)["weight_map"][key]


def rewrite_shard(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_config(hf: Path, **changes) -> None:
    cfg = json.loads((hf / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (hf / "config.json").write_text(json.dumps(cfg))


# ----------------------------------------------------------------------------- the refusals

# Each case damages (hf, out) and returns (extra CLI flags, the strings the one error line must name).


def case_no_hf_dir(hf, out):
    shutil.rmtree(hf)
    return [], [str(hf), "no such directory"]


def case_no_config(hf, out):
    (hf / "config.json").unlink()
    return [], [str(hf / "config.json"), "not found"]


def case_config_not_json(hf, out):
    (hf / "config.json").write_text('{"model_type": "mixtral", ')
    return [], [str(hf / "config.json"), "invalid JSON"]


def case_config_binary(hf, out):
    (hf / "config.json").write_bytes(b"\xff\xfe\x00\x01garbage")
    return [], [str(hf / "config.json")]


def case_unsupported_model_type(hf, out):
    edit_config(hf, model_type="llama")
    return [], ["config.json", "'llama'", "supported", *FAMILIES]


def case_no_model_type(hf, out):
    edit_config(hf, model_type=None)
    return [], ["config.json", "model_type", *FAMILIES]


def case_config_field_wrong_type(hf, out):
    edit_config(hf, num_hidden_layers="three")
    return [], ["config.json"]


def case_config_field_missing(hf, out):
    edit_config(hf, hidden_size=None)
    return [], ["config.json", "hidden_size"]


def case_no_safetensors(hf, out):
    for p in [*hf.glob("*.safetensors"), hf / INDEX_FILE]:
        p.unlink()
    return [], [str(hf), "model.safetensors"]


def case_index_not_json(hf, out):
    (hf / INDEX_FILE).write_text("{")
    return [], [str(hf / INDEX_FILE)]


def case_index_weight_map_not_a_dict(hf, out):
    write_index(hf, {"metadata": {}, "weight_map": sorted(read_index(hf)["weight_map"])})
    return [], [str(hf / INDEX_FILE)]


def case_missing_shard(hf, out):
    shard = shard_of(hf, EXPERT_KEY)
    shard.unlink()
    return [], [str(shard), "missing shard", INDEX_FILE]


def case_truncated_shard(hf, out):
    shard = shard_of(hf, EXPERT_KEY)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])  # header intact, tensor data cut short
    return [], [str(shard), "truncated"]


def case_truncated_header(hf, out):
    shard = shard_of(hf, EXPERT_KEY)
    shard.write_bytes(shard.read_bytes()[:20])
    return [], [str(shard)]


def case_empty_shard(hf, out):
    shard = shard_of(hf, EXPERT_KEY)
    shard.write_bytes(b"")
    return [], [str(shard)]


def case_garbage_shard(hf, out):
    shard = shard_of(hf, EXPERT_KEY)
    shard.write_bytes(np.random.RandomState(0).bytes(shard.stat().st_size))
    return [], [str(shard), "corrupt"]


def case_garbage_header(hf, out):
    shard = shard_of(hf, EXPERT_KEY)  # plausible header length, then bytes that are not JSON
    shard.write_bytes((64).to_bytes(8, "little") + np.random.RandomState(1).bytes(4000))
    return [], [str(shard)]


def case_missing_tensor(hf, out):
    rewrite_shard(shard_of(hf, EXPERT_KEY), lambda t: t.pop(EXPERT_KEY))
    index = read_index(hf)
    del index["weight_map"][EXPERT_KEY]
    write_index(hf, index)
    return [], ["missing tensor", EXPERT_KEY]


def case_tensor_listed_but_absent(hf, out):
    shard = shard_of(hf, EXPERT_KEY)
    rewrite_shard(shard, lambda t: t.pop(EXPERT_KEY))  # the index still lists it
    return [], [str(shard), EXPERT_KEY]


def case_missing_global_tensor(hf, out):
    key = "model.norm.weight"
    rewrite_shard(shard_of(hf, key), lambda t: t.pop(key))
    index = read_index(hf)
    del index["weight_map"][key]
    write_index(hf, index)
    return [], ["missing tensor", key]


def case_extra_tensor(hf, out):
    shard = shard_of(hf, EXPERT_KEY)
    rewrite_shard(shard, lambda t: t.update({EXTRA_KEY: np.zeros((6,), np.float32)}))
    index = read_index(hf)
    index["weight_map"][EXTRA_KEY] = shard.name
    write_index(hf, index)
    return [], [str(shard), "unused tensor", EXTRA_KEY]


def case_extra_expert(hf, out):
    key = "model.layers.1.block_sparse_moe.experts.6.w1.weight"  # the model has experts 0..5
    shard = shard_of(hf, EXPERT_KEY)
    rewrite_shard(shard, lambda t: t.update({key: t[EXPERT_KEY].copy()}))
    index = read_index(hf)
    index["weight_map"][key] = shard.name
    write_index(hf, index)
    return [], [str(shard), key]


def case_extra_layer(hf, out):
    key = f"model.layers.{NUM_LAYERS}.input_layernorm.weight"
    shard = shard_of(hf, "model.norm.weight")
    rewrite_shard(shard, lambda t: t.update({key: np.ones((COMMON["hidden_size"],), np.float32)}))
    index = read_index(hf)
    index["weight_map"][key] = shard.name
    write_index(hf, index)
    return [], [str(shard), "unused tensor", key]


def case_wrong_shape(hf, out):
    shard = shard_of(hf, EXPERT_KEY)
    rewrite_shard(shard, lambda t: t.update({EXPERT_KEY: np.zeros((5, 7), np.float32)}))
    return [], [str(shard), EXPERT_KEY, "[5, 7]", "[48, 32]"]


def case_transposed_shape(hf, out):
    shard = shard_of(hf, EXPERT_KEY)
    rewrite_shard(shard, lambda t: t.update({EXPERT_KEY: np.ascontiguousarray(t[EXPERT_KEY].T)}))
    return [], [str(shard), EXPERT_KEY, "[32, 48]"]


def case_out_dir_not_empty(hf, out):
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    return [], [str(out), "--force"]


def case_out_dir_is_a_file(hf, out):
    out.write_text("a file in the way")
    return [], [str(out), "--force"]


def case_bad_dtype_flag(hf, out):
    return ["--dtype", "int8"], ["--dtype", "int8"]


def case_unknown_flag(hf, out):
    return ["--overwrite"], ["--overwrite"]


def case_generation_config_bad_eos(hf, out):
    (hf / "generation_config.json").write_text(json.dumps({"eos_token_id": ["</s>"]}))
    return [], ["generation_config.json", "eos_token_id"]


def case_generation_config_not_json(hf, out):
    (hf / "generation_config.json").write_text("{eos")
    return [], ["generation_config.json"]


def case_force_with_bad_input(hf, out):  # --force must not touch OUT_DIR when the input is refused
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rewrite_shard(shard_of(hf, EXPERT_KEY), lambda t: t.update({EXPERT_KEY: np.zeros((5, 7), np.float32)}))
    return ["--force"], [EXPERT_KEY]


REFUSALS = {name[len("case_"):]: fn for name, fn in globals().items() if name.startswith("case_")}
SUBPROCESS_REFUSALS = ["no_hf_dir", "truncated_shard", "missing_tensor", "out_dir_not_empty", "bad_dtype_flag"]


def _prepare_refusal(case, hf, out):
    flags, names = REFUSALS[case](hf, out)
    existed = out.exists()
    return dict(flags=flags, names=names, existed=existed, out_before=snapshot(out) if existed else None,
                hf_before=snapshot(hf) if hf.exists() else None)


def _check_refused(prep, rc, err, hf, out):
    assert_refusal(rc, err, prep["names"])
    assert_no_debris(out, prep["existed"])
    if prep["existed"]:
        assert snapshot(out) == prep["out_before"]  # untouched
    if prep["hf_before"] is not None:
        assert snapshot(hf) == prep["hf_before"]  # the input is never modified


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusal(case, hf_dir, out_dir, capsys):
    prep = _prepare_refusal(case, hf_dir, out_dir)
    rc, err = run_in_process(capsys, hf_dir, out_dir, *prep["flags"])
    _check_refused(prep, rc, err, hf_dir, out_dir)


def test_refusal_cli(hf_template, tmp_path):
    """The same contract through real `python -m convert` processes (run side by side to save time)."""
    runs = {}
    for case in SUBPROCESS_REFUSALS:
        hf = Path(shutil.copytree(hf_template, tmp_path / case / "hf"))
        (tmp_path / case / "models").mkdir()
        out = tmp_path / case / "models" / "out"
        prep = _prepare_refusal(case, hf, out)
        runs[case] = (prep, hf, out, _cli(hf, out, *prep["flags"]))
    results = {}
    for case, (_, _, _, proc) in runs.items():
        with proc:
            _, err = proc.communicate(timeout=300)
        results[case] = (proc.returncode, err)
    for case, (prep, hf, out, _) in runs.items():
        rc, err = results[case]
        try:
            _check_refused(prep, rc, err, hf, out)
        except AssertionError as e:
            raise AssertionError(f"{case}: {e}") from None


def test_failure_while_writing_leaves_no_debris(hf_dir, out_dir, capsys, monkeypatch):
    """A read error in the last layer (after earlier pieces were written) removes the temp dir."""
    from convert.source import SafetensorsSource

    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    before = snapshot(out_dir)
    real_read, reads = SafetensorsSource.read, []

    def failing_read(self, key):
        reads.append(key)
        if key.startswith(f"model.layers.{NUM_LAYERS - 1}."):
            raise JaxmoeError(f"{self.file_of[key]}: cannot read tensor {key} (simulated I/O error)")
        return real_read(self, key)

    monkeypatch.setattr(SafetensorsSource, "read", failing_read)
    rc, err = run_in_process(capsys, hf_dir, out_dir, "--force")
    assert rc == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error" in line]  # tqdm's progress bar precedes it
    assert len(errors) == 1 and errors[0].startswith("error: ") and "simulated I/O error" in errors[0], err
    assert any(k.startswith("model.layers.0.") for k in reads)  # it did get as far as writing
    assert_no_debris(out_dir, existed=True)
    assert snapshot(out_dir) == before


# ----------------------------------------------------------------------------- success


def test_converts_sharded_checkpoint_layout(hf_dir, out_dir, capsys):
    from jaxmoe.config import load_config

    rc, err = run_in_process(capsys, hf_dir, out_dir)
    assert rc == 0, err
    assert "Traceback" not in err and "error" not in err
    assert sorted(os.listdir(out_dir.parent)) == ["out"]
    assert (out_dir / "jaxmoe.json").is_file() and (out_dir / "hf_config.json").is_file()
    weights = out_dir / "weights"
    assert (weights / "globals").is_dir()
    assert sorted(os.listdir(weights)) == ["globals"] + [f"layer_{i:03d}" for i in range(NUM_LAYERS)]
    for i in range(NUM_LAYERS):
        assert sorted(os.listdir(weights / f"layer_{i:03d}")) == ["dense", "experts"]
    assert not list(out_dir.rglob("*.safetensors"))
    copied = [n for n in TOKENIZER_FILES if (hf_dir / n).is_file()]
    assert "tokenizer.json" in copied and "tokenizer_config.json" in copied
    for name in copied:
        assert (out_dir / name).read_bytes() == (hf_dir / name).read_bytes()
    cfg = load_config(out_dir)
    assert (cfg.family, cfg.num_layers, cfg.num_experts, cfg.dtype) == (FAMILY, NUM_LAYERS, 6, "float32")
    assert json.loads((out_dir / "hf_config.json").read_text()) == json.loads((hf_dir / "config.json").read_text())

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out_dir)
    text = "the quick brown fox"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_relative_dot_out_dir(hf_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "models" / "here"
    out.mkdir(parents=True)  # an empty existing folder, given as `.`
    monkeypatch.chdir(out)
    rc, err = run_in_process(capsys, hf_dir, ".")
    assert rc == 0, err
    assert sorted(os.listdir(out.parent)) == ["here"]
    assert (out / "jaxmoe.json").is_file() and (out / "weights" / "layer_000" / "experts").is_dir()


def test_force_replaces_existing_output(hf_dir, out_dir):
    out_dir.mkdir()
    (out_dir / "stale.txt").write_text("old")
    (out_dir / "weights").mkdir()
    (out_dir / "weights" / "junk").write_text("old")
    rc, err = run_subprocess(hf_dir, out_dir, "--force", "--dtype", "float16")
    assert rc == 0, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("converted mixtral")
    assert sorted(os.listdir(out_dir.parent)) == ["out"]  # no .out.converting-* / .out.replaced-* left
    assert not (out_dir / "stale.txt").exists() and not (out_dir / "weights" / "junk").exists()
    assert json.loads((out_dir / "jaxmoe.json").read_text())["dtype"] == "float16"
    assert (out_dir / "weights" / f"layer_{NUM_LAYERS - 1:03d}" / "experts").is_dir()


def test_force_replaces_a_file(hf_dir, out_dir, capsys):
    out_dir.write_text("a file in the way")
    rc, err = run_in_process(capsys, hf_dir, out_dir, "--force")
    assert rc == 0, err
    assert sorted(os.listdir(out_dir.parent)) == ["out"]
    assert (out_dir / "jaxmoe.json").is_file()


def test_force_into_empty_existing_dir_without_flag(hf_dir, out_dir, capsys):
    out_dir.mkdir()  # empty: allowed without --force
    rc, err = run_in_process(capsys, hf_dir, out_dir)
    assert rc == 0, err
    assert sorted(os.listdir(out_dir.parent)) == ["out"]
    assert (out_dir / "jaxmoe.json").is_file()


def test_bfloat16_output_loads(hf_dir, out_dir, capsys):
    import jax
    import jax.numpy as jnp
    import ml_dtypes

    from jaxmoe.checkpoint import load_resident

    rc, err = run_in_process(capsys, hf_dir, out_dir, "--dtype", "bfloat16")
    assert rc == 0, err
    cfg, _, state = load_resident(out_dir)
    assert cfg.dtype == "bfloat16"
    leaves = jax.tree.leaves(state)
    assert leaves and all(x.dtype == jnp.bfloat16 for x in leaves)
    pure = state.to_pure_dict()
    src = {}
    for shard in sorted(hf_dir.glob("*.safetensors")):
        src.update(load_file(shard))
    np.testing.assert_array_equal(np.asarray(pure["embed"]["embedding"]),
                                  src["model.embed_tokens.weight"].astype(ml_dtypes.bfloat16))
    w1 = np.asarray(pure["layers"][1]["moe"]["experts"]["w_gate"][3])  # HF [f, d] -> ours [d, f]
    np.testing.assert_array_equal(w1, src[EXPERT_KEY].T.astype(ml_dtypes.bfloat16))
    w2 = np.asarray(pure["layers"][2]["moe"]["experts"]["w_down"][5])
    np.testing.assert_array_equal(w2, src["model.layers.2.block_sparse_moe.experts.5.w2.weight"].T
                                  .astype(ml_dtypes.bfloat16))


def test_generation_config_eos_ids_are_the_stop_ids(hf_dir, out_dir, capsys):
    """transformers' generate stops on generation_config.json's eos_token_id (gpt-oss adds <|call|> there):
    so does ours; without the field, config.json's."""
    edit_config(hf_dir, eos_token_id=2)
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5, 7], "do_sample": False}))
    rc, err = run_in_process(capsys, hf_dir, out_dir)
    assert rc == 0, err
    assert load_config(out_dir).eos_token_ids == (2, 5, 7)
    assert json.loads((out_dir / "generation_config.json").read_text())["eos_token_id"] == [2, 5, 7]  # copied
    (hf_dir / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    rc, err = run_in_process(capsys, hf_dir, out_dir, "--force")
    assert rc == 0, err
    assert load_config(out_dir).eos_token_ids == (2,)
