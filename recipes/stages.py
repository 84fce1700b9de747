"""The stage kinds a recipe may use: kind -> (config dataclass, train function).

This is the one place that knows every stage; `common` and the stages themselves do not import each other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from common.config import Recipe, StageConfig
from common.data import READABLE_AS
from common.errors import InputError
from common.runs import StageContext, StageResult
from dpo import online as online_dpo
from dpo import stage as dpo_stage
from eval import stage as eval_stage
from ppo import grpo_config, grpo_stage
from ppo import stage as ppo_stage
from preferences import stage as preferences_stage
from reward_model import stage as reward_model_stage
from sft import stage as sft_stage


class StageKind(NamedTuple):
    config: type[StageConfig]
    train: Callable[[StageConfig, StageContext], StageResult]
    # The record shape (common.data) the stage reads from its data block; None where its config decides.
    reads: str | None = None
    # The record shape of the data the stage writes (its data/ folder), which `data: {stage: NAME}` reads; None: none.
    writes: str | None = None


STAGE_KINDS: dict[str, StageKind] = {
    "sft": StageKind(sft_stage.SFTStage, sft_stage.train, reads="sft"),
    "ppo": StageKind(ppo_stage.PPOStage, ppo_stage.train, reads="prompt"),
    "grpo": StageKind(grpo_config.GRPOStage, grpo_stage.train, reads="prompt"),
    "dpo": StageKind(dpo_stage.DPOStage, dpo_stage.train, reads="preference"),
    "online_dpo": StageKind(online_dpo.OnlineDPOStage, online_dpo.train, reads="prompt"),
    "preferences": StageKind(preferences_stage.PreferencesStage, preferences_stage.train, writes="preference"),
    "reward_model": StageKind(reward_model_stage.RewardModelStage, reward_model_stage.train, reads="preference"),
    "eval": StageKind(eval_stage.EvalStage, eval_stage.train, reads="prompt"),
}


def config_classes() -> dict[str, type[StageConfig]]:
    return {kind: k.config for kind, k in STAGE_KINDS.items()}


def check_data_references(recipe: Recipe) -> None:
    """A `data: {stage: NAME}` names a stage that writes records of the shape the reading stage needs: checked when
    the recipe loads, not when the reading stage finds no data file an hour into the run."""
    for name, cfg in recipe.stages.items():
        producer = cfg.data.stage if cfg.data is not None else None
        if producer is None:
            continue
        made = STAGE_KINDS[recipe.stages[producer].kind].writes
        needed = STAGE_KINDS[cfg.kind].reads
        writers = ", ".join(kind for kind, k in STAGE_KINDS.items() if k.writes)
        if made is None:
            raise InputError(f"{recipe.source}: stages.{name}.data.stage names '{producer}', a "
                             f"{recipe.stages[producer].kind} stage, which writes no data (only a model); name a "
                             f"stage that writes records ({writers}) or give data.path / data.hub")
        if needed is not None and needed not in READABLE_AS[made]:
            raise InputError(f"{recipe.source}: stages.{name}.data.stage names '{producer}', which writes {made} "
                             f"records, but a {cfg.kind} stage reads {needed} records; give data.path / data.hub "
                             f"with {needed} records instead")
