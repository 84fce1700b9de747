"""The stage kinds a recipe may use: kind -> (config dataclass, train function).

This is the one place that knows every stage; `common` and the stages themselves do not import each other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from common.config import StageConfig
from common.runs import StageContext, StageResult
from sft import stage as sft_stage


class StageKind(NamedTuple):
    config: type[StageConfig]
    train: Callable[[StageConfig, StageContext], StageResult]


STAGE_KINDS: dict[str, StageKind] = {
    "sft": StageKind(sft_stage.SFTStage, sft_stage.train),
}


def config_classes() -> dict[str, type[StageConfig]]:
    return {kind: k.config for kind, k in STAGE_KINDS.items()}
