"""Generation engines and the decode loop they share.

`ResidentEngine` keeps every weight on the device and runs one jitted prefill and one jitted decode
step over the functional (`nnx.split`) state; prompts are right-padded to power-of-two buckets and
the KV cache is donated, so decode never recompiles. The offloading engine (jaxmoe.offload) plugs
into the same `generate_loop`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe.attention import padded_positions
from jaxmoe.config import ModelConfig
from jaxmoe.errors import JaxmoeError
from jaxmoe.sampling import sample_tokens

MIN_BUCKET = 16

# XLA compilation of jitted programs (or their loading from the persistent cache, jaxmoe.compile_cache),
# from JAX's monitoring events; `generate_loop` reports a run's share as compile_s. Tracing and lowering
# to MLIR are not counted (a jit traced inside another's trace reports its time within the outer one's);
# on the default model they take ~1 s of a first run and of every later one (the cache skips neither).
COMPILE_EVENTS = frozenset({"/jax/core/compile/backend_compile_duration"})
_compile_seconds = [0.0]  # process-wide: concurrent generations in one process see each other's


def _count_compile(event: str, duration: float, **_) -> None:
    if event in COMPILE_EVENTS:
        _compile_seconds[0] += duration


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def compile_seconds() -> float:
    """Seconds this process has spent compiling jitted programs (or loading them from the cache) so far."""
    return _compile_seconds[0]


class StaticGraph:
    """A GraphDef (and optionally the treedef of its state) for `jax.jit` static arguments, hashed once.

    Hashing an NNX GraphDef walks the whole module graph and flattening an `nnx.State` runs Python
    code; jit does both on every call, which costs more than a decode layer's dispatch. So hot paths
    pass the state as a flat tuple of arrays (`flat_state`) with this object static; `merge` rebuilds
    the module inside the trace. Equal graphs (every MoE layer's) compare equal: one compilation.
    """

    __slots__ = ("graphdef", "treedef", "_hash")

    def __init__(self, graphdef, treedef=None):
        self.graphdef, self.treedef = graphdef, treedef
        self._hash = hash((graphdef, treedef))

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return isinstance(other, StaticGraph) and (self is other or (
            self._hash == other._hash and self.graphdef == other.graphdef and self.treedef == other.treedef))

    def merge(self, leaves):
        """Inside a trace: the module from the flat state leaves."""
        state = jax.tree.unflatten(self.treedef, leaves)
        return nnx.merge(self.graphdef, *state) if isinstance(state, tuple) else nnx.merge(self.graphdef, state)


_INTERNED: dict = {}


def flat_state(graphdef, *states) -> tuple[StaticGraph, tuple]:
    """(static graph + treedef, flat tuple of state arrays) for the hot-path jitted functions.
    Equal graphs are interned to one object, so jit's cache lookups compare by identity."""
    tree = states if len(states) > 1 else states[0]
    leaves, treedef = jax.tree.flatten(tree)
    static = StaticGraph(graphdef, treedef)
    return _INTERNED.setdefault(static, static), tuple(leaves)


def bucket_length(n: int) -> int:
    """Smallest power of two >= max(n, MIN_BUCKET): the padded length prompts and caches use."""
    return max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())


