"""A prompt as token ids, built the way transformers builds it.

- Plain text: `tokenizer(text)`, i.e. the tokenizer's own special tokens (a BOS where its post-processor
  adds one: Mixtral's and the default model's do, Qwen's does not).
- A chat turn (`--chat`): the model's chat template (`chat_template.jinja`, or `chat_template` in
  tokenizer_config.json) rendered by transformers' `apply_chat_template` over an optional system message
  and one user message, with the generation prompt, then tokenized without adding special tokens (the
  template writes them), as `apply_chat_template(..., tokenize=True)` does.

May import transformers (chat only: rendering a template is its job, and its output is the reference).
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxmoe.errors import JaxmoeError


def has_chat_template(model_dir: Path) -> bool:
    """Whether `model_dir` ships a chat template: chat_template.jinja, or one in tokenizer_config.json."""
    model_dir = Path(model_dir)
    if (model_dir / "chat_template.jinja").is_file():
        return True
    try:
        config = json.loads((model_dir / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(isinstance(config, dict) and config.get("chat_template"))


def chat_messages(user_text: str, system: str | None = None) -> list[dict]:
    """-> [{"role": "system", ...}?, {"role": "user", "content": user_text}]."""
    return ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": user_text}]


def render_chat(model_dir: Path, messages: list[dict]) -> str:
    """The chat template of `model_dir` applied to `messages`, ending with the assistant's generation
    prompt -> the prompt text. JaxmoeError (naming --chat) when the model has no template or it fails."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise JaxmoeError(f"{model_dir}: no such directory")
    if not has_chat_template(model_dir):
        raise JaxmoeError(f"--chat: {model_dir} has no chat template (chat_template.jinja or tokenizer_config.json's "
                          "chat_template); pass the prompt as plain text instead")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # jinja2's TemplateError, or the template's own raise_exception(...)
        raise JaxmoeError(f"--chat: the chat template of {model_dir} failed ({type(e).__name__}: {e})") from None


def prompt_ids(tokenizer, text: str, template_rendered: bool = False) -> list[int]:
    """Token ids of `text`: with the tokenizer's special tokens for a plain prompt (`tokenizer(text)`), as
    written for a rendered chat template (its special tokens are in the text)."""
    return list(tokenizer.encode(text, add_special_tokens=not template_rendered))
