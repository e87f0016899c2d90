"""A model directory's tokenizer: its `tokenizer.json` run by the `tokenizers` library directly where
that is exactly what transformers would run, else transformers' `AutoTokenizer`.

Importing transformers costs 2 s on the 2-core CPU VM, 5 s where torch is installed (transformers then
imports it): more than the rest of a `python -m jaxmoe.generate` run on the default model once its
programs are compiled. `tokenizers` loads the same file in milliseconds. The direct path is taken only
when transformers would add nothing of its own to the `tokenizers` object it builds from the file:
  - the class in tokenizer_config.json is the generic fast one (`TokenizersBackend`,
    `PreTrainedTokenizerFast`): model-specific classes rebuild normalizers, pre-tokenizers or special
    tokens in code;
  - every special token the config names is already a special added token of tokenizer.json
    (transformers would add the others, changing the encoding);
  - no setting transformers applies on top: decode-time space clean-up, a prefix space, split special
    tokens, truncation or padding, or the vocabulary size above which it patches Mistral's
    pre-tokenizer regex.
Anything else (or no tokenizer_config.json) goes to transformers. `tests/test_tokenizer.py` checks the
two agree on the tokenizers this project ships and builds.

Both expose what jaxmoe uses: `encode(text, add_special_tokens=False) -> list[int]` and
`decode(ids, skip_special_tokens=False) -> str`. May import tokenizers and transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
LIST_SPECIAL = ("additional_special_tokens", "extra_special_tokens")
TRANSFORMERS_SETTINGS = ("clean_up_tokenization_spaces", "add_prefix_space", "split_special_tokens")
MISTRAL_PATCH_VOCAB = 100_000  # transformers patches the pre-tokenizer of larger vocabularies


class DirectTokenizer:
    """tokenizer.json through `tokenizers.Tokenizer` (see the module docstring for when it is used)."""

    def __init__(self, backend):
        self.backend = backend

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def direct_tokenizer(model_dir: Path) -> DirectTokenizer | None:
    """The `tokenizers` path for `model_dir`, or None where transformers could tokenize differently."""
    model_dir = Path(model_dir)
    try:
        config = json.loads((model_dir / "tokenizer_config.json").read_text())
        spec = json.loads((model_dir / "tokenizer.json").read_text())
    except (OSError, ValueError):
        return None  # missing or unreadable: transformers decides (and reports)
    if config.get("tokenizer_class") not in GENERIC_CLASSES or any(config.get(k) for k in TRANSFORMERS_SETTINGS):
        return None
    if spec.get("truncation") or spec.get("padding"):
        return None
    named = [_token_text(config.get(k)) for k in NAMED_SPECIAL]
    listed = [_token_text(t) for k in LIST_SPECIAL for t in (config.get(k) or [])]
    decoder = [_token_text(t) for t in (config.get("added_tokens_decoder") or {}).values()]
    wanted = {t for t in named + listed + decoder if t}
    special = {t.get("content") for t in spec.get("added_tokens") or [] if t.get("special")}
    if not wanted <= special:
        return None
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    if backend.get_vocab_size(with_added_tokens=True) > MISTRAL_PATCH_VOCAB:
        return None
    return DirectTokenizer(backend)


def load_tokenizer(model_dir: Path):
    """The model directory's tokenizer (`DirectTokenizer` or a transformers tokenizer), or None when it
    ships none."""
    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "tokenizer_config.json").is_file():
        return None
    direct = direct_tokenizer(model_dir)
    if direct is not None:
        return direct
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
