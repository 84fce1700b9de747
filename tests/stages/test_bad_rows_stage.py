"""Degenerate preference rows dropped under data.bad_rows: drop reach the stage's done record."""

from __future__ import annotations

import json

import yaml

from recipes.runner import RunOptions, run_recipe
from tests.conftest import write_jsonl
from tests.unit.test_bad_rows import hh_rows


def test_a_dpo_stage_records_the_dropped_rows_in_its_done_metrics(recipe_file, tmp_path):
    """Through a whole (one-step) DPO stage on a local HH-style file with bad_rows: drop."""
    rows = hh_rows() * 2  # rows 2, 4, 5, 7, 9, 10 are degenerate
    write_jsonl(tmp_path / "hh.jsonl", rows)
    recipe = yaml.safe_load(recipe_file().read_text())
    recipe["stages"] = {"dpo": {"kind": "dpo", "data": {"path": "hh.jsonl", "test_size": 0.0, "bad_rows": "drop"},
                                "args": {"max_steps": 1, "per_device_train_batch_size": 2, "save_strategy": "no"}}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run = run_recipe(path, RunOptions(overrides=[], output_dir=tmp_path / "runs"))
    metrics = json.loads((run.stage_dir("dpo") / "done.json").read_text())["metrics"]
    assert metrics["data/bad_rows_dropped"] == 6 and metrics["data/first_bad_row"] == 2
