"""Declarative key mapping from Hugging Face tensor names to paths in our model state.

A `KeyRule` pairs an HF key template with a target path template, e.g.
  KeyRule("model.layers.{layer}.self_attn.q_proj.weight", "layers.{layer}.attn.q_proj", transpose=True)
`{layer}` and `{expert}` are integer placeholders; a rule whose HF template has `{expert}` fills one
row of the stacked expert tensor at the target path. Templates also give the exact HF key to name
when a tensor is missing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class KeyRule:
    hf: str  # HF key template with optional {layer} / {expert}
    target: str  # dotted target path template with optional {layer}
    transpose: bool = False  # torch Linear [out, in] -> our [in, out]
    regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        pattern = re.escape(self.hf).replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{expert\}", r"(?P<expert>\d+)")
        object.__setattr__(self, "regex", re.compile(pattern + r"\Z"))

    @property
    def per_expert(self) -> bool:
        return "{expert}" in self.hf


@dataclass(frozen=True)
class Placement:
    """Where one HF tensor goes: state path (tuple with int layer index), expert row or None."""

    path: tuple
    expert: int | None
    transpose: bool
    rule: KeyRule


def target_path(template: str, layer: int | None) -> tuple:
    dotted = template.format(layer=layer) if layer is not None else template
    return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))


def place(key: str, rules: list[KeyRule]) -> Placement | None:
    """The placement of HF key `key`, or None if no rule matches it."""
    for rule in rules:
        m = rule.regex.match(key)
        if m:
            groups = m.groupdict()
            layer = int(groups["layer"]) if "layer" in groups else None
            expert = int(groups["expert"]) if "expert" in groups else None
            return Placement(target_path(rule.target, layer), expert, rule.transpose, rule)
    return None
