"""Where jaxmoe's commands keep compiled programs (`jaxmoe.compile_cache.cache_dir`); that the cache is
filled and hit is checked end to end in test_generate_cli."""

from pathlib import Path

import pytest

from jaxmoe import compile_cache


@pytest.mark.parametrize("value", ["off", "OFF", "0", "false", "none", " no "])
def test_off_disables(monkeypatch, value):
    monkeypatch.setenv(compile_cache.ENV, value)
    assert compile_cache.cache_dir() is None


def test_explicit_directory(monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "programs"))
    assert compile_cache.cache_dir() == tmp_path / "programs"


def test_default_is_under_the_jaxmoe_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setenv("JAXMOE_CACHE", str(tmp_path))
    assert compile_cache.cache_dir() == tmp_path / "xla"
    monkeypatch.delenv("JAXMOE_CACHE")
    assert compile_cache.cache_dir() == Path.home() / ".cache" / "jaxmoe" / "xla"
