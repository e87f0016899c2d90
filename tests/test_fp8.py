"""FP8 block-wise checkpoints (convert/fp8.py): dequantization bit for bit against transformers' own functions,
whole converted models against transformers loading the same FP8 checkpoint with
`FineGrainedFP8Config(dequantize=True)`, and the refusals.

The tiny models of tests/hf_models.py are quantized here as the Hub ships them: every linear weight except the
embeddings, routers and lm_head (`modules_to_not_convert`) becomes float8_e4m3fn with one float32
`weight_scale_inv` = amax / 448 per block. Blocks are 16 x 16 so each matrix has several.

transformers 5.25's loader takes the block size from the scale grid (rows // scale rows), which is right only for
whole blocks; models compared against that loader are sized in whole blocks. Ragged shapes (the tiny models as
they are) are checked against transformers' `_dequantize_fp8_weight`, which uses the declared block size.
"""

import json

import ml_dtypes
import numpy as np
import pytest

import jaxmoe
from convert.converter import convert
from convert.fp8 import dequantize_fp8
from jaxmoe.checkpoint import load_resident
from jaxmoe.errors import JaxmoeError
from tests.hf_models import build_hf_checkpoint
from tests.test_deepseek import full_forward as mla_forward, set_mode
from tests.test_parity import full_forward as gqa_forward

BLOCK = (16, 16)
E4M3_MAX = 448.0
NOT_CONVERTED = ["lm_head", "model.embed_tokens", "mlp.gate"]  # as Qwen3-*-FP8 lists them: routers stay float
# tiny models with every quantized matrix a whole number of 16 x 16 blocks
WHOLE_BLOCKS = {
    "qwen3_moe": dict(head_dim=16),
    "deepseek_v3": dict(q_lora_rank=16, qk_rope_head_dim=16, v_head_dim=8),
    "glm4_moe": dict(head_dim=16),
    "minimax_m2": dict(head_dim=16),
}
# what each family's Hub FP8 config.json says that the others do not (MiniMax-M2: its fmt spelling, router names)
FAMILY_QUANTIZATION = {"minimax_m2": dict(fmt="float8_e4m3fn", modules_to_not_convert=["gate", "e_score_correction_bias",
                                                                                       "lm_head", "model.embed_tokens"])}
EXPERT_DOWN = {"minimax_m2": "block_sparse_moe.experts.3.w2"}  # else mlp.experts.3.down_proj


