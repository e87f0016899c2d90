"""Shared fixtures: tiny HF checkpoints per family, converted once per test session."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "JAXMOE_COMPILE_CACHE" not in os.environ:
    # the commands' persistent compilation cache (jaxmoe.compile_cache): one per test session, shared by the
    # CLI subprocesses (later runs of the same programs load them), never the user's own
    os.environ["JAXMOE_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="jaxmoe-test-xla-")
    atexit.register(shutil.rmtree, os.environ["JAXMOE_COMPILE_CACHE"], ignore_errors=True)

import pytest  # noqa: E402

from tests.hf_models import build_hf_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def converted_model(tmp_path_factory):
    """converted_model(family) -> (hf_dir, model_dir), built and converted once per session."""
    from convert.converter import convert

    made = {}

    def get(family: str):
        if family not in made:
            root = tmp_path_factory.mktemp(family)
            hf_dir = build_hf_checkpoint(family, root / "hf")
            convert(hf_dir, root / "jaxmoe", progress=False)
            made[family] = (hf_dir, root / "jaxmoe")
        return made[family]

    return get
