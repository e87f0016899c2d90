"""Declarative key mapping from Hugging Face tensor names to paths in our model state.

A `KeyRule` pairs an HF key template with a target path template, e.g.
  KeyRule("model.layers.{layer}.self_attn.q_proj.weight", "layers.{layer}.attn.q_proj", transpose=True)
`{layer}` and `{expert}` are integer placeholders; a rule whose HF template has `{expert}` fills one
row of the stacked expert tensor at the target path. A rule with `columns=(start, step)` takes only the
last-axis slice `[..., start::step]` of the tensor, so several rules can split one fused HF tensor
(GPT-OSS's interleaved `gate_up_proj`); `chunk=(index, count)` takes one of `count` equal contiguous
chunks instead (Qwen3.5's stacked `gate_up_proj`: gate, then up). A rule with `into=(c0, c1, ...)` is the other way round: its tensor
fills only the target's last-axis columns c0, c1, ... (its column j goes to column c_j), so several tensors fill
one parameter between them (Qwen3.5's separate `in_proj_qkv` / `in_proj_z` laid out per key head in our fused
`in_proj_qkvz`); the converter checks they fill every column exactly once. Templates also give the exact HF key
to name when a tensor is missing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class KeyRule:
    hf: str  # HF key template with optional {layer} / {expert}
    target: str  # dotted target path template with optional {layer}
    transpose: bool = False  # torch Linear [out, in] -> our [in, out] (a stack [E, out, in] -> [E, in, out])
    columns: tuple[int, int] | None = None  # (start, step): the last-axis slice taken, after any transpose
    chunk: tuple[int, int] | None = None  # (index, count): the index-th of `count` equal contiguous last-axis chunks
    into: tuple[int, ...] | None = None  # the target's last-axis columns this tensor fills (None: all of them)
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

    def shape_from(self, hf_shape: tuple) -> tuple:
        """The shape this placement fills, from the HF tensor's shape."""
        shape = swap_last_two(tuple(hf_shape)) if self.transpose else tuple(hf_shape)
        if self.rule.columns is not None:
            start, step = self.rule.columns
            shape = (*shape[:-1], len(range(start, shape[-1], step)))
        if self.rule.chunk is not None:
            shape = (*shape[:-1], shape[-1] // self.rule.chunk[1])
        return shape

    def filled_shape(self, target_shape: tuple) -> tuple:
        """The part of a target of shape `target_shape` this placement fills (`KeyRule.into` columns or all)."""
        if self.rule.into is None:
            return tuple(target_shape)
        return (*target_shape[:-1], len(self.rule.into))

    def take(self, tensor):
        """The part of HF tensor `tensor` (numpy) this placement fills, transposed and sliced."""
        if self.transpose and tensor.ndim >= 2:
            tensor = tensor.swapaxes(-1, -2)
        if self.rule.columns is not None:
            start, step = self.rule.columns
            tensor = tensor[..., start::step]
        if self.rule.chunk is not None:
            index, count = self.rule.chunk
            width = tensor.shape[-1] // count
            tensor = tensor[..., index * width : (index + 1) * width]
        return tensor


def swap_last_two(shape: tuple) -> tuple:
    """[..., a, b] -> [..., b, a]: torch Linear [out, in] (or a stack of them) -> our [in, out]; shorter shapes
    unchanged."""
    return (*shape[:-2], shape[-1], shape[-2]) if len(shape) >= 2 else tuple(shape)


def target_path(template: str, layer: int | None) -> tuple:
    dotted = template.format(layer=layer) if layer is not None else template
    return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))


def place(key: str, rules: list[KeyRule]) -> list[Placement]:
    """Every placement of HF key `key` (one per matching rule; several for a tensor split by `columns`), empty
    if no rule matches it."""
    out = []
    for rule in rules:
        m = rule.regex.match(key)
        if m:
            groups = m.groupdict()
            layer = int(groups["layer"]) if "layer" in groups else None
            expert = int(groups["expert"]) if "expert" in groups else None
            out.append(Placement(target_path(rule.target, layer), expert, rule.transpose, rule))
    return out