def quantize_fp8(w: np.ndarray, block=BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """float32 [out, in] -> (float8_e4m3fn [out, in], float32 scale_inv [ceil(out/BM), ceil(in/BN)]): each block
    divided by its amax / 448 (1 for an all-zero block), as the Hub's FP8 checkpoints are made."""
    rows, cols = w.shape
    scales = np.ones((-(-rows // block[0]), -(-cols // block[1])), np.float32)
    q = np.empty(w.shape, ml_dtypes.float8_e4m3fn)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            part = (slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1]))
            amax = np.abs(w[part]).max()
            if amax > 0:
                scales[i, j] = amax / np.float32(E4M3_MAX)
            q[part] = (w[part] / scales[i, j]).astype(ml_dtypes.float8_e4m3fn)
    return q, scales


def _is_quantized(key: str, value: np.ndarray, not_converted=NOT_CONVERTED) -> bool:
    return key.endswith(".weight") and value.ndim == 2 and not any(n in key for n in not_converted)


def _hf_tensors(hf_dir) -> dict:
    from safetensors.numpy import load_file

    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    out = {}
    for name in sorted(set(index["weight_map"].values())):
        out.update(load_file(hf_dir / name))
    return out


def fp8_checkpoint(tmp_path, family: str, **overrides) -> tuple[dict, dict]:
    """A tiny float32 model of `family` quantized as the Hub ships it -> (tensors, config)."""
    hf_dir = build_hf_checkpoint(family, tmp_path / f"{family}-float", **overrides)
    config = json.loads((hf_dir / "config.json").read_text())
    config["quantization_config"] = {**dict(quant_method="fp8", activation_scheme="dynamic", fmt="e4m3",
                                            weight_block_size=list(BLOCK), modules_to_not_convert=NOT_CONVERTED),
                                     **FAMILY_QUANTIZATION.get(family, {})}
    not_converted = config["quantization_config"]["modules_to_not_convert"]
    tensors = {}
    for key, value in _hf_tensors(hf_dir).items():
        if _is_quantized(key, value, not_converted):
            tensors[key], tensors[key + "_scale_inv"] = quantize_fp8(value)
        else:
            tensors[key] = value
    return tensors, config


def write_checkpoint(directory, tensors: dict, config: dict):
    from safetensors.numpy import save_file

    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def _torch_fp8(x: np.ndarray):
    import torch

    return torch.from_numpy(x.view(np.uint8).copy()).view(torch.float8_e4m3fn)


def transformers_loader_dequantize(q: np.ndarray, s: np.ndarray, dtype: str) -> np.ndarray:
    """What transformers' FP8 loader (`Fp8Dequantize`, run by `FineGrainedFP8Config(dequantize=True)`) makes of one
    weight and its scales, as float32 values (right for whole blocks only)."""
    import torch
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    out = Fp8Dequantize(None)._dequantize_one(_torch_fp8(q), torch.from_numpy(s), output_dtype=getattr(torch, dtype))
    return out.float().numpy()


def transformers_declared_block_dequantize(q: np.ndarray, s: np.ndarray) -> np.ndarray:
    """transformers' `_dequantize_fp8_weight` (its FP8 backward pass) in float32: the declared block size, ragged
    edges cut short."""
    import torch
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    return _dequantize_fp8_weight(_torch_fp8(q), torch.from_numpy(s), list(BLOCK), torch.float32).numpy()


def _bits(x: np.ndarray) -> np.ndarray:
    return x.view(np.uint32 if x.dtype == np.float32 else np.uint16)


def _random_weight(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * rng.uniform(0.01, 30.0, (*shape[:-2], 1, 1))).astype(np.float32)


# ---------------------------------------------------------------- dequantization, tensor by tensor


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_whole_blocks_equal_transformers_loader(dtype):
    pytest.importorskip("transformers.integrations.finegrained_fp8")
    q, s = quantize_fp8(_random_weight((48, 64)))
    s[1, 2] = 0.0  # a zero scale and a tiny one: exact zeros, subnormal products
    s[2, 0] = np.float32(1e-40)
    got = dequantize_fp8(q, s, BLOCK, np.dtype(dtype) if dtype == "float32" else ml_dtypes.bfloat16)
    ref = transformers_loader_dequantize(q, s, dtype)
    np.testing.assert_array_equal(_bits(got), _bits(ref.astype(got.dtype)))


def test_ragged_edges_use_the_declared_block_size():
    """[40, 37] in blocks of 16: scale grid [3, 3], last blocks 8 rows and 5 columns. Bit for bit transformers'
    declared-block dequantization (float32), and its loader's arithmetic (bfloat16) on the weight zero-padded to
    whole blocks; transformers' loader itself cannot take this shape (40 rows do not divide into 3 blocks)."""
    pytest.importorskip("transformers.integrations.finegrained_fp8")
    q, s = quantize_fp8(_random_weight((40, 37), seed=1))
    assert s.shape == (3, 3)
    got32 = dequantize_fp8(q, s, BLOCK)
    np.testing.assert_array_equal(_bits(got32), _bits(transformers_declared_block_dequantize(q, s)))
    padded = np.zeros((48, 48), ml_dtypes.float8_e4m3fn)
    padded[:40, :37] = q
    ref16 = transformers_loader_dequantize(padded, s, "bfloat16")[:40, :37].astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(_bits(dequantize_fp8(q, s, BLOCK, ml_dtypes.bfloat16)), _bits(ref16))
    # the block of row 20, column 36 is (1, 2): a wrong cut (blocks of 40/3 rows) would scale it differently
    assert got32[20, 36] == np.float32(q[20, 36]) * s[1, 2]


def test_stacked_experts_and_e8m0_scales_equal_transformers_loader():
    """A fused [E, out, in] expert tensor with uint8 E8M0 scales (2**(b - 127)), every byte value included."""
    pytest.importorskip("transformers.integrations.finegrained_fp8")
    q = np.random.default_rng(2).integers(0, 256, (4, 64, 64), dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
    q = np.where(np.isnan(q.astype(np.float32)), np.zeros_like(q), q)  # NaN codes: NaN either way
    s = np.arange(4 * 4 * 4, dtype=np.uint8).reshape(4, 4, 4) * np.uint8(4) + np.uint8(3)  # 3, 7, ..., 255 (inf)
    s[0, 0, 0], s[0, 0, 1], s[3, 3, 3] = 0, 127, 254
    got = dequantize_fp8(q, s, BLOCK)
    ref = transformers_loader_dequantize(q, s, "float32")
    np.testing.assert_array_equal(_bits(got), _bits(ref))


def test_bfloat16_scales_widen_exactly_and_bad_arrays_are_refused():
    q, s = quantize_fp8(_random_weight((32, 48), seed=3))
    s16 = s.astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(_bits(dequantize_fp8(q, s16, BLOCK)), _bits(dequantize_fp8(q, s16.astype(np.float32), BLOCK)))
    with pytest.raises(JaxmoeError, match=r"scale_inv must be .* of shape \[2, 3\]"):
        dequantize_fp8(q, s[:, :2], BLOCK)
    with pytest.raises(JaxmoeError, match="scale_inv must be"):
        dequantize_fp8(q, s.astype(np.int32), BLOCK)
    with pytest.raises(JaxmoeError, match="float8_e4m3fn"):
        dequantize_fp8(q.astype(ml_dtypes.float8_e5m2), s, BLOCK)


# ---------------------------------------------------------------- whole models


def _load_with_transformers(fp8_dir, monkeypatch):
    """transformers' own load of the FP8 checkpoint, dequantized to float32 on CPU."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config
    from transformers.quantizers import quantizer_finegrained_fp8
    from transformers.utils import is_accelerate_available

    if not is_accelerate_available():  # asked for before any FP8 load; the dequantize path does not use it
        monkeypatch.setattr(quantizer_finegrained_fp8, "is_accelerate_available", lambda: True)
    return AutoModelForCausalLM.from_pretrained(
        fp8_dir, dtype="float32", quantization_config=FineGrainedFP8Config(dequantize=True)
    ).eval()


@pytest.mark.parametrize("family", list(WHOLE_BLOCKS))
def test_fp8_model_matches_transformers(family, tmp_path, monkeypatch):
    """Logits and greedy tokens of the converted FP8 checkpoint equal transformers' (float32), and the converted
    weights equal transformers' dequantization bit for bit."""
    torch = pytest.importorskip("torch")
    tensors, config = fp8_checkpoint(tmp_path, family, **WHOLE_BLOCKS[family])
    fp8_dir = write_checkpoint(tmp_path / "fp8", tensors, config)
    convert(fp8_dir, tmp_path / "out", dtype="float32", progress=False)

    hf = _load_with_transformers(fp8_dir, monkeypatch)
    cfg, graphdef, state = load_resident(tmp_path / "out")
    flat = dict(state.flat_state())
    q_key = "model.layers.1.self_attn.q_b_proj.weight" if family == "deepseek_v3" else "model.layers.1.self_attn.q_proj.weight"
    ours = np.asarray(flat[("layers", 1, "attn", q_key.split(".")[-2])].get_value())
    np.testing.assert_array_equal(ours.T, hf.state_dict()[q_key].numpy())
    expert = np.asarray(flat[("layers", 1, "moe", "experts", "w_down")].get_value())[3]
    down = f"model.layers.1.{EXPERT_DOWN.get(family, 'mlp.experts.3.down_proj')}.weight"
    np.testing.assert_array_equal(expert.T, transformers_loader_dequantize(tensors[down], tensors[down + "_scale_inv"],
                                                                           "float32"))

    from flax import nnx

    model = nnx.merge(graphdef, state)
    tokens = np.random.RandomState(0).randint(3, cfg.vocab_size, (2, 9)).astype(np.int32)
    if cfg.attention_kind == "mla":
        set_mode(model, "absorbed")
        got, _ = mla_forward(model, tokens)
    else:
        got, _ = gqa_forward(model, tokens)
    with torch.no_grad():
        ref = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())

    prompt = [5, 17, 33, 8, 41, 12, 9]
    ours_tokens = jaxmoe.load(tmp_path / "out").generate(prompt, 10).generated_ids
    with torch.no_grad():
        ref_tokens = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt):].tolist()
    assert ours_tokens == ref_tokens and len(ours_tokens) == 10


