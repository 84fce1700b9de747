"""A run stopped by a full disk or by a data file removed mid-run: one line naming the stage and the command that
resumes it, a distinct exit code, earlier stages kept, and that command finishes the run as if nothing happened."""

from __future__ import annotations

import errno
import json
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from common.errors import DiskFullError, InputError, disk_full
from common.runs import Run, last_complete_checkpoint, resumable
from recipes.cli import main
from recipes.stages import STAGE_KINDS, StageKind
from tests.conftest import sft_rows, write_jsonl


@pytest.fixture
def two_stages(recipe_file, tmp_path) -> list[str]:
    """`sft`, then `sft2` from it on its own file with a checkpoint every 2 of 4 steps; the arguments of `run`."""
    path = recipe_file()
    recipe = yaml.safe_load(path.read_text())
    recipe["stages"]["sft2"] = {"kind": "sft", "from": "sft", "data": {"path": "sft2.jsonl", "test_size": 0.25},
                                "args": {"max_steps": 4, "per_device_train_batch_size": 4, "logging_steps": 1,
                                         "learning_rate": 1e-3, "save_strategy": "steps", "save_steps": 2}}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    write_jsonl(tmp_path / "sft2.jsonl", sft_rows(16))
    return [str(path), "--output-dir", str(tmp_path / "runs"), "--set", "stages.sft.args.max_steps=2"]


def error_line(capsys) -> str:
    """The command's last line on stderr, which must be its only error line."""
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if line.startswith("alignlab: error: ")] == err[-1:], err[-5:]
    return err[-1]


def resume_argv(line: str) -> list[str]:
    """The command the error line says to run, as arguments of `alignlab`."""
    return shlex.split(line.split("then resume: ", 1)[1])[1:]


def final_metrics(root: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text())["metrics"] for p in sorted(root.glob("*/done.json"))}


def test_disk_full_in_a_checkpoint_stops_resumably_and_resume_matches(two_stages, tmp_path, capsys, monkeypatch):
    root = tmp_path / "runs" / "t" / "r"
    torn = root / "sft2" / "checkpoints" / "checkpoint-4"
    save = torch.save

    def full_disk_once(obj, f, *args, **kwargs):
        if str(f).startswith(str(torn)):
            monkeypatch.setattr(torch, "save", save)
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_once)
    assert main(["run", *two_stages, "--run-id", "r"]) == DiskFullError.exit_code == 3
    line = error_line(capsys)
    assert line.startswith(f"alignlab: error: disk full while running stage 'sft2' of {root} ({torn}/"), line
    assert ": free space, then resume: alignlab run " in line and line.endswith("--resume --run-id r")
    sft_done = (root / "sft" / "done.json").read_bytes()
    assert not (root / "sft2" / "done.json").exists(), "the stage the disk filled in is not done"
    assert torn.is_dir() and last_complete_checkpoint(root / "sft2" / "checkpoints") == str(torn.with_name(
        "checkpoint-2")), "the checkpoint torn by the full disk is passed over"

    assert main(resume_argv(line)) == 0
    assert (root / "sft" / "done.json").read_bytes() == sft_done, "the done stage is skipped, its record kept"
    assert main(["run", *two_stages, "--run-id", "clean"]) == 0
    resumed, clean = final_metrics(root), final_metrics(root.with_name("clean"))
    assert resumed.keys() == clean.keys() == {"sft", "sft2"}
    for key, value in clean["sft2"].items():
        if not key.startswith(("time", "perf/", "train/total_flos")):
            assert resumed["sft2"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_data_file_removed_mid_run_stops_resumably(two_stages, tmp_path, capsys, monkeypatch):
    root, data = tmp_path / "runs" / "t" / "r", tmp_path / "sft2.jsonl"
    kept = data.read_text()
    kind = STAGE_KINDS["sft"]

    def train_then_remove(cfg, ctx):
        result = kind.train(cfg, ctx)
        if ctx.name == "sft":  # after the recipe was checked, before sft2 reads its file
            data.unlink()
        return result

    monkeypatch.setitem(STAGE_KINDS, "sft", StageKind(kind.config, train_then_remove))
    assert main(["run", *two_stages, "--run-id", "r"]) == 2
    line = error_line(capsys)
    assert line.startswith(f"alignlab: error: stage 'sft2' of {root} stopped: {data}: data file not found "
                           "(stages.sft2.data); restore it"), line
    assert (root / "sft" / "done.json").is_file() and not (root / "sft2" / "done.json").exists()
    monkeypatch.setitem(STAGE_KINDS, "sft", kind)

    assert main(resume_argv(line)) == 2, "still missing: the recipe check says so"
    assert f"{data}: data file not found (stages.sft2.data)" in error_line(capsys)
    data.write_text(kept)
    assert main(resume_argv(line)) == 0
    assert "done, skipped" in capsys.readouterr().err
    assert all((root / name / "done.json").is_file() for name in ("sft", "sft2"))


def test_a_full_disk_is_recognised_however_the_writer_reports_it(tmp_path, monkeypatch):
    enospc = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise enospc
        except OSError as e:
            raise RuntimeError("checkpoint save failed") from e
    except RuntimeError as e:
        wrapped = e
    assert disk_full(enospc, tmp_path) and disk_full(wrapped, tmp_path)
    assert disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path)
    safetensors_style = Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    assert disk_full(safetensors_style, tmp_path)
    torch_style = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert not disk_full(torch_style, tmp_path) and not disk_full(OSError(errno.EIO, "I/O error"), tmp_path)
    monkeypatch.setattr("shutil.disk_usage", lambda _: type("Usage", (), {"free": 0})())
    assert disk_full(torch_style, tmp_path), "torch.save says only 'unexpected pos': the empty disk tells"
    assert not disk_full(ValueError("bad value"), tmp_path)


def test_a_file_gone_mid_stage_names_it_and_other_errors_pass_through(recipe_file, tmp_path):
    from recipes.runner import load

    run = Run(tmp_path / "run", load(recipe_file(), [])[0])
    with pytest.raises(InputError, match=r"^stage 'sft' of .*/run stopped: /x/a.json is gone \(removed after the "
                                         r"run started\?\); restore it, then resume: CMD$"):
        with resumable(run, "sft", "CMD"):
            open("/x/a.json")
    with pytest.raises(FileNotFoundError, match="fewer processes"), resumable(run, "sft", "CMD"):
        raise FileNotFoundError("written by a run with fewer processes")  # a message of the lab's own, kept
    with pytest.raises(ZeroDivisionError), resumable(run, "sft", "CMD"):
        raise ZeroDivisionError


def test_a_trainer_state_cut_short_by_a_full_disk_is_not_a_complete_checkpoint(tmp_path):
    for step, state in [(2, "{}"), (4, '{"global_step": 4, "log_hist')]:
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
