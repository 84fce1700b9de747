"""Run directories: `runs/<recipe>/<run-id>/` with the recipe as given, the resolved config, a manifest,
and one folder per stage whose `done.json` is written last (atomic rename), so a folder never looks done
when it is not.

Only the main process writes; other processes of a distributed launch read the same paths.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainerCallback

from common.config import Recipe
from common.errors import DiskFullError, InputError, causes, disk_full
from common.schema import to_dict

log = logging.getLogger(__name__)

DONE = "done.json"
PACKAGES = ["alignlab", "torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets",
            "evaluate", "tokenizers", "safetensors", "numpy", "vaderSentiment"]


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


@dataclass
class StageResult:
    """What a stage hands on: output paths relative to its folder (e.g. {"adapter": "adapter"}) and its
    final metrics."""

    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


class Run:
    def __init__(self, root: Path, recipe: Recipe):
        self.root = root
        self.recipe = recipe

    # --- creation ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, recipe: Recipe, raw_text: str, resolved: dict, overrides: list[str], *,
               run_id: str | None = None, resume: bool = False, overwrite: bool = False,
               output_dir: Path | None = None, is_main: bool = True) -> Run:
        run = cls(locate_run(recipe, run_id=run_id, resume=resume, overwrite=overwrite, output_dir=output_dir,
                             is_main=is_main), recipe)
        if is_main:
            run.write_header(raw_text, resolved, overrides, resume)
        return run

    def write_header(self, raw_text: str, resolved: dict, overrides: list[str], resume: bool) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        suffix = time.strftime("%Y%m%d-%H%M%S") if resume and (self.root / "recipe.yaml").exists() else ""
        # A resumed run keeps the first header and adds a dated one, so nothing written before is lost.

        def name(stem: str, ext: str) -> str:
            return f"{stem}.resume-{suffix}{ext}" if suffix else f"{stem}{ext}"

        atomic_write_text(self.root / name("recipe", ".yaml"), raw_text)
        atomic_write_text(self.root / name("resolved", ".yaml"),
                          yaml.safe_dump(to_dict(self.recipe) | {"stages": {
                              k: to_dict(v) for k, v in self.recipe.stages.items()}}, sort_keys=False))
        atomic_write_json(self.root / name("manifest", ".json"), manifest(self.recipe, overrides))

    # --- stages -----------------------------------------------------------------------------------
    def stage_dir(self, name: str) -> Path:
        return self.root / name

    def done_record(self, name: str) -> dict | None:
        path = self.stage_dir(name) / DONE
        return json.loads(path.read_text()) if path.is_file() else None

    def is_done(self, name: str) -> bool:
        record = self.done_record(name)
        return record is not None and record.get("config_hash") == self.recipe.stage_hash(name)

    def mark_done(self, name: str, result: StageResult, seconds: float) -> None:
        atomic_write_json(self.stage_dir(name) / DONE, {
            "stage": name, "kind": self.recipe.stages[name].kind, "config_hash": self.recipe.stage_hash(name),
            "outputs": result.outputs, "metrics": result.metrics, "seconds": round(seconds, 2),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })

    def output(self, stage: str, key: str) -> Path:
        """The path a done stage recorded under `key` (e.g. its adapter)."""
        record = self.done_record(stage)
        if record is None:
            raise InputError(f"stage '{stage}' has not finished in {self.root}; run it first "
                             f"(alignlab run RECIPE --resume --run-id {self.root.name})")
        if key not in record["outputs"]:
            raise InputError(f"stage '{stage}' has no output '{key}' (it has {', '.join(record['outputs'])})")
        return self.stage_dir(stage) / record["outputs"][key]


def locate_run(recipe: Recipe, *, run_id: str | None = None, resume: bool = False, overwrite: bool = False,
               output_dir: Path | None = None, is_main: bool = True) -> Path:
    """The directory of a run, `<output_dir>/<recipe>/<run-id>`: a new one (a timestamp unless `run_id`; an existing
    one is refused, or removed with `overwrite`), or with `resume` the latest (or `run_id`) one, which must exist."""
    base = output_dir or Path(recipe.output_dir)
    for folder in (base, base / recipe.name):
        if folder.exists() and not folder.is_dir():
            raise InputError(f"{folder} is a file, not a directory; runs are written into {base}/"
                             f"{recipe.name}/<run-id>/: give --output-dir (or output_dir) a directory")
    if run_id is None:
        if resume:
            run_id = latest_run_id(base / recipe.name)
            if run_id is None:
                raise InputError(f"--resume: no earlier run of '{recipe.name}' under {base / recipe.name}; "
                                 "start one without --resume")
        else:
            run_id = time.strftime("%Y%m%d-%H%M%S")
    root = base / recipe.name / run_id
    if root.exists() and not resume:
        if not overwrite:
            raise InputError(f"{root} already exists; pass --resume to continue it, --overwrite to replace it, "
                             "or --run-id NEW for a new run")
        if is_main:
            shutil.rmtree(root)
    if resume and not root.exists():
        raise InputError(f"--resume: {root} does not exist; check --run-id or drop --resume")
    return root


# A recipe with `seeds` runs one replica of its chain per seed, each a complete run directory (recipe, manifest,
# stages, report) inside the run's own: runs/<recipe>/<run-id>/seed-<seed>/. Every tool that reads a run directory
# reads a replica as it is; the tools that compare runs also take the multi-seed run's directory for its replicas.
REPLICA_PREFIX = "seed-"


def replica_name(seed: int) -> str:
    return f"{REPLICA_PREFIX}{seed}"


def replica_dirs(root: Path) -> list[Path]:
    """The replicas of a multi-seed run directory, in seed order ([] for a single run's directory); a replica counts
    once its header (manifest.json) is written."""
    found = [p for p in root.glob(f"{REPLICA_PREFIX}*") if p.name[len(REPLICA_PREFIX):].isdigit()
             and (p / "manifest.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(REPLICA_PREFIX):]))


def expand_replicas(roots: list[Path]) -> list[Path]:
    """Run directories as given, a multi-seed run's directory replaced by its replicas' (in seed order)."""
    return [replica for root in roots for replica in (replica_dirs(root) or [root])]


def latest_run_id(recipe_dir: Path) -> str | None:
    runs = sorted(p.name for p in recipe_dir.glob("*") if p.is_dir()) if recipe_dir.is_dir() else []
    return runs[-1] if runs else None


def manifest(recipe: Recipe, overrides: list[str]) -> dict:
    import torch

    from common.data import fingerprint

    data_files = {}
    for name, stage in recipe.stages.items():
        spec = stage.data
        for rel in (spec.path, spec.test_path) if spec else ():
            if rel:
                path = recipe.resolve_path(rel)
                data_files[f"{name}:{rel}"] = {"path": str(path), "sha256": fingerprint(path)}
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "recipe": recipe.name, "seed": recipe.seed, "profile": recipe.profile, "overrides": overrides,
        "command": sys.argv, "cwd": os.getcwd(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "packages": versions, "python": sys.version.split()[0], "git": git_state(),
        "data": data_files,
        "hardware": {
            "platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "world_size": int(os.environ.get("WORLD_SIZE", 1)),
        },
    }


def git_state() -> dict:
    """The commit of the alignlab source tree (and whether it had uncommitted changes)."""
    src = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    return {"commit": commit, "dirty": bool(git("status", "--porcelain")) if commit else None}


@dataclass
class StageContext:
    """Everything a stage's `train(cfg, ctx)` needs besides its own config."""

    run: Run
    name: str
    is_main: bool = True
    resume: bool = False
    # What the stage found reading its inputs (e.g. data/bad_rows_dropped); the runner adds it to the metrics of
    # the stage's done record.
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def recipe(self) -> Recipe:
        return self.run.recipe

    @property
    def dir(self) -> Path:
        return self.run.stage_dir(self.name)

    def input_path(self, stage: str, key: str) -> Path:
        return self.run.output(stage, key)


@contextmanager
def resumable(run: Run, stage: str, resume: str) -> Iterator[None]:
    """End a stage stopped by something fixed outside the lab (a full disk, a file removed after the run started,
    input found wrong only while running) with one line naming the stage and `resume`, the command that continues
    the run. The stage is not marked done and its complete checkpoints stay, so that command picks it up."""
    where = f"stage '{stage}' of {run.root}"
    try:
        yield
    except InputError as e:
        raise InputError(f"{where} stopped: {e}; then resume: {resume}") from e
    except Exception as e:
        if disk_full(e, run.root):
            path = next((f" ({c.filename})" for c in causes(e) if isinstance(c, OSError) and c.filename), "")
            raise DiskFullError(f"disk full while running {where}{path}: free space, then resume: {resume}") from e
        if isinstance(e, FileNotFoundError) and e.filename:
            raise InputError(f"{where} stopped: {e.filename} is gone (removed after the run started?); restore it, "
                             f"then resume: {resume}") from e
        raise


def last_complete_checkpoint(checkpoints: Path, max_steps: int = -1) -> str | None:
    """The newest Trainer checkpoint that was written to the end, for --resume.

    A run killed while saving leaves a `checkpoint-N` folder without its `trainer_state.json`, which the
    Trainer writes last; a full disk can leave that file cut short. Resuming from either fails, so such
    folders are passed over, with a warning naming them. So is a checkpoint past `max_steps` (when set), written
    under an earlier config: resuming from it would log steps past the end.
    """
    done = []
    for path in checkpoints.glob("checkpoint-*"):
        step = int(path.name.rsplit("-", 1)[1])
        if not _reads_as_json(path / "trainer_state.json"):
            log.warning("passing over %s: its trainer_state.json is missing or cut short (the run was stopped while "
                        "saving it); it is not resumed from", path)
        elif 0 < max_steps < step:
            log.warning("passing over %s: it is past max_steps %d", path, max_steps)
        else:
            done.append((step, path))
    return str(max(done)[1]) if done else None


def _reads_as_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def drop_lines_after(path: Path, step: int) -> None:
    """Remove the jsonl rows of steps after `step` (logged by an interrupted run past the checkpoint it resumes
    from; the resumed run logs those steps again)."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))


class CarryCounters(TrainerCallback):
    """Make a resumed Trainer log what the uninterrupted one would: its running totals start again at zero.

    - trl's `num_tokens` (tokens trained on so far, also logged as `eval_num_tokens`) counts from the resume: add
      the count logged at the checkpoint.
    - `train_loss` (the mean training loss, transformers' `_finalize_training`) averages only the steps run since
      the resume: average over every step, weighting each logged `loss` (a mean over its logging interval) by that
      interval's length. Exact when the checkpoint step is a logging step (save_steps a multiple of logging_steps).
    The corrected values also replace those in the state's log history, which later checkpoints save, so a run
    resumed twice carries them on. Goes before the callbacks that write the logs (they read the same dict).
    """

    def __init__(self):
        self.tokens = self.loss_sum = 0.0
        self.start = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = state.global_step
        previous = 0
        for entry in state.log_history:
            if "loss" in entry and entry["step"] <= self.start:
                self.loss_sum += entry["loss"] * (entry["step"] - previous)
                previous = entry["step"]
            if "num_tokens" in entry and entry["step"] <= self.start:
                self.tokens = entry["num_tokens"]

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or self.start == 0:
            return
        # trl logs the tokens trained on so far with the evaluation's metrics too.
        carried = {key: logs[key] + self.tokens for key in ("num_tokens", "eval_num_tokens") if key in logs}
        if "train_loss" in logs and state.global_step > 0:
            run_here = state.global_step - self.start
            carried["train_loss"] = (logs["train_loss"] * run_here + self.loss_sum) / state.global_step
        logs.update(carried)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(carried)


def train_and_evaluate(trainer, ctx: StageContext) -> None:
    """Run a transformers / trl Trainer for a stage: from the newest complete checkpoint on --resume, then one
    evaluation on the held-out split when there is one (its metrics reach metrics.jsonl via the callback).

    On --resume, metrics.jsonl keeps only the lines up to the checkpoint's step and the running totals carry on
    (CarryCounters), so that it reads as the uninterrupted run's: every step once."""
    resume_from = None
    if ctx.resume:
        resume_from = last_complete_checkpoint(ctx.dir / "checkpoints", trainer.args.max_steps)
        step = int(resume_from.rsplit("-", 1)[1]) if resume_from else 0
        log.info("resuming %s from %s", ctx.name, resume_from or "the start (no complete checkpoint)")
        if ctx.is_main:
            drop_lines_after(ctx.dir / "metrics.jsonl", step)
        trainer.callback_handler.callbacks.insert(0, CarryCounters())
    trainer.train(resume_from_checkpoint=resume_from)
    if trainer.eval_dataset is not None:
        trainer.evaluate()
