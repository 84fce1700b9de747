"""Metrics: `metrics.jsonl` always; tensorboard / mlflow / wandb when the recipe's `report_to` asks.

Every backend receives the same namespaced names (`loss/train`, `loss/eval`, `objective/kl`, ...), so a
plot in tensorboard, a curve in the report and a line of metrics.jsonl agree. trl / transformers stages
log through `MetricsCallback`, which renames the Trainer's keys once, here.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from common.errors import InputError

BACKENDS = ("tensorboard", "mlflow", "wandb")

# Trainer key -> lab name; any other `eval_x` becomes `eval/x`, a key with a '/' is kept, the rest `train/x`.
TRAINER_NAMES = {
    "loss": "loss/train",
    "eval_loss": "loss/eval",
    "train_loss": "loss/train_mean",
    "train_runtime": "time/train",
    "eval_runtime": "time/eval",
    "train_samples_per_second": "perf/samples_per_s",
    "train_steps_per_second": "perf/steps_per_s",
    "eval_samples_per_second": "perf/eval_samples_per_s",
    "eval_steps_per_second": "perf/eval_steps_per_s",
}


def lab_name(key: str) -> str:
    if key in TRAINER_NAMES:
        return TRAINER_NAMES[key]
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_"):]
    return key if "/" in key else "train/" + key


def check_report_to(report_to: list[str] | str | None, where: str) -> list[str]:
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    names = [n for n in names if n != "none"]
    for n in names:
        if n not in BACKENDS:
            raise InputError(f"recipe: {where}: unknown tracker '{n}'; use any of {', '.join(BACKENDS)} or none")
        if importlib.util.find_spec(n) is None:
            raise InputError(f"recipe: {where} asks for {n}, which is not installed; `pip install {n}` in the "
                             "venv or remove it from report_to")
    return names


class Tracker:
    """Writes metrics on the main process only; a no-op elsewhere."""

    def __init__(self, stage_dir: Path, report_to: list[str] = (), run_name: str = "", is_main: bool = True,
                 config: dict | None = None):
        self.is_main = is_main
        self.path = stage_dir / "metrics.jsonl"
        self.backends: list[Any] = []
        if not is_main:
            return
        stage_dir.mkdir(parents=True, exist_ok=True)
        for name in report_to:
            self.backends.append(_open_backend(name, stage_dir, run_name, config or {}))

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.is_main:
            return
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": round(time.time(), 3), **clean}) + "\n")
        for backend in self.backends:
            backend.log(clean, step)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsCallback(TrainerCallback):
    """Forwards the Trainer's logs to a Tracker under lab names. With `perplexity=True` (a token-level language
    modelling loss, as in SFT) it adds eval/perplexity = exp(eval loss); for other losses it means nothing."""

    def __init__(self, tracker: Tracker, perplexity: bool = False):
        self.tracker = tracker
        self.perplexity = perplexity
        self.last: dict[str, float] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        # Resumed from a checkpoint, the state holds what was logged before it: a run killed after its last
        # checkpoint resumes with no step left to train and would otherwise end without its final training metrics.
        for logs in state.log_history:
            self.last.update({lab_name(k): v for k, v in logs.items()
                              if k != "step" and isinstance(v, (int, float))})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        metrics = {lab_name(k): v for k, v in logs.items()}
        if self.perplexity and "loss/eval" in metrics:
            metrics["eval/perplexity"] = math.exp(min(metrics["loss/eval"], 50.0))
        self.last.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        self.tracker.log(metrics, state.global_step)


class _TensorBoard:
    def __init__(self, stage_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(stage_dir / "tensorboard"))

    def log(self, metrics, step):
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class _MLflow:
    def __init__(self, stage_dir: Path, run_name: str, config: dict):
        import mlflow

        # A local file store inside the run: works offline and travels with the run directory.
        mlflow.set_tracking_uri((stage_dir / "mlruns").resolve().as_uri())
        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=run_name)
        mlflow.log_params({k: str(v)[:250] for k, v in config.items()})

    def log(self, metrics, step):
        # mlflow metric names may not contain some characters; '/' is allowed.
        self.mlflow.log_metrics(metrics, step=step)

    def close(self):
        self.mlflow.end_run()


class _Wandb:
    def __init__(self, stage_dir: Path, run_name: str, config: dict):
        import wandb

        self.run = wandb.init(name=run_name, dir=str(stage_dir), config=config, reinit=True)

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def close(self):
        self.run.finish()


def _open_backend(name: str, stage_dir: Path, run_name: str, config: dict):
    if name == "tensorboard":
        return _TensorBoard(stage_dir)
    if name == "mlflow":
        return _MLflow(stage_dir, run_name, config)
    return _Wandb(stage_dir, run_name, config)
