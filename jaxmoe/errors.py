"""Errors a user can cause (bad files, flags, budgets). CLIs turn them into `error: ...` + exit 2."""

import sys


class JaxmoeError(Exception):
    """A user-facing error whose message names the file, key or flag at fault."""


def run_cli(run, args) -> int:
    """The exit convention of every command: `run(args)`'s return code; a JaxmoeError becomes one
    `error:` line on stderr and exit 2; Ctrl-C becomes `interrupted` and exit 130."""
    try:
        return run(args)
    except JaxmoeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
