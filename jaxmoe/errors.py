"""Errors a user can cause (bad files, flags, budgets). CLIs turn them into `error: ...` + exit 2."""


class JaxmoeError(Exception):
    """A user-facing error whose message names the file, key or flag at fault."""
