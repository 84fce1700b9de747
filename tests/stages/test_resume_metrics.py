"""A Trainer stage killed mid-run and resumed with --resume writes the metrics.jsonl of the uninterrupted run: every
step once, never past max_steps, with the running totals (trl's num_tokens, the mean training loss) carried over the
resume; the torn checkpoint it passes over is named in the log."""

from __future__ import annotations

import logging

import pytest
import yaml
from trl import SFTTrainer

from common.tracking import read_metrics
from recipes.runner import RunOptions, run_recipe


class Killed(Exception):
    """Stands for the process being killed (SIGKILL) in the middle of a step."""


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith(("time/", "perf/"))} for r in rows]


def test_resumed_sft_metrics_read_as_the_uninterrupted_run(recipe_file, tmp_path, monkeypatch, caplog):
    path = recipe_file()
    recipe = yaml.safe_load(path.read_text())
    recipe["stages"]["sft"]["args"].update(max_steps=6, save_strategy="steps", save_steps=2, logging_steps=1)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))

    def run(output: str, resume: bool = False):
        return run_recipe(path, RunOptions(overrides=[], output_dir=tmp_path / output, run_id="r", resume=resume))

    whole = read_metrics(run("whole").stage_dir("sft") / "metrics.jsonl")

    step = SFTTrainer.training_step
    calls = {"n": 0}

    def killed_in_step_6(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise Killed
        return step(self, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "training_step", killed_in_step_6)
    with pytest.raises(Killed):
        run("killed")
    monkeypatch.setattr(SFTTrainer, "training_step", step)
    stage = tmp_path / "killed" / "t" / "r" / "sft"
    assert [r["step"] for r in read_metrics(stage / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    # A checkpoint torn by the kill while saving (its trainer_state.json, written last, missing).
    torn = stage / "checkpoints" / "checkpoint-4"
    (torn / "trainer_state.json").unlink()

    with caplog.at_level(logging.WARNING, logger="common.runs"):
        run("killed", resume=True)
    assert f"passing over {torn}: its trainer_state.json is missing or cut short" in caplog.text
    resumed = read_metrics(stage / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [r["step"] for r in whole] == [1, 2, 3, 4, 5, 6, 6, 6]
    assert [sorted(r) for r in resumed] == [sorted(r) for r in whole]
    for got, want in zip(comparable(resumed), comparable(whole), strict=True):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-6), got["step"]
    assert [r["train/num_tokens"] for r in resumed if "train/num_tokens" in r] == sorted(
        {r["train/num_tokens"] for r in whole if "train/num_tokens" in r}), "the token count keeps growing"