def test_ragged_fp8_model_equals_declared_block_dequantization(tmp_path):
    """DeepSeek-V3 sized as in tests/hf_models.py (kv_a_proj_with_mqa [20, 32], kv_b_proj [56, 16], o_proj
    [32, 24], ...: ragged in blocks of 16), converted to bfloat16: every parameter bit for bit the conversion of
    the float32 checkpoint holding transformers' declared-block dequantization, rounded once."""
    pytest.importorskip("transformers.integrations.finegrained_fp8")
    tensors, config = fp8_checkpoint(tmp_path, "deepseek_v3")
    assert tensors["model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (2, 2)
    dense = {k: v for k, v in tensors.items() if not k.endswith("_scale_inv")}
    for key in dense:
        if key + "_scale_inv" in tensors:
            dense[key] = transformers_declared_block_dequantize(tensors[key], tensors[key + "_scale_inv"])
    write_checkpoint(tmp_path / "fp8", tensors, config)
    write_checkpoint(tmp_path / "dense", dense, {k: v for k, v in config.items() if k != "quantization_config"})
    convert(tmp_path / "fp8", tmp_path / "fp8-out", dtype="bfloat16", progress=False)
    convert(tmp_path / "dense", tmp_path / "dense-out", dtype="bfloat16", progress=False)
    flat_q = dict(load_resident(tmp_path / "fp8-out")[2].flat_state())
    flat_d = dict(load_resident(tmp_path / "dense-out")[2].flat_state())
    assert flat_q.keys() == flat_d.keys()
    for path in flat_q:
        a, b = np.asarray(flat_q[path].get_value()), np.asarray(flat_d[path].get_value())
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8), str(path))


