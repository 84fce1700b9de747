"""The critic-free stage (`kind: grpo`) on the tiny in-process model: a learnable reward rises under every advantage
estimator with the KL bounded; a weighted sum of sources is logged per source; the adapter roles hold (reference and
base unchanged, only the policy trained, no value head); QLoRA trains; a killed run resumes to the uninterrupted
run's metrics; bad recipes fail with one line naming the key."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from peft import get_peft_model_state_dict

from common.errors import InputError
from common.generation import response_logprobs
from common.models import load_tokenizer, resolve_model
from common.tracking import Tracker, read_metrics
from ppo.adapters import POLICY, REFERENCE, OneBaseModel
from ppo.grpo_config import GRPOArgs
from ppo.grpo_trainer import GRPOTrainer, RewardTerm
from ppo.trainer import rollout_prompts
from preferences.scorers import build_scorer
from recipes.cli import main
from recipes.runner import RunOptions, load, run_recipe
from tests.stages.test_ppo_adapters import (
    DEVICE,
    MODEL,
    assert_reference_fixed_and_policy_moved,
    changed,
    fixed_batch,
    role_logprobs,
    snapshot,
)
from tests.stages.test_ppo_resume import Killed, comparable, run
from tests.stages.test_ppo_training import LETTERS, TOPICS, write_prompts, write_recipe

FAST_ARGS = {"max_steps": 2, "prompts_per_step": 4, "group_size": 4, "minibatch_size": 16, "max_new_tokens": 6,
             "temperature": 1.0, "learning_rate": 1e-2, "num_iterations": 2, "save_steps": 100, "sample_every": 1,
             "lr_scheduler_type": "constant"}
STEP_METRICS = ["objective/scores", "objective/kl", "objective/non_score_reward", "objective/rlhf_reward",
                "objective/entropy", "objective/group_std", "objective/no_signal_fraction", "policy/approxkl_avg",
                "policy/clipfrac_avg", "loss/policy_avg", "loss/kl_avg", "val/ratio", "val/num_eos_tokens", "kl/coef",
                "time/rollout", "time/train", "perf/tokens_per_s"]


def grpo_recipe(tmp_path, args: dict | None = None, reward=None, **stage) -> dict:
    write_prompts(tmp_path / "prompts.jsonl")
    return {
        "name": "t",
        "model": {"base": "tiny-random-llama", "dtype": "float32", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "stages": {"grpo": {"kind": "grpo", "data": {"path": "prompts.jsonl", "test_size": 0},
                            "reward": reward or LETTERS, "args": FAST_ARGS | (args or {})} | stage},
    }


def make_trainer(model: OneBaseModel, stage_dir, model_cfg=MODEL, accelerator=None, reward_fn=None,
                 **args) -> GRPOTrainer:
    tokenizer = load_tokenizer(resolve_model(model_cfg.base))
    prompts = rollout_prompts(tokenizer, [f"Write about {t}." for t in TOPICS], "prompts")
    stage_dir.mkdir(parents=True, exist_ok=True)
    accelerator = accelerator or Accelerator(cpu=DEVICE.type == "cpu")
    rewards = [RewardTerm("letters", 1.0, reward_fn or build_scorer(LETTERS).score)]
    return GRPOTrainer(GRPOArgs(**(FAST_ARGS | args)), model, tokenizer, prompts, rewards, accelerator,
                       Tracker(stage_dir, is_main=accelerator.is_main_process), stage_dir, seed=0)


@pytest.mark.parametrize("advantage", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
def test_learnable_reward_rises_with_bounded_kl_for_every_advantage(tmp_path, advantage):
    # The reward is a weighted sum: letters (weight 1) and characters (weight 0.01), each logged on its own.
    reward = [{"scorer": "regex", "pattern": "[a-z]", "name": "letters"},
              {"scorer": "length", "weight": 0.01}]
    recipe = grpo_recipe(tmp_path, {"max_steps": 20, "advantage": advantage, "sample_every": 5}, reward=reward)
    stage = run_recipe(write_recipe(tmp_path, recipe), RunOptions(overrides=[], output_dir=tmp_path / "runs")
                       ).stage_dir("grpo")
    rows = read_metrics(stage / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert all(name in r for r in rows for name in STEP_METRICS + ["rewards/letters", "rewards/length"])
    for r in rows:  # the objective is the weighted sum of the logged sources
        assert abs(r["objective/scores"] - (r["rewards/letters"] + 0.01 * r["rewards/length"])) < 1e-5
    letters = [r["rewards/letters"] for r in rows]
    kls = [r["objective/kl"] for r in rows]
    # About 0.45 letters in 6 tokens over the first 4 steps; over the last 4 (seed 42, float32 on an AVX-512 EPYC;
    # other CPUs' kernels sample other streams): grpo 1.78, dr_grpo 1.36, rloo 4.48, reinforce_pp 3.91. Every
    # estimator at least doubles the reward.
    first, last = sum(letters[:4]) / 4, sum(letters[-4:]) / 4
    assert last > 2 * first and last > first + 0.6, letters
    assert kls[0] == 0.0, "the first rollout comes from the reference policy itself"
    assert max(kls) < 25.0, kls  # 6 tokens: the k3 penalty keeps the policy within ~4 nats a token
    assert (stage / "adapter" / "adapter_model.safetensors").is_file() and not (stage / "value").exists()
    assert read_metrics(stage / "metrics.jsonl")[-1]["objective/group_std"] > 0


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory):
    from tests.stages.test_ppo_adapters import save_sft_stand_in

    return save_sft_stand_in(tmp_path_factory.mktemp("sft") / "adapter")


def test_roles_after_grpo_steps(sft_adapter, tmp_path):
    model = OneBaseModel.build(MODEL, resolve_model(MODEL.base), sft_adapter, "none", DEVICE)
    assert model.value_head is None
    before = role_logprobs(model)
    assert torch.equal(before[1], before[0]), "the policy starts as the reference (the SFT adapter)"
    base = snapshot(model, lambda n: "lora_" not in n)
    reference = snapshot(model, lambda n: f".{REFERENCE}." in n)
    policy = snapshot(model, lambda n: f".{POLICY}." in n)
    trainer = make_trainer(model, tmp_path)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for n, p in model.peft.named_parameters() if n in policy}, "the policy, nothing else"
    trainer.train()

    assert_reference_fixed_and_policy_moved(model, before, [base, reference])
    assert any(f".{POLICY}." in n for n in changed(policy, model))
    policy_state = get_peft_model_state_dict(model.peft, adapter_name=POLICY)
    assert set(model.trainable_state()) == {f"{POLICY}.{k}" for k in policy_state}, "no value head in checkpoints"


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_the_step_gradient_does_not_depend_on_how_the_minibatch_is_split(sft_adapter, tmp_path, aggregation):
    # One rollout of 16 responses cut to lengths 1 .. 6 tokens, so micro-batches hold different numbers of tokens.
    model = OneBaseModel.build(MODEL, resolve_model(MODEL.base), sft_adapter, "none", DEVICE)
    trainer = make_trainer(model, tmp_path, loss_aggregation=aggregation)
    rollout = trainer.rollout([p for p in trainer.step_prompts(1, 4) for _ in range(4)], 1)[0]
    lengths = torch.tensor([1, 1, 2, 1, 6, 6, 5, 6, 3, 4, 6, 2, 6, 5, 6, 6], device=rollout.ids.device)
    keep = torch.arange(rollout.ids.shape[1] - rollout.start, device=lengths.device) < lengths[:, None]
    rollout.attention[:, rollout.start:] *= keep.to(rollout.attention.dtype)
    advantages = torch.randn(16, 1, generator=torch.Generator().manual_seed(0)).to(rollout.ids.device)
    rollout.advantages = advantages * rollout.mask
    model.train()
    every_row = torch.arange(16, device=rollout.ids.device)

    def gradient(micro_batches: list, shares: list | None = None) -> torch.Tensor:
        trainer.optimizer.zero_grad(set_to_none=True)
        shares = shares or trainer.loss_shares(rollout, micro_batches)
        for rows, share in zip(micro_batches, shares, strict=True):
            trainer.backward(rollout.micro_batch(rows), share)
        return torch.cat([p.grad.flatten() for p in trainer.params])

    whole = gradient([every_row])
    for split in ([4, 4, 4, 4], [3, 13]):
        torch.testing.assert_close(gradient(list(every_row.split(split))), whole)
    # Weighing each micro-batch by 1 / their number (the mean of micro-batch means) is another gradient.
    naive = gradient(list(every_row.split([3, 13])), [0.5, 0.5])
    assert (naive - whole).abs().max() > 100 * (whole.abs().max() * 1.3e-6 + 1e-5)


def test_without_sft_the_reference_is_the_base_with_adapters_disabled(tmp_path):
    from common.models import load_base_model

    model = OneBaseModel.build(MODEL, resolve_model(MODEL.base), None, "none", DEVICE)
    ids, mask, start = fixed_batch()
    plain = load_base_model(MODEL, resolve_model(MODEL.base), training=False).eval().to(DEVICE)
    with torch.no_grad():
        expected = response_logprobs(plain, ids, mask, start, 1.0).logprobs
    make_trainer(model, tmp_path).train()
    with torch.no_grad():
        torch.testing.assert_close(model.reference_logprobs(ids, mask, start, 1.0), expected)
        assert (model.policy_forward(ids, mask, start, 1.0).logprobs - expected).abs().max() > 1e-3


def test_qlora_4bit_grpo_trains_every_policy_lora(tmp_path):
    from common.config import LoraSpec, ModelConfig

    cfg = ModelConfig(base="tiny-random-llama", lora=LoraSpec(r=4, alpha=8, dropout=0.0), quantization="4bit",
                      compute_dtype="float32")
    model = OneBaseModel.build(cfg, resolve_model(cfg.base), None, "none", DEVICE)
    lora_b = snapshot(model, lambda n: "lora_B" in n)
    metrics = make_trainer(model, tmp_path, cfg).train()
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert len(changed(lora_b, model)) == len(lora_b), "every policy LoRA B moved"


def test_killed_and_resumed_run_reproduces_the_uninterrupted_one(tmp_path):
    reward = {"python": "tests.stages.test_ppo_resume:letters_until_killed", "batched": True}
    args = {"max_steps": 5, "save_steps": 2, "lr_scheduler_type": "linear"}
    path = write_recipe(tmp_path, grpo_recipe(tmp_path, args, reward=reward))
    whole = run(path, tmp_path / "whole").stage_dir("grpo")
    with pytest.raises(Killed):
        run(path, tmp_path / "killed", kill_at=4)
    stage = tmp_path / "killed" / "t" / "r" / "grpo"
    assert [r["step"] for r in read_metrics(stage / "metrics.jsonl")] == [1, 2, 3]
    run(path, tmp_path / "killed", resume=True)
    resumed, expected = read_metrics(stage / "metrics.jsonl"), read_metrics(whole / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    assert comparable(resumed) == comparable(expected)
    assert len({r["train/learning_rate"] for r in expected}) == 5, "the schedule decayed every step"
    assert "rewards/letters_until_killed" in expected[0]


@pytest.mark.parametrize("overrides, message", [
    (["stages.grpo.args.group_size=1"], r"^recipe: stages.grpo.args.group_size must be >= 2, got 1"),
    (["stages.grpo.args.advantage=ppo"], r"stages.grpo.args.advantage must be 'grpo' \| 'dr_grpo' \| 'rloo'"),
    (["stages.grpo.args.loss_aggregation=mean"], r"stages.grpo.args.loss_aggregation must be 'token'"),
    (["stages.grpo.args.kl_estimator=k1"], r"stages.grpo.args.kl_estimator must be 'k3' \| 'k2'"),
    (["stages.grpo.args.minibatch_size=5"], r"minibatch_size \(5\) must divide prompts_per_step \* group_size"),
    (["stages.grpo.args.epsilon_high=0"], r"stages.grpo.args.epsilon_high must be > 0"),
    (["stages.grpo.reward={weight: 2}"], r"stages.grpo.reward has no reward source; give exactly one of"),
    (["stages.grpo.reward=[{scorer: vader}, {name: x}]"], r"stages.grpo.reward\[1\] has no reward source"),
    (["stages.grpo.reward=null"], r"stages.grpo needs a reward block"),
    (["stages.grpo.reward=[vader]"], r"stages.grpo.reward must be dict\[str, Any\] \| list\[dict\[str, Any\]\]"),
    (["stages.grpo.reward=[{scorer: vader}, {scorer: vader}]"], r"two sources are named \['vader'\]"),
    (["stages.grpo.reward={python: 'nowhere_at_all:f'}"], r"stages.grpo.reward.function: .*nowhere_at_all"),
    (["stages.grpo.reward={stage: nowhere}"], r"unknown key 'nowhere' at stages.grpo"),
])
def test_bad_recipes_name_the_key_and_the_fix(tmp_path, overrides, message):
    with pytest.raises(InputError, match=message):
        load(write_recipe(tmp_path, grpo_recipe(tmp_path)), overrides)


def test_cli_rejects_a_group_of_one_with_exit_code_2_and_writes_nothing(tmp_path, capsys):
    path = write_recipe(tmp_path, grpo_recipe(tmp_path, {"group_size": 1}))
    assert main(["run", str(path), "--output-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stages.grpo.args.group_size must be >= 2, got 1" in err[0]
    assert not (tmp_path / "runs").exists()
