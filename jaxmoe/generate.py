"""CLI: python -m jaxmoe.generate [--model DIR] [--prompt TEXT | --prompt-file F] [--chat [--system S]] ...

Streams the generated text to stdout (a plain prompt with its continuation; with --chat, the reply to the
prompt sent through the model's chat template), then prints one summary line on stderr. With no --model it runs
the embedded default model on a default code prompt. Bad input: one `error: ...` line, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from jaxmoe.errors import JaxmoeError, run_cli
from jaxmoe.expert_quant import QUANTIZE_MODES
from jaxmoe.prompt import chat_messages, prompt_ids, render_chat
from scheduler.speculation import MODES as SPECULATION_MODES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxmoe.generate", description="Generate text with a converted MoE model.")
    p.add_argument("--model", type=Path, default=None, help="converted model directory (default: the embedded default model)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="prompt text")
    src.add_argument("--prompt-file", type=Path, default=None, help="file holding the prompt (UTF-8)")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the model's chat template (instruct models)")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--cache-slots", type=int, default=None, help="device expert slots (offloaded run)")
    budget.add_argument("--expert-cache-gb", type=float, default=None, help="device GB for the expert cache (offloaded run)")
    p.add_argument("--policy", default="on-demand",
                   help="expert cache policy: on-demand (LRU), lfu, prefetch, presched, adaptive, oracle, or resident "
                        "(every weight on the device)")
    p.add_argument("--predictor", default=None, help="predictor driving prefetch policies")
    p.add_argument("--fuse-predictor", choices=("auto", "on", "off"), default="auto",
                   help="run the predictor inside each MoE layer's jitted program (auto: on accelerators, not on CPU)")
    p.add_argument("--speculate", choices=SPECULATION_MODES, default=None,
                   help="run a decode step as one program when its experts are cached, layer by layer from a miss "
                        "(auto, the default: where measured faster)")
    p.add_argument("--emulate-link", default=None, metavar="GBPS[,LATENCY_US]", help="emulate a host-to-device link")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None, help="compute/param dtype override")
    p.add_argument("--quantize-experts", choices=QUANTIZE_MODES, default=None,
                   help="routed experts as int8 (0.5x the bytes of bfloat16) or int4 (0.28x) codes with float32 scales, "
                        "or mxfp4 (0.27x; lossless for gpt-oss converted from its MXFP4 checkpoint): fewer bytes to "
                        "move and to cache (outputs differ from the unquantized model's by the quantization error)")
    p.add_argument("--output-json", type=Path, default=None, help="write prompt ids, generated ids, text and stats here")
    return p


def summary_line(stats: dict) -> str:
    return (
        f"prefill {stats['prefill_tokens_per_s']:.1f} tok/s | decode {stats['decode_tokens_per_s']:.2f} tok/s | "
        f"TTFT {stats['ttft_s'] * 1000:.0f} ms | hit rate {stats['hit_rate']:.3f} | "
        f"H2D {stats['h2d_bytes'] / 1e9:.3f} GB | stall {stats['stall_s']:.3f} s | "
        f"peak device {stats['peak_device_bytes'] / 2**20:.1f} MiB | policy {stats['policy']}"
        + (f" | experts {stats['quantize_experts']}" if stats.get("quantize_experts") else "")
        + (f" | whole-token steps {stats['speculated_tokens']} ({stats['speculation_redone']} finished by layer)"
           if stats.get("speculated_tokens") else "")
        + (f" | compile {stats['compile_s']:.1f} s" if stats.get("compile_s", 0) >= 0.05 else "")
        + (f" | EMULATED LINK {stats['emulated_link']}" if stats.get("emulated_link") else "")
    )


def run(args) -> int:
    import jaxmoe
    from jaxmoe import compile_cache
    from jaxmoe.engine import SamplingParams, check_max_new_tokens

    # flags that need no model fail before it loads (seconds): the checks generate runs again later
    SamplingParams(args.temperature, args.top_p, args.top_k, args.seed)
    check_max_new_tokens(args.max_new_tokens)
    if args.system is not None and not args.chat:
        raise JaxmoeError("--system needs --chat (a system message only exists in a chat template)")
    if args.output_json is not None:
        check_output_path(args.output_json)
    compile_cache.enable()
    if args.model is None:
        from jaxmoe.default_model import DEFAULT_PROMPT, default_model_dir

        model_dir = default_model_dir()
        if args.prompt is None and args.prompt_file is None:
            args.prompt = DEFAULT_PROMPT
    else:
        model_dir = args.model
    if args.prompt_file is not None:
        try:
            prompt = args.prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise JaxmoeError(f"--prompt-file {args.prompt_file}: cannot read ({e})") from None
    elif args.prompt is not None:
        prompt = args.prompt
    else:
        raise JaxmoeError("--prompt or --prompt-file is required with --model")
    if args.chat:  # before the model loads: the template is rendered (and may fail) in seconds
        chat_text = render_chat(model_dir, chat_messages(prompt, args.system))

    offload = {k: v for k, v in dict(cache_slots=args.cache_slots, expert_cache_gb=args.expert_cache_gb,
                                     policy=args.policy, predictor=args.predictor,
                                     emulate_link=args.emulate_link, speculate=args.speculate,
                                     fuse_predictor={"on": True, "off": False}.get(args.fuse_predictor)).items()
               if v is not None}
    if offload.get("policy") == "resident":
        if len(offload) > 1:
            raise JaxmoeError("--policy resident takes no cache, predictor or link options")
        offload = {}
    engine = jaxmoe.load(model_dir, dtype=args.dtype, quantize_experts=args.quantize_experts, **offload)
    if engine.tokenizer is None:
        raise JaxmoeError(f"{model_dir}: the model has no tokenizer files; use the Python API with token ids")
    tok = engine.tokenizer
    ids = prompt_ids(tok, chat_text, template_rendered=True) if args.chat else prompt_ids(tok, prompt)

    generated: list[int] = []
    shown = [""]

    def stream(token_id: int):
        generated.append(token_id)
        text = tok.decode(generated, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for complete UTF-8 sequences
            sys.stdout.write(text[len(shown[0]):])
            sys.stdout.flush()
            shown[0] = text

    if not args.chat:  # a plain prompt is continued: shown with its continuation; a chat prompt is answered
        sys.stdout.write(prompt)
    result = engine.generate(ids, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                             top_k=args.top_k, seed=args.seed, on_token=stream)
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(summary_line(result.stats), file=sys.stderr)
    if args.output_json is not None:
        payload = {
            "prompt_ids": result.prompt_ids,
            "generated_ids": result.generated_ids,
            "text": tok.decode(result.generated_ids, skip_special_tokens=True),
            "stats": result.stats,
        }
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output_json.with_name(f".{args.output_json.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        tmp.rename(args.output_json)
    return 0


def check_output_path(path: Path) -> None:
    """Refuses, before anything is generated, an --output-json that exists or could not be written: its
    nearest existing ancestor must be a writable directory (missing parents are created at the end)."""
    if path.exists() or path.is_symlink():
        raise JaxmoeError(f"--output-json {path}: already exists; not overwriting it")
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise JaxmoeError(f"--output-json {path}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise JaxmoeError(f"--output-json {path}: cannot write into {ancestor}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(run, args)


if __name__ == "__main__":
    sys.exit(main())