def cache_length(prompt_len: int, max_new_tokens: int) -> int:
    """Positions of the KV cache a generation allocates: every jitted program's shapes depend on it."""
    return bucket_length(max(bucket_length(prompt_len), prompt_len + max_new_tokens))


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    generated_ids: list[int]
    stats: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise JaxmoeError("--temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise JaxmoeError("--top-p must be in (0, 1]")
        if self.top_k < 0:
            raise JaxmoeError("--top-k must be >= 0")


class StepRunner(Protocol):
    """What an engine provides to `generate_loop` (batch of one sequence)."""

    def start(self, max_len: int, max_new_tokens: int | None = None) -> None: ...
    def prefill(self, tokens: np.ndarray, length: int) -> jax.Array: ...  # int32[1, bucket] -> float32[1, V]
    def decode(self, token: jax.Array, position: int) -> jax.Array: ...  # int32[1] -> float32[1, V]
    def stats(self) -> dict: ...


def check_max_new_tokens(max_new_tokens: int) -> None:
    """`generate_loop`'s check of the token budget, callable before a model is loaded (the CLI)."""
    if max_new_tokens < 1:
        raise JaxmoeError("--max-new-tokens must be >= 1")


def generate_loop(runner: StepRunner, cfg: ModelConfig, prompt_ids, max_new_tokens: int, sampling: SamplingParams,
                  on_token: Callable[[int], None] | None = None) -> GenerationResult:
    """Prefill, then decode up to `max_new_tokens` tokens (stopping after an EOS token)."""
    prompt_ids = [int(t) for t in prompt_ids]
    if not prompt_ids:
        raise JaxmoeError("the prompt is empty")
    if any(not 0 <= t < cfg.vocab_size for t in prompt_ids):
        raise JaxmoeError(f"prompt token ids must be in [0, {cfg.vocab_size})")
    check_max_new_tokens(max_new_tokens)
    n = len(prompt_ids)
    padded_len = bucket_length(n)
    runner.start(cache_length(n, max_new_tokens), max_new_tokens)
    tokens = np.zeros((1, padded_len), np.int32)
    tokens[0, :n] = prompt_ids
    key = jax.random.key(sampling.seed)
    greedy = sampling.temperature == 0
    temperature = jnp.float32(max(sampling.temperature, 1e-6))

    def pick(logits, step):
        return sample_tokens(logits, key, step, temperature, greedy, sampling.top_k, sampling.top_p)

    compile0 = compile_seconds()
    t0 = time.perf_counter()
    token = pick(runner.prefill(tokens, n), 0)
    generated = [host_token(token)]
    ttft = time.perf_counter() - t0
    ttft_compile = compile_seconds() - compile0
    if on_token:
        on_token(generated[-1])
    t1, cpu1 = time.perf_counter(), time.thread_time()
    for step in range(1, max_new_tokens):
        if generated[-1] in cfg.eos_token_ids:
            break
        token = pick(runner.decode(token, n + step - 1), step)
        generated.append(host_token(token))
        if on_token:
            on_token(generated[-1])
    decode_s = time.perf_counter() - t1
    decode_cpu_s = time.thread_time() - cpu1
    decoded = len(generated) - 1
    stats = {
        "prompt_tokens": n,
        "generated_tokens": len(generated),
        "ttft_s": ttft,
        "prefill_tokens_per_s": n / ttft,
        "decode_tokens_per_s": decoded / decode_s if decoded else 0.0,
        "decode_s": decode_s,
        # CPU time of the thread that ran the decode loop (dispatch, host bookkeeping, planning; not the
        # time it waited): with decode_s, how busy the host kept it
        "decode_main_cpu_s": decode_cpu_s,
        # XLA compilation inside this run (first runs of new shapes; loading from the persistent cache
        # otherwise): TTFT and decode tok/s of a first run include it
        "compile_s": compile_seconds() - compile0,
        "ttft_compile_s": ttft_compile,
    }
    stats.update(runner.stats())
    return GenerationResult(prompt_ids, generated, stats)


def host_token(token: jax.Array) -> int:
    """The sampled token (int32[1]) on the host: one device-to-host copy (`int(token[0])` dispatches an
    indexing op first: ~115 against ~2 us per decode step on CPU)."""
    return int(np.asarray(token)[0])


@partial(jax.jit, static_argnames=("shape",))
def position_array(position, shape=(1,)):
    """A decode step's position as an int32 device array of `shape`, built by one jitted call (~9 us on
    CPU, where `jnp.array` of a host list costs ~100 us per decode step and `jax.device_put` of a numpy
    array ~110). position: traced, so every value shares one compiled program."""
    return jnp.full(shape, position, jnp.int32)


@partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def prefill_step(graphdef, state, cache, tokens, lengths):
    """tokens: int32[B, T] right-padded; lengths: int32[B] -> (logits of each last real token [B, V], cache).
    Padding tokens get position -1 (`jaxmoe.attention.padded_positions`), so running states skip them."""
    model = graphdef.merge(state)
    b, t = tokens.shape
    positions = jax.vmap(lambda n: padded_positions(n, t))(lengths)  # [B, T]
    h, cache, _ = model.hidden_states(tokens, positions, cache)
    last = h[jnp.arange(b), lengths - 1]  # [B, d]
    return model.logits(last), cache


@partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def decode_step(graphdef, state, cache, tokens, positions):
    """tokens, positions: int32[B] -> (logits float32[B, V], cache)."""
    model = graphdef.merge(state)
    h, cache, _ = model.hidden_states(tokens[:, None], positions[:, None], cache)
    return model.logits(h[:, 0]), cache


def tree_bytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def device_peak_bytes(fallback: int) -> int:
    """Peak bytes in use on the default device where the backend reports it (GPU), else `fallback`."""
    stats = jax.devices()[0].memory_stats() or {}
    return int(stats.get("peak_bytes_in_use", fallback))


class ResidentEngine:
    """All weights on the device: the reference every offloaded configuration must reproduce."""

    policy = "resident"
    quantize_experts = None  # "int8" / "int4": its routed experts are dequantized quantized weights (`jaxmoe.load`)

    def __init__(self, cfg: ModelConfig, graphdef, state, tokenizer=None):
        self.cfg, self.state, self.tokenizer = cfg, state, tokenizer
        self._model = nnx.merge(graphdef, state)
        self._static, self._leaves = flat_state(graphdef, state)
        self._cache = None

    def start(self, max_len: int, max_new_tokens: int | None = None) -> None:
        self._cache = self._model.init_cache(1, max_len)

    def prefill(self, tokens, length):
        logits, self._cache = prefill_step(self._static, self._leaves, self._cache, jnp.asarray(tokens), jnp.array([length], jnp.int32))
        return logits

    def decode(self, token, position):
        logits, self._cache = decode_step(self._static, self._leaves, self._cache, token, position_array(position))
        return logits

    def stats(self) -> dict:
        weights = tree_bytes(self.state)
        return {
            "policy": self.policy,
            "quantize_experts": self.quantize_experts,
            "hit_rate": 1.0,
            "h2d_bytes": 0,
            "stall_s": 0.0,
            "cache_slots": self.cfg.num_experts * len(self.cfg.moe_layer_ids),
            "peak_device_bytes": device_peak_bytes(weights + tree_bytes(self._cache)),
        }

    def generate(self, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int = 0, on_token=None) -> GenerationResult:
        sampling = SamplingParams(temperature, top_p, top_k, seed)
        return generate_loop(self, self.cfg, prompt_ids, max_new_tokens, sampling, on_token)
