"""`jaxmoe.tokenizer`: the direct `tokenizers` path is taken only where it tokenizes exactly as
transformers' AutoTokenizer, and then agrees with it on encode and decode."""

import json
import shutil

import pytest
from transformers import AutoTokenizer

from jaxmoe.default_model import ASSET_DIR
from jaxmoe.tokenizer import DirectTokenizer, direct_tokenizer, load_tokenizer
from tests.test_generate_cli import add_char_tokenizer

TEXTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nnewlines\n\n\n",
    "unicode: héllo wörld — 你好 🙂",
    "",
    "a<|bos|>b<|eos|> <|pad|>c<s></s><pad>",  # special tokens written in the text
    "x = [i ** 2 for i in range(10)]  # comment",
]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """{name: directory} of the tokenizers this project ships (the default model's) and builds (the CLI
    tests' character-level one)."""
    root = tmp_path_factory.mktemp("tokenizers")
    default = root / "default"
    default.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ASSET_DIR / name, default / name)
    char = root / "char"
    char.mkdir()
    add_char_tokenizer(char, 64)
    return {"default": default, "char": char}


@pytest.mark.parametrize("name", ["default", "char"])
def test_direct_path_agrees_with_transformers(tokenizer_dirs, name):
    ours = load_tokenizer(tokenizer_dirs[name])
    assert isinstance(ours, DirectTokenizer)
    reference = AutoTokenizer.from_pretrained(str(tokenizer_dirs[name]), local_files_only=True)
    assert len(ours) == len(reference)
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text, add_special_tokens=False), text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip), text
    every_id = list(range(len(reference)))  # every token, special ones included, in one sequence
    for skip in (False, True):
        assert ours.decode(every_id, skip_special_tokens=skip) == reference.decode(every_id, skip_special_tokens=skip)


def _edited(tokenizer_dirs, tmp_path, edit_config=None, edit_spec=None):
    target = tmp_path / "tok"
    shutil.copytree(tokenizer_dirs["default"], target)
    for name, edit in (("tokenizer_config.json", edit_config), ("tokenizer.json", edit_spec)):
        if edit is not None:
            doc = json.loads((target / name).read_text())
            edit(doc)
            (target / name).write_text(json.dumps(doc))
    return target


@pytest.mark.parametrize("edit_config,edit_spec", [
    (lambda c: c.update(tokenizer_class="LlamaTokenizerFast"), None),  # a model-specific class
    (lambda c: c.update(clean_up_tokenization_spaces=True), None),  # decode-time clean-up
    (lambda c: c.update(add_prefix_space=True), None),
    (lambda c: c.update(unk_token="<|unk|>"), None),  # a special token transformers would add
    (None, lambda s: s["added_tokens"][1].update(special=False)),  # bos not special in the file
    (None, lambda s: s.update(truncation={"max_length": 8, "strategy": "LongestFirst", "stride": 0,
                                          "direction": "Right"})),
    (lambda c: c.pop("tokenizer_class"), None),
], ids=["class", "clean-up", "prefix-space", "new-special", "not-special", "truncation", "no-class"])
def test_transformers_decides_whenever_it_could_tokenize_differently(tokenizer_dirs, tmp_path, edit_config, edit_spec):
    target = _edited(tokenizer_dirs, tmp_path, edit_config, edit_spec)
    assert direct_tokenizer(target) is None


def test_transformers_fallback_is_what_load_tokenizer_returns(tokenizer_dirs, tmp_path):
    target = _edited(tokenizer_dirs, tmp_path, lambda c: c.update(unk_token="<|unk|>"))
    tok = load_tokenizer(target)
    assert not isinstance(tok, DirectTokenizer)
    assert "<|unk|>" in tok.get_vocab()  # transformers added the token the direct path could not have
    assert load_tokenizer(tmp_path / "missing") is None
