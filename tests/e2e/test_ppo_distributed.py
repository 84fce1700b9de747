"""PPO under data parallelism: two CPU processes (gloo) launched by `accelerate launch` with the shipped config.

The launched processes run this module (`python -m tests.e2e.test_ppo_distributed OUT RECIPE`): they check that
advantages are whitened over the global batch, train a few PPO steps on their own shares of the prompts and write
what the test compares: each process's adapter weights (identical on both, moved from the start) and its local
mean scores (the logged metric is their mean over the global batch). Then the same through the recipe runner.
"""

from __future__ import annotations

import json
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


def test_two_process_ppo_agrees_across_processes(tmp_path):
    from tests.stages.test_ppo_training import ppo_recipe, write_recipe

    recipe = write_recipe(tmp_path, ppo_recipe(tmp_path, {"max_steps": 2, "save_steps": 1}))
    launch_two_cpu_processes(29637, "tests.e2e.test_ppo_distributed", str(tmp_path), str(recipe))

    # The trainer: identical adapters on both processes after the averaged updates, and moved from the start.
    assert_both_ranks_trained_alike(tmp_path)
    # One metrics row per step, written once, whose score is the mean over both processes' responses.
    rows = read_metrics(tmp_path / "trainer" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    local = [json.loads((tmp_path / f"scores{r}.json").read_text()) for r in (0, 1)]
    for row, a, b in zip(rows, *local, strict=True):
        assert abs(row["objective/scores"] - (a + b) / 2) < 1e-6
    assert (tmp_path / "trainer" / "checkpoints" / "checkpoint-2" / "rng-rank1.pt").is_file()

    # The stage through the runner: one run directory, the policy adapter and per-rank RNG states in checkpoints.
    assert_stage_done_with_per_rank_rng(tmp_path / "runs" / "t" / "ddp" / "ppo")


def worker(out: Path, recipe: Path) -> None:
    from accelerate import Accelerator

    from common.models import resolve_model
    from ppo.adapters import OneBaseModel
    from ppo.advantages import whiten
    from ppo.trainer import global_whiten
    from preferences.scorers import build_scorer
    from recipes.runner import RunOptions, process_state, run_recipe
    from tests.stages.test_ppo_adapters import MODEL, make_trainer
    from tests.stages.test_ppo_training import LETTERS

    process_state()
    acc = Accelerator(cpu=True)
    rank = acc.process_index

    # Whitening: each process holds its own rows; the result is whiten() of all rows together.
    generator = torch.Generator().manual_seed(rank)
    values, mask = torch.randn(4, 6, generator=generator), torch.rand(4, 6, generator=generator) > 0.3
    mine = global_whiten(values, mask, lambda s: acc.reduce(s, reduction="sum"))
    everything = whiten(acc.gather(values), acc.gather(mask))
    torch.testing.assert_close(mine, everything[4 * rank: 4 * rank + 4], atol=1e-6, rtol=0)

    torch.manual_seed(0)  # the same fresh LoRA on both processes
    model = OneBaseModel.build(MODEL, resolve_model(MODEL.base), None, "shared", torch.device("cpu"))
    if acc.is_main_process:
        save_file(model.trainable_state(), str(out / "start.safetensors"))
    letters, local_means = build_scorer(LETTERS), []

    def reward(prompts, completions):
        scores = letters.score(prompts, completions)
        local_means.append(sum(scores) / len(scores))
        return scores

    trainer = make_trainer(model, out / "trainer", reward_fn=reward, accelerator=acc, max_steps=STEPS,
                           save_steps=2, learning_rate=1e-2)
    trainer.train()
    save_file(model.trainable_state(), str(out / f"rank{rank}.safetensors"))
    (out / f"scores{rank}.json").write_text(json.dumps(local_means))

    run_recipe(recipe, RunOptions(overrides=[], output_dir=out / "runs", run_id="ddp"))


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
