"""Train the embedded default model: a small Qwen3-MoE-style LM on CPython's own sources and docs.

    python -m jaxmoe.train --out DIR [--minutes M | --steps N] [--seed S] [--layers 8 --experts 32 --top-k 4 ...]

Data every machine has: the standard library's .py files and pydoc_data's topic texts, split by
document (hash of the relative path) into train / held-out. A byte-level BPE tokenizer is trained on
the train split with `tokenizers`. The model is `jaxmoe.model.MoEModel` trained in float32 with optax
AdamW (warmup + cosine), cross-entropy plus the Switch-Transformer load-balancing loss
(E * sum_e f_e * P_e per MoE layer, averaged), experts computed with the capacity kernel (training
only). At the end the model is exported as a Hugging Face checkpoint (bf16 safetensors in the Hub's
key layout + config.json + tokenizer) with train_report.json. Seeded: the same command gives the
same data, tokenizer, initialisation and batch order (floating-point reductions on a different
machine may differ slightly).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from jaxmoe.config import ModelConfig
from jaxmoe.errors import JaxmoeError, run_cli
from jaxmoe.model import MoEModel

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>"]
PAD, BOS, EOS = 0, 1, 2
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3", "turtledemo"}


def stdlib_documents() -> list[tuple[str, str]]:
    """(name, text) for every standard-library .py file outside tests, plus every pydoc topic."""
    root = Path(os.__file__).parent
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS & set(rel.parts[:-1]):
            continue
        try:
            docs.append((f"stdlib/{rel}", path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    from pydoc_data.topics import topics

    docs += [(f"pydoc/{name}", text) for name, text in sorted(topics.items())]
    return docs


def is_held_out(name: str, fraction: float = 0.05) -> bool:
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:4], "little") / 2**32 < fraction


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # encode(text, add_special_tokens=True) (what transformers' tokenizer(text) runs) adds the BOS every
    # training document starts with
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                      special_tokens=[("<|bos|>", BOS)]),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=True,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")
    fast.save_pretrained(out_dir)
    return fast


def pack(token_lists: list[list[int]], seq_len: int) -> np.ndarray:
    """Documents as BOS + tokens + EOS, concatenated and cut into rows of seq_len + 1 tokens."""
    stream = np.concatenate([np.asarray([BOS] + t + [EOS], np.int32) for t in token_lists])
    rows = len(stream) // (seq_len + 1)
    return stream[: rows * (seq_len + 1)].reshape(rows, seq_len + 1)


def load_balance_loss(routing: list, num_experts: int):
    """Switch loss E * sum_e f_e P_e averaged over MoE layers (1.0 when perfectly balanced)."""
    losses = []
    for r in routing:
        if r is None:
            continue
        probs = jax.nn.softmax(r["router_logits"], axis=-1).mean(0)  # [E]
        counts = jax.nn.one_hot(r["expert_ids"], num_experts).sum((0, 1))
        losses.append(num_experts * jnp.sum(counts / counts.sum() * probs))
    return jnp.mean(jnp.stack(losses))


def make_steps(graphdef, optimizer, aux_coef: float, num_experts: int, seq_len: int):
    def loss_fn(params, batch, kernel):
        model = nnx.merge(graphdef, params)
        b = batch.shape[0]
        positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (b, seq_len))
        logits, _, routing = model(batch[:, :-1], positions, model.init_cache(b, seq_len, jnp.float32), kernel=kernel)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
        aux = load_balance_loss(routing, num_experts)
        return ce + aux_coef * aux, (ce, aux)

    @jax.jit
    def train_step(params, opt_state, batch):
        (_, (ce, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, "capacity")
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, ce, aux

    @jax.jit
    def eval_step(params, batch):
        return loss_fn(params, batch, "reference")[1][0]  # exact: no token dropped (dense over experts)

    return train_step, eval_step


def default_model_config(args, vocab_size: int) -> ModelConfig:
    return ModelConfig(
        family="qwen3_moe", vocab_size=vocab_size, hidden_size=args.hidden, num_layers=args.layers,
        num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.head_dim, rms_norm_eps=1e-6,
        rope_theta=10000.0, max_position_embeddings=2048, moe_layers=(True,) * args.layers,
        num_experts=args.experts, num_experts_per_tok=args.top_k, moe_intermediate_size=args.expert_size,
        qk_norm="head", norm_topk_prob=True, tie_word_embeddings=False, bos_token_id=BOS, eos_token_ids=(EOS,),
        dtype="float32")


def evaluate(eval_step, params, rows: np.ndarray, batch_size: int) -> float:
    losses = [float(eval_step(params, jnp.asarray(rows[i : i + batch_size])))
              for i in range(0, len(rows) - batch_size + 1, batch_size)]
    return float(np.mean(losses))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxmoe.train", description="Train the default jaxmoe model.")
    p.add_argument("--out", type=Path, required=True, help="output Hugging Face checkpoint directory (must not exist)")
    p.add_argument("--minutes", type=float, default=25.0, help="training time budget (the step count adapts)")
    p.add_argument("--steps", type=int, default=None, help="fixed number of steps (overrides --minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--expert-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--aux-coef", type=float, default=0.01)
    p.add_argument("--max-docs", type=int, default=None, help="use only this many documents (smoke runs)")
    args = p.parse_args(argv)
    return run_cli(run, args)


def run(args) -> int:
    from convert.export import export_hf

    out = Path(os.path.abspath(args.out))
    if out.exists():
        raise JaxmoeError(f"--out {out}: already exists; not overwriting it")
    t_start = time.time()
    rng = np.random.default_rng(args.seed)
    docs = stdlib_documents()
    if args.max_docs:
        docs = [docs[i] for i in sorted(rng.choice(len(docs), args.max_docs, replace=False))]
    train_docs = [d for d in docs if not is_held_out(d[0])]
    held_docs = [d for d in docs if is_held_out(d[0])] or [train_docs.pop()]  # tiny runs: keep one held out
    print(f"documents: {len(train_docs)} train, {len(held_docs)} held-out", file=sys.stderr)
    work = out.parent / f".{out.name}.training-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer = train_tokenizer([t for _, t in train_docs], args.vocab, work / "tokenizer")
        encode = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
        train_rows = pack(encode([t for _, t in train_docs]), args.seq_len)
        held_rows = pack(encode([t for _, t in held_docs]), args.seq_len)
        rng.shuffle(train_rows)
        held_rows = held_rows[: 4 * args.batch]
        print(f"tokens: {train_rows.size} train, {held_rows.size} held-out (rows of {args.seq_len + 1})", file=sys.stderr)

        cfg = default_model_config(args, len(tokenizer))
        model = MoEModel(cfg, nnx.Rngs(args.seed))
        graphdef, params = nnx.split(model)
        num_params = sum(x.size for x in jax.tree.leaves(params))
        steps_guess = args.steps or 100_000
        schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(200, steps_guess // 10), steps_guess, args.lr / 10)
        optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.95, weight_decay=0.05))
        opt_state = optimizer.init(params)
        train_step, eval_step = make_steps(graphdef, optimizer, args.aux_coef, cfg.num_experts, args.seq_len)

        # time-budgeted runs: measure a few steps, then fix the schedule length to fit the budget
        if args.steps is None:
            batch = jnp.asarray(train_rows[: args.batch])
            jax.block_until_ready(train_step(params, opt_state, batch))  # compile (result discarded)
            t0 = time.time()
            for _ in range(2):
                jax.block_until_ready(train_step(params, opt_state, batch))
            per_step = (time.time() - t0) / 2
            total_steps = max(10, int(args.minutes * 60 * 0.9 / per_step))
            print(f"{per_step:.2f} s/step -> {total_steps} steps in {args.minutes} min", file=sys.stderr)
        else:
            total_steps = args.steps
        schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, min(200, total_steps // 10)), total_steps, args.lr / 10)
        optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.95, weight_decay=0.05))
        opt_state = optimizer.init(params)
        train_step, eval_step = make_steps(graphdef, optimizer, args.aux_coef, cfg.num_experts, args.seq_len)

        curve = []
        bar = tqdm(range(total_steps), desc="training", unit="step")
        ce_avg = None
        for step in bar:
            i = (step * args.batch) % (len(train_rows) - args.batch)
            params, opt_state, ce, aux = train_step(params, opt_state, jnp.asarray(train_rows[i : i + args.batch]))
            if step % 20 == 0 or step == total_steps - 1:
                ce_f = float(ce)
                ce_avg = ce_f if ce_avg is None else 0.8 * ce_avg + 0.2 * ce_f
                bar.set_postfix(loss=f"{ce_avg:.3f}", aux=f"{float(aux):.3f}")
            if (step + 1) % max(1, total_steps // 5) == 0 or step == total_steps - 1:
                held = evaluate(eval_step, params, held_rows, args.batch)
                curve.append({"step": step + 1, "train_loss": ce_avg, "held_out_loss": held})
                tqdm.write(f"step {step + 1}: train loss {ce_avg:.3f}, held-out loss {held:.3f} (ppl {math.exp(held):.1f})")
        held = curve[-1]["held_out_loss"]

        # expert load on held-out text
        model = nnx.merge(graphdef, params)
        sample = jnp.asarray(held_rows[: args.batch, :-1])
        pos = jnp.broadcast_to(jnp.arange(args.seq_len, dtype=jnp.int32), sample.shape)
        _, _, routing = model(sample, pos, model.init_cache(sample.shape[0], args.seq_len, jnp.float32))
        load = [np.bincount(np.asarray(r["expert_ids"]).ravel(), minlength=cfg.num_experts) for r in routing]
        load_stats = [{"max_over_mean": float(c.max() / c.mean()), "unused": int((c == 0).sum())} for c in load]
        report = {
            "command": "python -m jaxmoe.train " + " ".join(sys.argv[1:]),
            "seed": args.seed, "steps": total_steps, "tokens_seen": total_steps * args.batch * args.seq_len,
            "wall_s": time.time() - t_start, "parameters": int(num_params),
            "train_loss": curve[-1]["train_loss"], "held_out_loss": held, "held_out_perplexity": math.exp(held),
            "curve": curve, "expert_load_held_out": load_stats,
            "documents": {"train": len(train_docs), "held_out": len(held_docs)},
            "config": cfg.to_json(),
        }
        export_hf(cfg, params.to_pure_dict(), out, tokenizer_dir=work / "tokenizer",
                  extra_files={"train_report.json": json.dumps(report, indent=2) + "\n"})
        print(f"held-out loss {held:.3f} (perplexity {math.exp(held):.1f}); exported to {out}", file=sys.stderr)
        for layer, s in enumerate(load_stats):
            print(f"layer {layer}: expert load max/mean {s['max_over_mean']:.2f}, unused experts {s['unused']}", file=sys.stderr)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
