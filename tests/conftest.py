"""Shared fixtures: tiny HF checkpoints per family, converted once per test session."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the commands' persistent compilation cache (jaxmoe.compile_cache) stays off in tests: the suite compiles
# thousands of distinct programs, each used in one test, so it has nothing to gain, and with the cache on
# it ran ~50% longer. test_generate_cli checks the cache with a directory of its own.
os.environ.setdefault("JAXMOE_COMPILE_CACHE", "off")

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
