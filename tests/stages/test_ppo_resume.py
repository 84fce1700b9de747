"""A PPO run killed after a checkpoint and resumed with --resume logs exactly the metrics of the uninterrupted run
and ends with the same adapter: weights, optimizer, scheduler, adaptive KL coefficient, data order and sampling
seeds all continue where they were."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from common.tracking import read_metrics
from recipes.runner import RunOptions, run_recipe
from tests.stages.test_ppo_training import ppo_recipe, write_recipe

KILL = {"at_step": None, "calls": 0}


class Killed(Exception):
    """Stands for the process being killed (SIGKILL, a node lost) in the middle of a step."""


def letters_until_killed(prompts: list[str], completions: list[str]) -> list[float]:
    """The number of lowercase letters; called once per step, it raises in step KILL["at_step"]."""
    KILL["calls"] += 1
    if KILL["calls"] == KILL["at_step"]:
        raise Killed(f"killed in step {KILL['calls']}")
    return [float(sum("a" <= ch <= "z" for ch in c)) for c in completions]


def run(path, output_dir, kill_at: int | None = None, resume: bool = False):
    KILL.update(at_step=kill_at, calls=0)
    return run_recipe(path, RunOptions(overrides=[], output_dir=output_dir, run_id="r", resume=resume))


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(("time", "perf/"))} for r in rows]


def test_killed_and_resumed_run_reproduces_the_uninterrupted_one(tmp_path, caplog):
    reward = {"scorer": "python", "function": "tests.stages.test_ppo_resume:letters_until_killed", "batched": True}
    # An adaptive KL coefficient (its state must survive), a decaying learning rate (the scheduler's too) and an
    # epoch of 12 prompts spanning steps (the data order too).
    args = {"max_steps": 5, "save_steps": 2, "kl_target": 0.5, "kl_horizon": 50, "lr_scheduler_type": "linear"}
    path = write_recipe(tmp_path, ppo_recipe(tmp_path, args, reward=reward))
    whole = run(path, tmp_path / "whole").stage_dir("ppo")

    with pytest.raises(Killed):
        run(path, tmp_path / "killed", kill_at=4)
    stage = tmp_path / "killed" / "t" / "r" / "ppo"
    assert [r["step"] for r in read_metrics(stage / "metrics.jsonl")] == [1, 2, 3]
    assert sorted(p.name for p in (stage / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert not (stage / "done.json").exists()

    # A checkpoint the kill tore while it was written: passed over, and said so.
    (stage / "checkpoints" / "checkpoint-4.partial").mkdir()
    with caplog.at_level("WARNING", logger="ppo.trainer"):
        run(path, tmp_path / "killed", resume=True)
    assert any("checkpoint-4.partial: the run was stopped while it was written" in r.message for r in caplog.records)
    resumed, expected = read_metrics(stage / "metrics.jsonl"), read_metrics(whole / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5], "step 3 was logged once, by the resumed run"
    assert comparable(resumed) == comparable(expected)
    assert len({r["kl/coef"] for r in expected}) == 5, "the adaptive coefficient moved every step"
    samples = [json.loads(line) for line in (stage / "samples.jsonl").read_text().splitlines()]
    assert samples == [json.loads(line) for line in (whole / "samples.jsonl").read_text().splitlines()]
    for part in ("adapter/adapter_model.safetensors", "value/value_head.safetensors"):
        a, b = load_file(stage / part), load_file(whole / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
