"""The embedded default model: a Hugging Face checkpoint committed under jaxmoe/assets/default-model
(trained by `python -m jaxmoe.train`), converted on first use into a cache directory.

The cache lives in `$JAXMOE_CACHE` (default ~/.cache/jaxmoe), in a subdirectory named by a hash of
the asset files, so a new model invalidates it. Conversion writes to a unique temporary name and
renames, so concurrent first uses are safe (the loser of the race keeps the winner's copy).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from jaxmoe.errors import JaxmoeError

ASSET_DIR = Path(__file__).parent / "assets" / "default-model"
DEFAULT_PROMPT = "def fibonacci(n):"


def cache_root() -> Path:
    return Path(os.environ.get("JAXMOE_CACHE") or Path.home() / ".cache" / "jaxmoe")


def asset_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(ASSET_DIR.iterdir()):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def default_model_dir(progress: bool = True) -> Path:
    """The converted default model, converting the committed checkpoint on first use."""
    if not (ASSET_DIR / "config.json").is_file():
        raise JaxmoeError(f"{ASSET_DIR}: the default model is missing; train it with `python -m jaxmoe.train --out {ASSET_DIR}`")
    target = cache_root() / f"default-model-{asset_hash()}"
    if (target / "jaxmoe.json").is_file():
        return target
    from convert.converter import convert  # only now: importing the converter takes seconds (transformers)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f"{target.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        convert(ASSET_DIR, staging, progress=progress)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "jaxmoe.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
