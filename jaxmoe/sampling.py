"""Next-token selection: greedy, or temperature sampling with optional top-k / top-p (nucleus)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


@partial(jax.jit, static_argnames=("greedy", "top_k", "top_p"))
def sample_tokens(logits, key, step, temperature, greedy: bool, top_k: int = 0, top_p: float = 1.0):
    """logits: float32[B, V]; key: the request's PRNG key; step: int (the token index, folded into
    the key); temperature: float32 scalar -> int32[B].

    top_k = 0 disables the top-k filter; top_p = 1.0 disables the nucleus filter.
    """
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    key = jax.random.fold_in(key, step)
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of strictly better tokens
        keep_sorted = mass_before < top_p  # always keeps the best token
        cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
