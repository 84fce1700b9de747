"""The stage kinds a recipe may use: kind -> (config dataclass, train function).

This is the one place that knows every stage; `common` and the stages themselves do not import each other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from common.config import StageConfig
from common.runs import StageContext, StageResult
from dpo import online as online_dpo
from dpo import stage as dpo_stage
from eval import stage as eval_stage
from ppo import grpo_config, grpo_stage
from ppo import stage as ppo_stage
from reward_model import preferences_stage
from reward_model import stage as reward_model_stage
from sft import stage as sft_stage


class StageKind(NamedTuple):
    config: type[StageConfig]
    train: Callable[[StageConfig, StageContext], StageResult]


STAGE_KINDS: dict[str, StageKind] = {
    "sft": StageKind(sft_stage.SFTStage, sft_stage.train),
    "ppo": StageKind(ppo_stage.PPOStage, ppo_stage.train),
    "grpo": StageKind(grpo_config.GRPOStage, grpo_stage.train),
    "dpo": StageKind(dpo_stage.DPOStage, dpo_stage.train),
    "online_dpo": StageKind(online_dpo.OnlineDPOStage, online_dpo.train),
    "preferences": StageKind(preferences_stage.PreferencesStage, preferences_stage.train),
    "reward_model": StageKind(reward_model_stage.RewardModelStage, reward_model_stage.train),
    "eval": StageKind(eval_stage.EvalStage, eval_stage.train),
}


def config_classes() -> dict[str, type[StageConfig]]:
    return {kind: k.config for kind, k in STAGE_KINDS.items()}
