"""The persistent compilation cache of jaxmoe's commands: compiled XLA programs kept on disk between runs.

Without it every run recompiles each jitted piece of the engine (attention + router, expert kernels,
slot writes, sampling): on the 2-core CPU VM the default model's TTFT is 5-6 s, nearly all of it
compilation, on every `python -m jaxmoe.generate`. With it a second run looks the programs up instead
and reaches its first token in 0.8 s (tracing and lowering remain); filling it costs the first run
about 0.1 s.

Where: `$JAXMOE_COMPILE_CACHE`, else `<jaxmoe cache>/xla` (`jaxmoe.default_model.cache_root`, i.e.
`$JAXMOE_CACHE` or ~/.cache/jaxmoe). `JAXMOE_COMPILE_CACHE=off` disables it. A cache directory the
user configured for JAX itself (`JAX_COMPILATION_CACHE_DIR` / `jax_compilation_cache_dir`) wins.
JAX keys each entry by the program, the backend, the flags and the JAX version, so a stale entry is
never used; an entry caught half-written by a concurrent run is reported (a warning) and recompiled.
The directory is not size-bounded (JAX's bound rescans every entry on each write: the test suite's
~1,800 entries made it crawl); entries are added only for new programs (a new model, shape or
version), tens of KB each on CPU. Delete the directory to clear it.

The commands (`jaxmoe.generate`, `bench`, `predictors.trace`) enable it; `jaxmoe.load` does not touch JAX's global
configuration, so library users call `enable()` themselves if they want it.
May import jax and `jaxmoe.default_model`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "JAXMOE_COMPILE_CACHE"
OFF = ("off", "0", "false", "no", "none")
MIN_COMPILE_S = 0.0  # cache every program: dozens of small ones add up to seconds of TTFT on CPU


def cache_dir() -> Path | None:
    """The directory jaxmoe's commands keep compiled programs in, or None when disabled."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in OFF:
        return None
    if value:
        return Path(value).expanduser()
    from jaxmoe.default_model import cache_root

    return cache_root() / "xla"


def enable() -> Path | None:
    """Turns on JAX's persistent compilation cache at `cache_dir()` -> the directory in use (the user's
    own JAX setting if there is one), or None when disabled or the directory cannot be created (a
    warning; the command still runs, compiling as usual)."""
    import jax

    configured = jax.config.jax_compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if configured:
        return Path(configured)
    target = cache_dir()
    if target is None:
        return None
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"warning: {ENV}: cannot create {target} ({e.strerror}); compiling without a persistent cache",
              file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", str(target))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
    return target
