"""CLI: python -m predictors.trace --model DIR (--texts FILE [FILE ...] | --stdlib N) --out TRACE_DIR
       [--max-tokens-per-doc 512] [--prefill-tokens 32] [--validation-fraction 0.2] [--seed 0] [--force]

Records routing traces (format: `predictors.trace_format`) by running a converted model the way the
runtime does: one jitted prefill over the first P tokens of a document, then teacher-forced single-token
decode steps over the rest with the KV cache (donated; its length is one power-of-two bucket for the whole
run, so neither step recompiles per token or per document). For every token and MoE layer it keeps the
residual stream entering the MoE block (float16), the router logits, the chosen experts and their weights.

Each input file is one UTF-8 document, tokenized with the model's tokenizer (a BOS token is prepended
when the model has one, as `jaxmoe.generate` does) and truncated to --max-tokens-per-doc tokens.
`--stdlib N` picks N Python files of CPython's standard library instead (deterministic for a given
Python install and --seed). Documents go to the train or validation split by a hash of their name and
the seed. The trace is written into a temporary sibling directory and renamed into place at the end.
Python API: `trace_documents(model_dir, [(name, token_ids), ...], out_dir, ...)` (token ids directly, so
models without a tokenizer can be traced).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import sys
from functools import partial
from pathlib import Path

import numpy as np

from jaxmoe.errors import JaxmoeError, run_cli
from predictors.trace_format import MANIFEST, write_manifest, write_shard

DEFAULT_SHARD_TOKENS = 16384
F16_MAX = 65504.0


# -- document selection -----------------------------------------------------------------------------
def split_of(name: str, seed: int, validation_fraction: float) -> str:
    return "validation" if _unit_hash(name, seed) < validation_fraction else "train"


def _unit_hash(name: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_splits(names: list[str], seed: int, validation_fraction: float) -> dict[str, str]:
    """Deterministic document split by hash(name, seed); with >= 2 documents and 0 < fraction < 1 both
    splits get at least one document (the lowest / highest hash moves over)."""
    splits = {n: split_of(n, seed, validation_fraction) for n in names}
    if len(names) >= 2 and 0 < validation_fraction < 1:
        by_hash = sorted(names, key=lambda n: _unit_hash(n, seed))
        if "validation" not in splits.values():
            splits[by_hash[0]] = "validation"
        if "train" not in splits.values():
            splits[by_hash[-1]] = "train"
    return splits


def stdlib_files(count: int, seed: int = 0, min_chars: int = 200) -> list[tuple[str, str]]:
    """`count` Python files of the standard library (the directory of the `os` module, no site-packages)
    -> [(name "stdlib/<relative path>", text)], sorted by name. Deterministic per Python install + seed."""
    if count < 1:
        raise JaxmoeError("--stdlib must be >= 1")
    root = Path(os.__file__).resolve().parent
    candidates = sorted(
        p for p in root.rglob("*.py")
        if not {"site-packages", "dist-packages", "__pycache__"} & set(p.relative_to(root).parts)
    )
    random.Random(seed).shuffle(candidates)
    picked = []
    for path in candidates:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if len(text) >= min_chars:
            picked.append((f"stdlib/{path.relative_to(root).as_posix()}", text))
            if len(picked) == count:
                break
    if len(picked) < count:
        raise JaxmoeError(f"--stdlib {count}: only {len(picked)} usable Python files under {root}")
    return sorted(picked)


def read_texts(paths: list[Path]) -> list[tuple[str, str]]:
    docs = []
    for path in paths:
        try:
            docs.append((str(path), Path(path).read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as e:
            raise JaxmoeError(f"--texts {path}: cannot read as UTF-8 ({e})") from None
    return docs


def tokenize(tokenizer, cfg, docs: list[tuple[str, str]]) -> list[tuple[str, list[int]]]:
    out = []
    for name, text in docs:
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        if cfg.bos_token_id is not None and (not ids or ids[0] != cfg.bos_token_id):
            ids = [cfg.bos_token_id] + ids
        out.append((name, ids))
    return out


def config_hash(model_dir: Path) -> str:
    from jaxmoe.config import CONFIG_FILE

    return hashlib.sha256((Path(model_dir) / CONFIG_FILE).read_bytes()).hexdigest()


def model_identity(model_dir: Path, cfg) -> dict:
    model_dir = Path(model_dir).resolve()
    return {
        "name": model_dir.name,
        "model_dir": str(model_dir),
        "family": cfg.family,
        "num_layers": cfg.num_layers,
        "moe_layer_ids": list(cfg.moe_layer_ids),
        "num_moe_layers": len(cfg.moe_layer_ids),
        "num_experts": cfg.num_experts,
        "top_k": cfg.num_experts_per_tok,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "config_sha256": config_hash(model_dir),
    }


# -- the jitted steps ---------------------------------------------------------------------------------
def _pack(routing) -> dict:
    """Per-layer routing list (None for dense layers) -> arrays over [tokens, MoE layers, ...]."""
    moe = [r for r in routing if r is not None]
    import jax.numpy as jnp

    hidden = jnp.stack([r["hidden"] for r in moe], 1).astype(jnp.float32)
    return {
        "hidden": jnp.clip(hidden, -F16_MAX, F16_MAX).astype(jnp.float16),
        "router_logits": jnp.stack([r["router_logits"] for r in moe], 1).astype(jnp.float32),
        "expert_ids": jnp.stack([r["expert_ids"] for r in moe], 1).astype(jnp.int16),
        "expert_weights": jnp.stack([r["expert_weights"] for r in moe], 1).astype(jnp.float32),
    }


def _make_steps():
    import jax
    import jax.numpy as jnp

    @partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
    def prefill(graphdef, state, cache, tokens, length):
        """tokens int32[1, T] (right-padded after `length` real tokens) -> (cache, routing arrays over the T
        positions). Padding gets position -1, so running states (Gated DeltaNet) skip it."""
        from jaxmoe.attention import padded_positions

        model = graphdef.merge(state)
        positions = padded_positions(length, tokens.shape[1])[None, :]
        _, cache, routing = model.hidden_states(tokens, positions, cache)
        return cache, _pack(routing)

    @partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
    def decode(graphdef, state, cache, tokens, position):
        """tokens: int32[S] (the document, padded); position: int32[] -> (cache, routing of tokens[position])."""
        model = graphdef.merge(state)
        token = jax.lax.dynamic_slice_in_dim(tokens, position, 1)
        _, cache, routing = model.hidden_states(token.reshape(1, 1), position.reshape(1, 1), cache)
        return cache, _pack(routing)

    return prefill, decode


_STEPS = None


def _steps():
    global _STEPS
    if _STEPS is None:
        _STEPS = _make_steps()
    return _STEPS


class Tracer:
    """Runs documents through a loaded model as the runtime does and returns their routing arrays."""

    def __init__(self, model_dir: Path, dtype=None, prefill_tokens: int = 32):
        from flax import nnx

        from jaxmoe.checkpoint import load_resident
        from jaxmoe.engine import flat_state

        if prefill_tokens < 1:
            raise JaxmoeError("--prefill-tokens must be >= 1")
        self.model_dir = Path(model_dir)
        self.cfg, graphdef, state = load_resident(self.model_dir, dtype=dtype)
        self.model = nnx.merge(graphdef, state)
        self.static, self.leaves = flat_state(graphdef, state)
        self.prefill_tokens = prefill_tokens

    def run(self, tokens: list[int], cache_len: int, on_tokens=None) -> dict:
        """One document -> {hidden, router_logits, expert_ids, expert_weights} over its tokens."""
        import jax
        import jax.numpy as jnp

        from jaxmoe.engine import bucket_length

        prefill, decode = _steps()
        n = len(tokens)
        p = min(self.prefill_tokens, n)
        padded = np.zeros((1, bucket_length(p)), np.int32)
        padded[0, :p] = tokens[:p]
        cache = self.model.init_cache(1, cache_len)
        cache, first = prefill(self.static, self.leaves, cache, jnp.asarray(padded), np.int32(p))
        parts = [jax.tree.map(lambda a: a[:p], first)]
        doc = np.zeros(cache_len, np.int32)
        doc[:n] = tokens
        doc = jnp.asarray(doc)
        for t in range(p, n):  # teacher-forced decode; results stay on the device until the document ends
            cache, step = decode(self.static, self.leaves, cache, doc, np.int32(t))
            parts.append(step)
            if on_tokens is not None and (t - p) % 64 == 63:
                on_tokens(64)
        parts = jax.device_get(parts)
        if on_tokens is not None:
            on_tokens((n - p) % 64 + p)
        return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}


# -- writing a trace ------------------------------------------------------------------------------------
def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise JaxmoeError(f"--out {out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise JaxmoeError(f"--out {out_dir}: exists and is not empty; pass --force to replace it")


def trace_documents(model_dir, docs, out_dir, *, prefill_tokens: int = 32, max_tokens_per_doc: int = 512,
                    validation_fraction: float = 0.2, seed: int = 0, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                    force: bool = False, dtype=None, progress: bool = True, source: str | None = None) -> dict:
    """Traces `docs` [(name, token ids)] through the converted model at `model_dir` into `out_dir`.

    Documents are truncated to `max_tokens_per_doc` tokens; empty ones are skipped. Returns the manifest.
    """
    from jaxmoe.config import load_config
    from jaxmoe.engine import bucket_length

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if max_tokens_per_doc < 1:
        raise JaxmoeError("--max-tokens-per-doc must be >= 1")
    if not 0 <= validation_fraction <= 1:
        raise JaxmoeError("--validation-fraction must be in [0, 1]")
    if shard_tokens < 1:
        raise JaxmoeError("shard_tokens must be >= 1")
    _check_out_dir(out_dir, force)
    cfg = load_config(model_dir)
    names = [name for name, _ in docs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise JaxmoeError(f"duplicate document names {dup[:3]}")
    docs = [(name, [int(t) for t in ids[:max_tokens_per_doc]]) for name, ids in docs]
    for name, ids in docs:
        if any(not 0 <= t < cfg.vocab_size for t in ids):
            raise JaxmoeError(f"document {name}: token ids must be in [0, {cfg.vocab_size})")
    skipped = [name for name, ids in docs if not ids]
    docs = [(name, ids) for name, ids in docs if ids]
    if not docs:
        raise JaxmoeError("no non-empty documents to trace")
    longest = max(len(ids) for _, ids in docs)
    if longest > cfg.max_position_embeddings:
        raise JaxmoeError(f"documents of {longest} tokens exceed the model's {cfg.max_position_embeddings} "
                          f"positions; lower --max-tokens-per-doc")
    splits = assign_splits([name for name, _ in docs], seed, validation_fraction)

    from tqdm import tqdm

    tracer = Tracer(model_dir, dtype=dtype, prefill_tokens=prefill_tokens)
    cache_len = bucket_length(longest)  # one cache size for every document: no recompiles
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        documents, shards, buffer, buffered, total = {}, [], [], 0, 0
        doc_bar = tqdm(total=len(docs), desc="tracing documents", unit="doc", disable=not progress, file=sys.stderr)
        tok_bar = tqdm(total=sum(len(ids) for _, ids in docs), desc="tokens", unit="tok", disable=not progress,
                       file=sys.stderr, leave=False)

        def flush():
            nonlocal buffer, buffered
            if buffer:
                arrays = {k: np.concatenate([b[k] for b in buffer]) for k in buffer[0]}
                shards.append(write_shard(tmp, len(shards), arrays))
            buffer, buffered = [], 0

        for doc_id, (name, ids) in enumerate(docs):
            routing = tracer.run(ids, cache_len, on_tokens=tok_bar.update)
            n = len(ids)
            routing.update(doc_id=np.full(n, doc_id, np.int32), position=np.arange(n, dtype=np.int32),
                           token=np.asarray(ids, np.int32))
            buffer.append(routing)
            buffered += n
            total += n
            documents[str(doc_id)] = {"name": name, "split": splits[name], "tokens": n}
            doc_bar.update(1)
            if buffered >= shard_tokens:
                flush()
        flush()
        tok_bar.close()
        doc_bar.close()
        manifest = {
            "model": {**model_identity(model_dir, tracer.cfg), "dtype": str(tracer.model.embed.embedding[...].dtype)},
            "trace": {"prefill_tokens": prefill_tokens, "max_tokens_per_doc": max_tokens_per_doc,
                      "validation_fraction": validation_fraction, "seed": seed, "shard_tokens": shard_tokens,
                      "cache_len": cache_len, "source": source, "skipped_empty_documents": skipped},
            "shards": shards,
            "documents": documents,
            "num_tokens": total,
        }
        write_manifest(tmp, manifest)
        if out_dir.exists():  # --force (checked above); move the old trace aside first, then drop it
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"format": 1, **manifest}


# -- CLI --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m predictors.trace",
                                description="Record expert-routing traces of a converted MoE model.")
    p.add_argument("--model", type=Path, default=None, help="converted model directory (default: the default model)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--texts", type=Path, nargs="+", metavar="FILE", help="UTF-8 text files, one document each")
    src.add_argument("--stdlib", type=int, metavar="N", help="trace N Python files of CPython's standard library")
    p.add_argument("--out", type=Path, required=True, help="trace directory to create")
    p.add_argument("--max-tokens-per-doc", type=int, default=512)
    p.add_argument("--prefill-tokens", type=int, default=32, help="tokens of each document run as one prefill")
    p.add_argument("--validation-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0, help="seed of the split (and of the --stdlib selection)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="about this many tokens per shard")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None, help="compute/param dtype override")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --out directory")
    return p


def run(args) -> int:
    from jaxmoe import load_tokenizer
    from jaxmoe.config import load_config

    _check_out_dir(args.out, args.force)  # before the (slow) tokenizer and model load
    if args.model is None:
        try:
            from jaxmoe.default_model import default_model_dir
        except ImportError:
            raise JaxmoeError("--model is required (no default model in this install)") from None
        model_dir = Path(default_model_dir())
    else:
        model_dir = args.model
    if not Path(model_dir).is_dir():
        raise JaxmoeError(f"--model {model_dir}: no such directory")
    cfg = load_config(model_dir)
    tokenizer = load_tokenizer(model_dir)
    if tokenizer is None:
        raise JaxmoeError(f"{model_dir}: the model has no tokenizer files; use predictors.trace.trace_documents "
                          f"with token ids")
    if args.stdlib is not None:
        texts, source = stdlib_files(args.stdlib, args.seed), f"stdlib:{args.stdlib}"
    else:
        texts, source = read_texts(args.texts), "texts"
    docs = tokenize(tokenizer, cfg, texts)
    manifest = trace_documents(model_dir, docs, args.out, prefill_tokens=args.prefill_tokens,
                               max_tokens_per_doc=args.max_tokens_per_doc,
                               validation_fraction=args.validation_fraction, seed=args.seed,
                               shard_tokens=args.shard_tokens, force=args.force, dtype=args.dtype, source=source)
    split_tokens = {"train": 0, "validation": 0}
    for info in manifest["documents"].values():
        split_tokens[info["split"]] += info["tokens"]
    print(f"wrote {args.out}: {len(manifest['documents'])} documents, {manifest['num_tokens']} tokens "
          f"(train {split_tokens['train']}, validation {split_tokens['validation']}) in {len(manifest['shards'])} "
          f"shard(s); {MANIFEST} lists them")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from jaxmoe import compile_cache

    compile_cache.enable()
    return run_cli(run, args)


if __name__ == "__main__":
    sys.exit(main())
