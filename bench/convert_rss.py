"""Peak memory of `python -m convert` on a multi-GB checkpoint: the converter must stream layer by layer.

    python -m bench.convert_rss [--gb 3.2] [--workdir DIR] [--keep]

Synthesizes a Mixtral-shaped bfloat16 checkpoint of at least --gb GB straight to disk (safetensors
shards of ~500 MB, written one tensor at a time from a small random pattern, so this process never
holds more than a few MB of weights), plus model.safetensors.index.json and a config.json the mixtral
adapter accepts. Then runs `python -m convert` on it in a child process and reports the child's peak
RSS (from wait4's rusage, i.e. ru_maxrss), its wall time, the checkpoint size and the largest layer's
size, next to the peak RSS of a child that only imports the converter (the fixed cost of jax/orbax).
Writes bench/results/cpu/convert_rss.json and deletes the synthetic files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULT = REPO / "bench" / "results" / "cpu" / "convert_rss.json"
MB = 1024 * 1024

# Mixtral-like shape, scaled down in width so that a few GB means a realistic number of layers.
SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_attention_heads=8,
             num_key_value_heads=2, head_dim=128, num_local_experts=8, num_experts_per_tok=2)
SHARD_BYTES = 500 * 1000 * 1000
BF16 = 2  # bytes per element


def layer_tensors(i: int, s: dict) -> list[tuple[str, tuple[int, ...]]]:
    d, f, e = s["hidden_size"], s["intermediate_size"], s["num_local_experts"]
    q, kv = s["num_attention_heads"] * s["head_dim"], s["num_key_value_heads"] * s["head_dim"]
    p = f"model.layers.{i}"
    out = [
        (f"{p}.input_layernorm.weight", (d,)),
        (f"{p}.self_attn.q_proj.weight", (q, d)),
        (f"{p}.self_attn.k_proj.weight", (kv, d)),
        (f"{p}.self_attn.v_proj.weight", (kv, d)),
        (f"{p}.self_attn.o_proj.weight", (d, q)),
        (f"{p}.post_attention_layernorm.weight", (d,)),
        (f"{p}.block_sparse_moe.gate.weight", (e, d)),
    ]
    for x in range(e):
        m = f"{p}.block_sparse_moe.experts.{x}"
        out += [(f"{m}.w1.weight", (f, d)), (f"{m}.w3.weight", (f, d)), (f"{m}.w2.weight", (d, f))]
    return out


def nbytes(shape) -> int:
    return math.prod(shape) * BF16


def plan_checkpoint(gb: float, s: dict) -> tuple[int, list[tuple[str, tuple]], int]:
    """(num_layers, tensors in file order, largest layer bytes) for a checkpoint of >= gb * 1e9 bytes."""
    v, d = s["vocab_size"], s["hidden_size"]
    globals_bytes = 2 * nbytes((v, d)) + nbytes((d,))
    layer_bytes = sum(nbytes(sh) for _, sh in layer_tensors(0, s))
    num_layers = max(1, math.ceil((gb * 1e9 - globals_bytes) / layer_bytes))
    tensors = [("model.embed_tokens.weight", (v, d))]
    for i in range(num_layers):
        tensors += layer_tensors(i, s)
    tensors += [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]
    return num_layers, tensors, layer_bytes


def hf_config(num_layers: int, s: dict) -> dict:
    return dict(
        architectures=["MixtralForCausalLM"], model_type="mixtral", dtype="bfloat16", hidden_act="silu",
        num_hidden_layers=num_layers, rms_norm_eps=1e-5, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, **s,
    )


def write_checkpoint(hf_dir: Path, gb: float, seed: int = 0) -> dict:
    """Writes shards tensor by tensor; returns facts about the checkpoint."""
    import ml_dtypes

    num_layers, tensors, layer_bytes = plan_checkpoint(gb, SHAPE)
    shards, cur, size = [], [], 0
    for name, shape in tensors:
        if cur and size + nbytes(shape) > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nbytes(shape)
    shards.append(cur)

    # One 8 MB random bf16 pattern (values ~ N(0, 0.02)); each tensor is a rotated run of it.
    pattern = (np.random.default_rng(seed).standard_normal(4 * MB, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    pattern = memoryview(np.concatenate([pattern, pattern]).tobytes())  # doubled: any rotation is one slice
    period = len(pattern) // 2

    hf_dir.mkdir(parents=True)
    weight_map, total, phase = {}, 0, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shard:
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes(shape)]}
            offset += nbytes(shape)
            weight_map[name] = fname
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)  # 8-byte aligned data, as the reference writer does
        with open(hf_dir / fname, "wb") as fh:
            fh.write(struct.pack("<Q", len(head)))
            fh.write(head)
            for name, shape in shard:
                left = nbytes(shape)
                while left:
                    n = min(left, period)
                    fh.write(pattern[phase:phase + n])
                    left -= n
                    phase = (phase + 4098) % period  # shifts by 2049 elements: no two tensors alike
        total += offset
        print(f"  wrote {fname} ({offset / 1e6:.0f} MB)", file=sys.stderr)
    (hf_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (hf_dir / "config.json").write_text(json.dumps(hf_config(num_layers, SHAPE), indent=2))
    largest_tensor = max(nbytes(sh) for _, sh in tensors)
    return dict(num_layers=num_layers, num_tensors=len(tensors), num_shards=len(shards), tensor_bytes=total,
                file_bytes=sum(p.stat().st_size for p in hf_dir.iterdir()), largest_layer_bytes=layer_bytes,
                largest_layer_experts_bytes=sum(nbytes(sh) for n, sh in layer_tensors(0, SHAPE) if ".experts." in n),
                largest_tensor_bytes=largest_tensor, globals_bytes=2 * nbytes((SHAPE["vocab_size"], SHAPE["hidden_size"])))


def run_child(argv: list[str]) -> tuple[int, float, int, str]:
    """(exit code, wall seconds, peak RSS bytes, stderr tail) of one child, measured with wait4."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
        wall = time.perf_counter() - t0
        err.seek(0)
        tail = err.read().decode(errors="replace")[-2000:]
    return proc.returncode, wall, usage.ru_maxrss * 1024, tail  # ru_maxrss is in KiB on Linux


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.convert_rss", description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=3.2, help="checkpoint size to synthesize, in GB (1e9 bytes)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to put the synthetic files (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and the converted model")
    parser.add_argument("--out", type=Path, default=RESULT, help=f"result JSON (default {RESULT.relative_to(REPO)})")
    args = parser.parse_args(argv)

    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="convert_rss-", dir=args.workdir))
    hf_dir, out_dir = work / "hf", work / "jaxmoe"
    try:
        print(f"synthesizing a >= {args.gb} GB Mixtral-shaped bf16 checkpoint in {hf_dir}", file=sys.stderr)
        t0 = time.perf_counter()
        facts = write_checkpoint(hf_dir, args.gb)
        synth_s = time.perf_counter() - t0

        rc, base_wall, base_rss, tail = run_child([sys.executable, "-c", "import convert.__main__, convert.converter"])
        if rc != 0:
            print(tail, file=sys.stderr)
            raise SystemExit(f"error: importing the converter failed (exit {rc})")
        print("running python -m convert ...", file=sys.stderr)
        rc, wall, rss, tail = run_child([sys.executable, "-m", "convert", str(hf_dir), str(out_dir), "--force"])
        if rc != 0:
            print(tail, file=sys.stderr)
            raise SystemExit(f"error: python -m convert failed (exit {rc})")
        cfg = json.loads((out_dir / "jaxmoe.json").read_text())
        assert cfg["num_layers"] == facts["num_layers"] and cfg["dtype"] == "bfloat16", cfg
        out_bytes = du(out_dir)

        result = dict(
            benchmark="convert_rss",
            checkpoint_gb=facts["file_bytes"] / 1e9,
            checkpoint_bytes=facts["file_bytes"],
            num_shards=facts["num_shards"],
            num_layers=facts["num_layers"],
            num_tensors=facts["num_tensors"],
            shape={**SHAPE, "dtype": "bfloat16"},
            largest_layer_mb=facts["largest_layer_bytes"] / MB,
            largest_layer_experts_mb=facts["largest_layer_experts_bytes"] / MB,
            largest_tensor_mb=facts["largest_tensor_bytes"] / MB,
            globals_mb=facts["globals_bytes"] / MB,
            peak_rss_mb=rss / MB,
            import_only_peak_rss_mb=base_rss / MB,
            peak_rss_above_import_mb=(rss - base_rss) / MB,
            peak_rss_over_largest_layer=rss / facts["largest_layer_bytes"],
            peak_rss_over_checkpoint=rss / facts["file_bytes"],
            wall_s=wall,
            import_only_wall_s=base_wall,
            throughput_mb_s=facts["file_bytes"] / MB / wall,
            output_mb=out_bytes / MB,
            synthesize_s=synth_s,
            measured_with="os.wait4 rusage ru_maxrss of the `python -m convert` child",
            cpu_count=os.cpu_count(),
            python=platform.python_version(),
            platform=platform.platform(),
            date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"checkpoint      {result['checkpoint_gb']:.2f} GB  ({facts['num_layers']} layers, {facts['num_shards']} shards)")
        print(f"largest layer   {result['largest_layer_mb']:.0f} MB  (experts {result['largest_layer_experts_mb']:.0f} MB, "
              f"largest tensor {result['largest_tensor_mb']:.0f} MB, embed+lm_head {result['globals_mb']:.0f} MB)")
        print(f"peak RSS        {result['peak_rss_mb']:.0f} MB  (import only {result['import_only_peak_rss_mb']:.0f} MB; "
              f"{result['peak_rss_over_largest_layer']:.2f}x the largest layer, "
              f"{100 * result['peak_rss_over_checkpoint']:.1f}% of the checkpoint)")
        print(f"wall            {wall:.1f} s  ({result['throughput_mb_s']:.0f} MB/s; output {result['output_mb']:.0f} MB)")
        print(f"wrote {args.out}")
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
