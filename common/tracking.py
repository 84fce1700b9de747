"""Metrics: `metrics.jsonl` always; any of accelerate's trackers when the recipe's `report_to` asks.

The backends are accelerate's (`accelerate.tracking`: tensorboard, wandb, mlflow, trackio, aim, comet_ml, clearml,
dvclive, swanlab), the writers `Accelerator(log_with=...)` uses; the lab only picks where each writes. Every backend
receives the same namespaced names (`loss/train`, `loss/eval`, `objective/kl`, ...), so a plot in tensorboard, a
curve in the report and a line of metrics.jsonl agree. trl / transformers stages log through `MetricsCallback`,
which renames the Trainer's keys once, here.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker, get_available_trackers
from transformers import TrainerCallback

from common.errors import InputError

BACKENDS = tuple(LOGGER_TYPE_TO_CLASS)

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
        if n not in {str(t) for t in get_available_trackers()}:
            raise InputError(f"recipe: {where} asks for {n}, which is not installed; `pip install {n}` in the "
                             "venv or remove it from report_to")
    return names


class Tracker:
    """Writes metrics on the main process only; a no-op elsewhere."""

    def __init__(self, stage_dir: Path, report_to: list[str] = (), run_name: str = "", is_main: bool = True,
                 config: dict | None = None):
        self.is_main = is_main
        self.path = stage_dir / "metrics.jsonl"
        self.backends: list[GeneralTracker] = []
        if not is_main:
            return
        stage_dir.mkdir(parents=True, exist_ok=True)
        for name in report_to:
            self.backends.append(open_backend(name, stage_dir, run_name, config or {}))

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.is_main:
            return
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": round(time.time(), 3), **clean}) + "\n")
        for backend in self.backends:
            backend.log(clean, step=step)

    def close(self) -> None:
        for backend in self.backends:
            backend.finish()
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


def open_backend(name: str, stage_dir: Path, run_name: str, config: dict) -> GeneralTracker:
    """Start accelerate's tracker `name` for one stage, with the stage's config as its hyperparameters.

    A tracker that writes files (tensorboard, aim) writes them in `<stage>/<name>/`, inside the run directory; the
    others are named `run_name` (`<recipe>/<stage>`: wandb's project, mlflow's experiment, ...). MLflow, unless
    MLFLOW_TRACKING_URI names a server, gets a file store in `<stage>/mlruns`: it works offline and travels with the
    run directory.
    """
    tracker_class = LOGGER_TYPE_TO_CLASS[name]
    if tracker_class.requires_logging_directory:
        tracker = tracker_class(name, stage_dir)
    else:
        if name == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
            import mlflow

            mlflow.set_tracking_uri((stage_dir / "mlruns").resolve().as_uri())
        tracker = tracker_class(run_name)
    tracker.start()
    # Hyperparameter tables take scalars only (tensorboard's add_hparams refuses lists): anything else as its text.
    tracker.store_init_configuration({k: v if isinstance(v, (bool, int, float, str)) or v is None else str(v)
                                      for k, v in config.items()})
    return tracker
