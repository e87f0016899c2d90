"""CLI: python -m convert HF_DIR OUT_DIR [--dtype bfloat16|float16|float32] [--force]"""

import argparse
import sys

from convert.converter import DTYPES, convert
from jaxmoe.errors import JaxmoeError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one `error: ...` line and exit 2, like every other refusal (no usage dump)
        self.exit(2, f"error: {message} (see python -m convert --help)\n")


def main(argv=None) -> int:
    parser = _Parser(prog="python -m convert", description="Convert a Hugging Face MoE checkpoint for jaxmoe.")
    parser.add_argument("hf_dir", help="Hugging Face checkpoint directory (config.json, safetensors, tokenizer); "
                                       "bf16/f16/f32 weights, or the Hub's FP8 block-wise and MXFP4 releases")
    parser.add_argument("out_dir", help="output model directory (created; must not exist or be empty)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="parameter dtype (default: the checkpoint's)")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    args = parser.parse_args(argv)
    try:
        cfg = convert(args.hf_dir, args.out_dir, dtype=args.dtype, force=args.force)
    except JaxmoeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"converted {cfg.family} ({cfg.num_layers} layers, {cfg.num_experts} experts, {cfg.dtype}) -> {args.out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
