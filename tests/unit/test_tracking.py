"""Tracking: what accelerate's TensorBoard tracker actually wrote, read back from its event file, under the lab's
metric names; the Trainer's keys renamed once; report_to checked against accelerate's trackers."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from common.errors import InputError
from common.tracking import MetricsCallback, Tracker, check_report_to, lab_name, read_metrics


def test_tensorboard_event_file_holds_the_logged_scalars_under_the_lab_names(tmp_path):
    tracker = Tracker(tmp_path, ["tensorboard"], "t/sft", config={"learning_rate": 1e-3, "loss_type": ["sigmoid"],
                                                                   "max_length": None})
    callback = MetricsCallback(tracker)
    # What a Trainer logs at two steps, and a PPO-style metric logged directly.
    for step, loss in ((1, 2.5), (2, 1.25)):
        callback.on_log(None, type("State", (), {"global_step": step})(), None, logs={"loss": loss, "grad_norm": 0.5})
    tracker.log({"objective/kl": 0.125, "note": "text is not a metric"}, 2)
    tracker.close()

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert scalars == {"loss/train": [(1, 2.5), (2, 1.25)], "train/grad_norm": [(1, 0.5), (2, 0.5)],
                       "objective/kl": [(2, 0.125)]}
    # metrics.jsonl holds the same numbers under the same names.
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r.get("loss/train"), r.get("objective/kl")) for r in rows] == [
        (1, 2.5, None), (2, 1.25, None), (2, None, 0.125)]


def test_trainer_keys_become_lab_names():
    assert [lab_name(k) for k in ("loss", "eval_loss", "train_runtime", "eval_rewards/accuracies", "rewards/margins",
                                  "grad_norm")] == ["loss/train", "loss/eval", "time/train", "eval/rewards/accuracies",
                                                    "rewards/margins", "train/grad_norm"]


def test_report_to_names_accelerates_trackers_and_needs_them_installed():
    assert check_report_to(["tensorboard", "none"], "report_to") == ["tensorboard"]
    with pytest.raises(InputError, match=r"recipe: report_to: unknown tracker 'tensorbored'; use any of .*trackio"):
        check_report_to(["tensorbored"], "report_to")
