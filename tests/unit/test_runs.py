"""Run directories: never overwritten by accident, done-markers written last, manifests complete."""

from __future__ import annotations

import json

import pytest

from common.errors import InputError
from common.runs import Run, StageResult, atomic_write_text
from recipes.runner import load


def make_run(recipe_file, tmp_path, **kw) -> Run:
    recipe, raw = load(recipe_file(), [])
    return Run.create(recipe, "name: t\n", raw, ["seed=1"], output_dir=tmp_path / "runs", **kw)


def test_header_files_and_manifest(recipe_file, tmp_path):
    run = make_run(recipe_file, tmp_path, run_id="r1")
    assert run.root == tmp_path / "runs" / "t" / "r1"
    assert (run.root / "recipe.yaml").read_text() == "name: t\n"
    assert "lora" in (run.root / "resolved.yaml").read_text()
    manifest = json.loads((run.root / "manifest.json").read_text())
    assert manifest["seed"] == 42 and manifest["overrides"] == ["seed=1"]
    assert manifest["packages"]["torch"].startswith("2.") and manifest["hardware"]["cpus"] >= 1
    (data,) = manifest["data"].values()
    assert len(data["sha256"]) == 64


def test_existing_run_is_never_overwritten_without_a_flag(recipe_file, tmp_path):
    run = make_run(recipe_file, tmp_path, run_id="r1")
    (run.root / "sft").mkdir()
    (run.root / "sft" / "keep.txt").write_text("precious")
    with pytest.raises(InputError, match="already exists; pass --resume"):
        make_run(recipe_file, tmp_path, run_id="r1")
    assert (run.root / "sft" / "keep.txt").read_text() == "precious"
    resumed = make_run(recipe_file, tmp_path, run_id="r1", resume=True)
    assert (resumed.root / "sft" / "keep.txt").exists(), "resume keeps what was written"
    assert len(list(run.root.glob("manifest*.json"))) == 2, "a resume adds a dated manifest beside the first"
    make_run(recipe_file, tmp_path, run_id="r1", overwrite=True)
    assert not (run.root / "sft").exists()


def test_done_marker_carries_the_config_hash(recipe_file, tmp_path):
    run = make_run(recipe_file, tmp_path, run_id="r1")
    assert not run.is_done("sft")
    run.mark_done("sft", StageResult(outputs={"adapter": "adapter"}, metrics={"loss/eval": 1.0}), 3.0)
    assert run.is_done("sft")
    assert run.output("sft", "adapter") == run.root / "sft" / "adapter"
    recipe, _ = load(recipe_file(), ["stages.sft.args.max_steps=9"])
    assert not Run(run.root, recipe).is_done("sft"), "a changed config is not done"


def test_atomic_write_leaves_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "f.json"
    atomic_write_text(path, "old")
    with pytest.raises(TypeError):
        atomic_write_text(path, 123)  # a write that fails half-way
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_resume_skips_a_checkpoint_killed_while_saving(tmp_path):
    from common.runs import last_complete_checkpoint

    assert last_complete_checkpoint(tmp_path / "none") is None
    for step, complete in [(9, True), (10, True), (12, False)]:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_text("w")
        if complete:  # the Trainer writes trainer_state.json last
            (folder / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10"), "numeric order, partial skipped"
