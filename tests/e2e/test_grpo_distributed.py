"""GRPO under data parallelism: two CPU processes (gloo) launched by `accelerate launch` with the shipped config.

The launched processes run this module (`python -m tests.e2e.test_grpo_distributed OUT RECIPE`): they check that
REINFORCE++'s whitening is over the global batch, train a few steps on their own shares of the prompts and write each
process's adapter weights (identical on both, moved from the start); then the stage through the recipe runner.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from common.tracking import read_metrics
from tests.e2e.two_process import (
    assert_both_ranks_trained_alike,
    assert_stage_done_with_per_rank_rng,
    launch_two_cpu_processes,
)

STEPS = 3


def test_two_process_grpo_ends_with_identical_adapters(tmp_path):
    from tests.stages.test_grpo import grpo_recipe
    from tests.stages.test_ppo_training import write_recipe

    recipe = write_recipe(tmp_path, grpo_recipe(tmp_path, {"max_steps": 2, "save_steps": 1,
                                                           "advantage": "reinforce_pp"}))
    launch_two_cpu_processes(29641, "tests.e2e.test_grpo_distributed", str(tmp_path), str(recipe))

    assert_both_ranks_trained_alike(tmp_path)
    assert [r["step"] for r in read_metrics(tmp_path / "trainer" / "metrics.jsonl")] == list(range(1, STEPS + 1))
    assert_stage_done_with_per_rank_rng(tmp_path / "runs" / "t" / "ddp" / "grpo")

def worker(out: Path, recipe: Path) -> None:
    from accelerate import Accelerator

    from common.models import resolve_model
    from ppo.adapters import OneBaseModel
    from ppo.group_advantages import group_advantages
    from recipes.runner import RunOptions, process_state, run_recipe
    from tests.stages.test_grpo import make_trainer
    from tests.stages.test_ppo_adapters import MODEL

    process_state()
    acc = Accelerator(cpu=True)
    rank = acc.process_index

    # REINFORCE++: each process holds its own groups; the result is that of all groups together.
    rewards = torch.randn(3, 4, generator=torch.Generator().manual_seed(rank))
    mine = group_advantages(rewards, "reinforce_pp", lambda s: acc.reduce(s, reduction="sum"))
    everything = group_advantages(acc.gather(rewards), "reinforce_pp")
    torch.testing.assert_close(mine, everything[3 * rank: 3 * rank + 3], atol=1e-6, rtol=0)

    torch.manual_seed(0)  # the same fresh LoRA on both processes
    model = OneBaseModel.build(MODEL, resolve_model(MODEL.base), None, "none", torch.device("cpu"))
    if acc.is_main_process:
        save_file(model.trainable_state(), str(out / "start.safetensors"))
    make_trainer(model, out / "trainer", accelerator=acc, max_steps=STEPS, save_steps=2,
                 advantage="reinforce_pp").train()
    save_file(model.trainable_state(), str(out / f"rank{rank}.safetensors"))

    run_recipe(recipe, RunOptions(overrides=[], output_dir=out / "runs", run_id="ddp"))


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
