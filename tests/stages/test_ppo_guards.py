"""Guards: a step with non-finite rewards or log-probs is skipped and counted, K in a row stop the run; a KL above
the ceiling stops it before the update and sets aside the checkpoint holding that policy, so --resume takes the last
good one."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from common.models import resolve_model
from common.tracking import read_metrics
from ppo.adapters import REFERENCE, OneBaseModel
from ppo.checkpoint import latest_checkpoint
from ppo.trainer import TrainingStopped
from preferences.scorers import build_scorer
from tests.stages.test_ppo_adapters import DEVICE, MODEL, make_trainer, save_sft_stand_in
from tests.stages.test_ppo_training import LETTERS


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory):
    return save_sft_stand_in(tmp_path_factory.mktemp("sft") / "adapter")


def build() -> OneBaseModel:
    torch.manual_seed(0)  # the fresh policy LoRA's initialisation
    return OneBaseModel.build(MODEL, resolve_model(MODEL.base), None, "shared", DEVICE)


def test_a_nonfinite_reward_skips_the_step_and_training_goes_on(tmp_path):
    letters = build_scorer(LETTERS)

    def nan_on_the_second_call(prompts, completions):
        nan_on_the_second_call.calls += 1
        scores = letters.score(prompts, completions)
        return [math.nan] + scores[1:] if nan_on_the_second_call.calls == 2 else scores

    nan_on_the_second_call.calls = 0
    model = build()
    trainer = make_trainer(model, tmp_path, reward_fn=nan_on_the_second_call, max_steps=3, learning_rate=1e-2)
    trainer.train()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["guard/nonfinite_steps"] for r in rows] == [0, 1, 1]
    assert "objective/scores" not in rows[1], "a skipped step logs only the guard"
    assert all(math.isfinite(v) for r in rows for v in r.values())
    assert trainer.nonfinite_in_a_row == 0, "a good step resets the count"


def test_a_skipped_step_still_advances_the_learning_rate_schedule(tmp_path):
    letters = build_scorer(LETTERS)

    def nan_at_first(prompts, completions):
        nan_at_first.calls += 1
        scores = letters.score(prompts, completions)
        return [math.nan] * len(scores) if nan_at_first.calls == 1 else scores

    nan_at_first.calls = 0
    trainer = make_trainer(build(), tmp_path, reward_fn=nan_at_first, max_steps=3, learning_rate=3e-3)
    trainer.train()
    # 2 PPO epochs x 8 / 4 minibatches = 4 optimizer steps a PPO step, 12 in all, linear decay from 3e-3 to 0. Step 1
    # is skipped, yet after step 2 the schedule stands at 8 of 12, as in a run where step 1 trained:
    # 3e-3 * (12 - 8) / 12 = 1e-3 (not 3e-3 * 8 / 12 = 2e-3, and the run would end at 1e-3 rather than 0).
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["guard/nonfinite_steps"] for r in rows] == [1, 1, 1]
    assert rows[1]["train/learning_rate"] == pytest.approx(1e-3, abs=1e-12)
    assert rows[2]["train/learning_rate"] == 0.0


@pytest.mark.parametrize("broken", ["reward", "reference"])
def test_k_nonfinite_steps_in_a_row_stop_the_run_without_touching_the_weights(tmp_path, sft_adapter, broken):
    torch.manual_seed(0)
    model = OneBaseModel.build(MODEL, resolve_model(MODEL.base), sft_adapter, "shared", DEVICE)
    reward_fn = None
    if broken == "reward":  # a reward model gone bad: every score NaN
        reward_fn = lambda prompts, completions: [math.nan] * len(prompts)  # noqa: E731
    else:  # a reference with one NaN weight: every reference log-prob NaN
        weight = next(p for n, p in model.peft.named_parameters() if f"lora_B.{REFERENCE}" in n)
        with torch.no_grad():
            weight[0, 0] = math.nan
    before = model.trainable_state()
    trainer = make_trainer(model, tmp_path, reward_fn=reward_fn, max_steps=10, max_nonfinite_steps=2)
    with pytest.raises(TrainingStopped, match=r"2 steps in a row had non-finite scores, log-probs or values"):
        trainer.train()
    after = model.trainable_state()
    assert all(torch.equal(before[k], after[k]) for k in before), "no update was applied"
    assert [r["guard/nonfinite_steps"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_kl_ceiling_stops_before_the_update_and_keeps_the_last_good_checkpoint(tmp_path):
    fast = {"max_steps": 3, "learning_rate": 3e-2, "save_steps": 1}
    make_trainer(build(), tmp_path / "probe", **fast).train()
    kl = [r["objective/kl"] for r in read_metrics(tmp_path / "probe" / "metrics.jsonl")]
    # The first rollout is the reference's own (KL 0); the policy then drifts further at every step.
    assert kl[0] == 0 < kl[1] < kl[2], kl
    ceiling = (kl[1] + kl[2]) / 2

    model = build()
    trainer = make_trainer(model, tmp_path / "run", kl_ceiling=ceiling, **fast)
    with pytest.raises(TrainingStopped, match=r"objective/kl = .* at step 3 exceeds args.kl_ceiling") as stop:
        trainer.train()
    checkpoints = tmp_path / "run" / "checkpoints"
    # checkpoint-2 holds the policy sampled at step 3, the one over the ceiling: set aside, not deleted.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-1", "checkpoint-2.kl-ceiling"]
    assert latest_checkpoint(checkpoints) == checkpoints / "checkpoint-1"
    assert "checkpoint-1" in str(stop.value)
    # Nothing was applied after the breach: the weights are still those of the set-aside checkpoint.
    saved = load_file(checkpoints / "checkpoint-2.kl-ceiling" / "trainable.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in model.trainable_state().items())
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["step"] == 3 and rows[-1]["guard/kl_ceiling_exceeded"] == 1.0
