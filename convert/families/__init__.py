"""Family adapters: `model_type` -> (config mapping, key-mapping table). One plain dict, no registry."""

from dataclasses import dataclass
from typing import Callable

from convert.families import deepseek, glm4_moe, gpt_oss, minimax_m2, mixtral, olmoe, qwen3_5_moe, qwen3_next, qwen_moe
from convert.families.common import is_mtp_key
from convert.keymap import KeyRule
from jaxmoe.config import ModelConfig


def no_ignored_keys(cfg: ModelConfig, key: str) -> bool:
    return False


@dataclass(frozen=True)
class Adapter:
    config_from_hf: Callable[[dict, str], ModelConfig]
    key_rules: Callable[[ModelConfig], list[KeyRule]]
    # tensors the family ships that inference does not use (e.g. DeepSeek-V3's multi-token-prediction
    # layers); every other tensor must be used exactly once
    ignore_key: Callable[[ModelConfig, str], bool] = no_ignored_keys
    # ModelConfig -> the family's Hub config.json (for `convert.export`); None where not written yet
    config_to_hf: Callable[[ModelConfig], dict] | None = None


FAMILIES: dict[str, Adapter] = {
    "mixtral": Adapter(mixtral.config_from_hf, mixtral.key_rules),
    "qwen2_moe": Adapter(qwen_moe.qwen2_config_from_hf, qwen_moe.qwen2_key_rules),
    "qwen3_moe": Adapter(qwen_moe.qwen3_config_from_hf, qwen_moe.qwen3_key_rules, config_to_hf=qwen_moe.qwen3_config_to_hf),
    "olmoe": Adapter(olmoe.config_from_hf, olmoe.key_rules),
    "deepseek_v2": Adapter(deepseek.v2_config_from_hf, deepseek.key_rules),
    "deepseek_v3": Adapter(deepseek.v3_config_from_hf, deepseek.key_rules, is_mtp_key),
    "glm4_moe": Adapter(glm4_moe.config_from_hf, glm4_moe.key_rules, is_mtp_key),
    "glm4_moe_lite": Adapter(deepseek.glm_lite_config_from_hf, deepseek.key_rules, is_mtp_key),
    "gpt_oss": Adapter(gpt_oss.config_from_hf, gpt_oss.key_rules),
    "minimax_m2": Adapter(minimax_m2.config_from_hf, minimax_m2.key_rules, is_mtp_key),
    "qwen3_next": Adapter(qwen3_next.config_from_hf, qwen3_next.key_rules, qwen3_next.is_mtp_module_key),
    "qwen3_5_moe": Adapter(qwen3_5_moe.config_from_hf, qwen3_5_moe.key_rules, qwen3_5_moe.is_skipped_key),
    # the text-only Qwen3_5MoeForCausalLM's checkpoint
    "qwen3_5_moe_text": Adapter(qwen3_5_moe.config_from_hf, qwen3_5_moe.key_rules, qwen3_5_moe.is_skipped_key),
}