# ---------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def small_fp8(tmp_path_factory):
    return fp8_checkpoint(tmp_path_factory.mktemp("fp8"), "qwen3_moe")


Q = "model.layers.1.self_attn.q_proj.weight"
DOWN = "model.layers.1.mlp.experts.2.down_proj.weight"


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


def _with_quant(config: dict, **fields) -> dict:
    return dict(config, quantization_config=dict(config["quantization_config"], **fields))


BAD_CHECKPOINTS = {
    "weight without its scale": (lambda t, c: (_without(t, DOWN + "_scale_inv"), c),
                                 ["model.safetensors", DOWN, "no scale tensor", DOWN + "_scale_inv"]),
    "scale of the wrong shape": (lambda t, c: ({**t, Q + "_scale_inv": np.ones((2, 2), np.float32)}, c),
                                 ["model.safetensors", Q + "_scale_inv", "[2, 2]", "[3, 2]", "blocks of [16, 16]"]),
    "float8 of another kind": (lambda t, c: ({**t, Q: t[Q].astype(ml_dtypes.float8_e5m2)}, c),
                               ["model.safetensors", Q, "F8_E5M2", "F8_E4M3"]),
    "scale of an unquantized tensor": (
        lambda t, c: ({**t, "model.embed_tokens.weight_scale_inv": np.ones((6, 2), np.float32)}, c),
        ["model.safetensors", "model.embed_tokens.weight_scale_inv", "no float8 tensor", "F32"]),
    "float8 without an fp8 config": (lambda t, c: (t, _without(c, "quantization_config")),
                                     ["model.safetensors", "F8_E4M3", "declares no fp8"]),
    "block size of one int": (lambda t, c: (t, _with_quant(c, weight_block_size=[16])),
                              ["config.json", "weight_block_size", "2 positive integers", "[16]"]),
    "block size not ints": (lambda t, c: (t, _with_quant(c, weight_block_size=[16.0, "16"])),
                            ["config.json", "weight_block_size"]),
    "block size null (per-tensor)": (lambda t, c: (t, _with_quant(c, weight_block_size=None)),
                                     ["config.json", "weight_block_size", "None"]),
    "unknown fmt": (lambda t, c: (t, _with_quant(c, fmt="e5m2")), ["config.json", "fmt", "'e5m2'", "e4m3"]),
    "unknown scale_fmt": (lambda t, c: (t, _with_quant(c, scale_fmt="e4m3")), ["config.json", "scale_fmt"]),
    "static activations": (lambda t, c: (t, _with_quant(c, activation_scheme="static")),
                           ["config.json", "activation_scheme", "'static'"]),
    "another method": (lambda t, c: (t, dict(c, quantization_config={"quant_method": "awq"})),
                       ["config.json", "quantization_config (awq)", "fp8"]),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_fp8_checkpoints_are_refused(case, small_fp8, tmp_path):
    change, words = BAD_CHECKPOINTS[case]
    tensors, config = change(*small_fp8)
    hf_dir = write_checkpoint(tmp_path / "hf", tensors, config)
    with pytest.raises(JaxmoeError) as err:
        convert(hf_dir, tmp_path / "out", progress=False)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # nothing written, no temporary directory left
