"""`python -m bench SUBCOMMAND [ARGS]`: one entry point for the benchmarks.

    python -m bench sizes ...        real model shapes, synthetic weights, replayed routing (bench.sizes)
    python -m bench policies ...     every policy x cache size on a converted model (bench.policies)
    python -m bench replay ...       scheduling quality of every policy in virtual time, no noise (bench.replay)
    python -m bench predictor-cost   a predictor's cost per layer, on the host and fused (bench.predictor_cost)
    python -m bench host-overhead    the engine's host work per MoE layer where compute is negligible (bench.host_overhead)
    python -m bench convert-rss ...  peak memory of the converter on a multi-GB checkpoint (bench.convert_rss)
    python -m bench quant-quality    quantized experts against the unquantized model: KL, top-1, loss (bench.quant_quality)

`python -m bench SUBCOMMAND --help` lists each one's flags.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {"sizes": "bench.sizes", "policies": "bench.policies", "replay": "bench.replay",
               "predictor-cost": "bench.predictor_cost", "host-overhead": "bench.host_overhead",
               "convert-rss": "bench.convert_rss", "quant-quality": "bench.quant_quality"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"error: python -m bench: unknown subcommand {name!r}; available: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    from jaxmoe import compile_cache

    compile_cache.enable()  # compiled programs kept between runs (warm-ups are excluded from every figure anyway)
    module = importlib.import_module(SUBCOMMANDS[name])
    sys.argv = [f"python -m bench {name}", *rest]
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
