"""Family adapters: `model_type` -> (config mapping, key-mapping table). One plain dict, no registry."""

from dataclasses import dataclass
from typing import Callable

from convert.families import mixtral, olmoe, qwen_moe
from convert.keymap import KeyRule
from jaxmoe.config import ModelConfig


@dataclass(frozen=True)
class Adapter:
    config_from_hf: Callable[[dict, str], ModelConfig]
    key_rules: Callable[[ModelConfig], list[KeyRule]]


FAMILIES: dict[str, Adapter] = {
    "mixtral": Adapter(mixtral.config_from_hf, mixtral.key_rules),
    "qwen2_moe": Adapter(qwen_moe.qwen2_config_from_hf, qwen_moe.qwen2_key_rules),
    "qwen3_moe": Adapter(qwen_moe.qwen3_config_from_hf, qwen_moe.qwen3_key_rules),
    "olmoe": Adapter(olmoe.config_from_hf, olmoe.key_rules),
}
