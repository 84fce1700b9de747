"""The reward_model stage on the tiny in-process model: it learns an easy preference, its saved adapter and head reload
the same way alone (`RewardModel.load`) and on a policy's base (`RewardModel.attach`), it starts from the SFT adapter,
it formats inputs as trl did, and bad pairs stop the CLI before anything is written."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.utils.data import RandomSampler

from common.models import load_trainable_model, resolve_model
from common.runs import Run, StageContext
from recipes.cli import main
from recipes.runner import RunOptions, load, run_recipe
from reward_model.api import HEAD_FILE, RewardModel
from reward_model.stage import build_trainer
from reward_model.trainer import PromptGroupedSampler, prompt_groups
from tests.conftest import sft_rows, write_jsonl

WORDS = "the a film plot cast story scene music light slow long dark old new".split()


def marker_pairs(n: int, seed: int, chat: bool = True) -> list[dict]:
    """Random word salads; the chosen one ends with the marker ':)', the rejected one with ':('. Two pairs per
    prompt (a preference set has several). As chat records (what the preferences stage writes) or as text."""
    rng = random.Random(seed)

    def text() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6)))

    rows = [{"prompt": f"Review film {seed}-{i // 2}.", "chosen": f"{text()} :)", "rejected": f"{text()} :(",
             "score_chosen": 1.0, "score_rejected": 0.0} for i in range(n)]
    if chat:
        rows = [r | {"prompt": [{"role": "user", "content": r["prompt"]}],
                     "chosen": [{"role": "assistant", "content": r["chosen"]}],
                     "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    return rows


def recipe(tmp_path, rm: dict) -> dict:
    write_jsonl(tmp_path / "sft.jsonl", sft_rows(8))
    return {
        "name": "t",
        "model": {"base": "tiny-random-llama", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "stages": {
            "sft": {"kind": "sft", "data": {"path": "sft.jsonl", "test_size": 0},
                    "args": {"max_steps": 1, "per_device_train_batch_size": 4, "save_strategy": "no"}},
            "rm": {"kind": "reward_model", "from": "sft", "data": {"path": "rm.jsonl", "test_path": "rm_test.jsonl"},
                   "args": {"max_steps": 10, "per_device_train_batch_size": 8, "learning_rate": 1e-2,
                            "logging_steps": 4, "save_strategy": "no", "eval_strategy": "no"}} | rm,
        },
    }


def write_recipe(tmp_path, rm: dict | None = None, rows: list[dict] | None = None, chat: bool = True):
    write_jsonl(tmp_path / "rm.jsonl", rows if rows is not None else marker_pairs(40, seed=0, chat=chat))
    write_jsonl(tmp_path / "rm_test.jsonl", marker_pairs(16, seed=1, chat=chat))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(tmp_path, rm or {}), sort_keys=False))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rm")
    return run_recipe(write_recipe(tmp), RunOptions(overrides=[], output_dir=tmp / "runs"))


def test_learns_a_marker_preference_to_90_percent_held_out(trained):
    done = json.loads((trained.stage_dir("rm") / "done.json").read_text())
    assert done["outputs"] == {"reward_model": "reward_model"}
    assert done["metrics"]["eval/accuracy"] >= 0.9
    assert done["metrics"]["eval/gold_accuracy"] >= 0.9
    assert done["metrics"]["eval/gold_pairs"] == 16
    # 16 held-out pairs, thirds of 6, 5 and 5 (equal gold gaps, so held in file order) that make up the whole.
    thirds = [done["metrics"][f"eval/gold_accuracy_{third}_gaps"] for third in ("small", "middle", "large")]
    assert (6 * thirds[0] + 5 * thirds[1] + 5 * thirds[2]) / 16 == pytest.approx(done["metrics"]["eval/gold_accuracy"])
    assert done["metrics"]["eval/margin"] > 0

    saved = trained.stage_dir("rm") / "reward_model"
    config = json.loads((saved / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    weights = load_file(saved / "adapter_model.safetensors")
    head = load_file(saved / HEAD_FILE)
    assert torch.equal(head["weight"], weights["base_model.model.score.weight"])
    assert all("lora_" in k or ".score." in k for k in weights), "only the adapter and the head, not the base"


def test_starts_from_the_sft_adapter_and_formats_inputs_as_trl(trained):
    trainer, splits = build_trainer(trained.recipe.stages["rm"], StageContext(trained, "rm"))
    sft = load_file(trained.stage_dir("sft") / "adapter" / "adapter_model.safetensors")
    params = dict(trainer.model.named_parameters())
    assert sft and all(torch.equal(params[k.replace(".weight", ".default.weight")], v) for k, v in sft.items())
    assert all(params[k].requires_grad for k in params if "lora_" in k or "modules_to_save" in k)
    assert not any(p.requires_grad for k, p in params.items() if "lora_" not in k and "modules_to_save" not in k)

    rm = RewardModel.load(trained.stage_dir("rm") / "reward_model", trained.recipe.model)
    assert rm.chat
    for i in (0, 5):
        row = splits.train[i]
        assert rm.encode(row["prompt"], row["chosen"]) == trainer.train_dataset[i]["chosen_ids"]
        assert rm.encode(row["prompt"], row["rejected"]) == trainer.train_dataset[i]["rejected_ids"]


def test_batches_hold_each_prompts_pairs_together_unless_asked_to_shuffle_pairs(trained):
    trainer, splits = build_trainer(trained.recipe.stages["rm"], StageContext(trained, "rm"))
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, PromptGroupedSampler)
    assert sampler.groups == [[2 * i, 2 * i + 1] for i in range(20)] == prompt_groups(splits.train["prompt"])
    shuffled = dataclasses.replace(trained.recipe.stages["rm"], group_by_prompt=False)
    assert isinstance(build_trainer(shuffled, StageContext(trained, "rm"))[0]._get_train_sampler(), RandomSampler)


def test_attach_on_the_policy_base_scores_as_load_and_restores_the_policy(trained):
    cfg = trained.recipe.model
    saved = trained.stage_dir("rm") / "reward_model"
    rows = marker_pairs(6, seed=1, chat=False)  # text, as PPO has it: read as one user and one assistant message
    prompts = [r["prompt"] for r in rows] * 2
    completions = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    alone = RewardModel.load(saved, cfg).score(prompts, completions, batch_size=4)

    policy = load_trainable_model(cfg, resolve_model(cfg.base), trained.stage_dir("sft") / "adapter")
    probe = torch.tensor([[5, 40, 41, 42, 43]])
    with torch.no_grad():
        logits_before = policy(input_ids=probe).logits
    grads = {k: p.requires_grad for k, p in policy.named_parameters()}
    attached = RewardModel.attach(policy, saved).score(prompts, completions, batch_size=5)

    assert torch.allclose(attached, alone, atol=1e-5)
    assert alone[:6].mean() > alone[6:].mean() + 1.0, "trained scores, the marker preferred"
    assert policy.active_adapter == "default" and policy.training
    assert {k: p.requires_grad for k, p in policy.named_parameters() if ".reward." not in k} == grads
    assert not any(p.requires_grad for k, p in policy.named_parameters() if ".reward." in k)
    with torch.no_grad():
        assert torch.equal(policy(input_ids=probe).logits, logits_before), "the policy is the policy again"


def test_completions_of_one_prompt_score_as_alone_with_their_prompt_run_once(trained):
    cfg = trained.recipe.model
    saved = trained.stage_dir("rm") / "reward_model"
    rows = marker_pairs(6, seed=3, chat=False)  # three prompts, two pairs each: four completions a prompt
    prompts = [r["prompt"] for r in rows] * 2
    completions = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    policy = load_trainable_model(cfg, resolve_model(cfg.base), trained.stage_dir("sft") / "adapter")
    for rm in (RewardModel.load(saved, cfg), RewardModel.attach(policy, saved)):
        alone = rm.score(prompts, completions, batch_size=1)  # a row a pass: nothing to share
        call, rest_rows = rm._call, []

        def counting(call=call, rest_rows=rest_rows, **inputs):  # rows scored against a cache of shared prefixes
            if inputs.get("past_key_values") is not None:
                rest_rows.append(len(inputs["input_ids"]))
            return call(**inputs)

        rm._call = counting
        together = rm.score(prompts, completions, batch_size=12)
        assert rest_rows == [12]
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_text_pairs_with_a_gold_gap_margin(tmp_path):
    rows = marker_pairs(4, seed=0, chat=False)
    for row, (chosen, rejected) in zip(rows, [(1.0, 0.0), (0.75, 0.5), (0.5, -1.5), (2.0, 1.5)], strict=True):
        row |= {"score_chosen": chosen, "score_rejected": rejected}
    path = write_recipe(tmp_path, {"margin": "gold_gap", "from": None}, rows=rows, chat=False)
    recipe, raw = load(path, [])
    run = Run.create(recipe, "", raw, [], output_dir=tmp_path / "runs")
    trainer, splits = build_trainer(recipe.stages["rm"], StageContext(run, "rm"))
    assert splits.train["prompt"] == [r["prompt"] for r in rows]  # in file order
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert batch["margin"].tolist() == [1.0, 0.25, 2.0, 0.5]  # score_chosen - score_rejected, row by row

    rm = RewardModel.from_classifier(trainer.model, trainer.processing_class, chat=False, max_length=None)
    row = splits.train[0]
    ids = rm.encode(row["prompt"], row["chosen"])  # prompt + completion + EOS, tokenized as one text
    assert ids == trainer.train_dataset[0]["chosen_ids"] and ids[-1] == trainer.processing_class.eos_token_id


def test_qlora_reward_model_learns_held_out_and_reloads_on_cpu(tmp_path):
    path = write_recipe(tmp_path, {"from": None})
    overrides = ["model.quantization=4bit", "model.compute_dtype=float32"]
    run = run_recipe(path, RunOptions(overrides=overrides, output_dir=tmp_path / "runs", stage="rm"))
    saved = run.stage_dir("rm") / "reward_model"
    assert load_file(saved / HEAD_FILE)["weight"].dtype == torch.float32
    # Reloaded on a 4-bit base, it ranks the held-out pairs (other word salads, the same marker) as the labels do.
    held_out = marker_pairs(16, seed=1, chat=False)
    rm = RewardModel.load(saved, run.recipe.model)
    prompts = [r["prompt"] for r in held_out]
    chosen = rm.score(prompts, [r["chosen"] for r in held_out])
    rejected = rm.score(prompts, [r["rejected"] for r in held_out])
    assert float((chosen > rejected).float().mean()) >= 0.9


def bad_rows(case: str) -> list[dict]:
    rows = marker_pairs(4, seed=0, chat=False)
    if case == "empty chosen":
        rows[1]["chosen"] = "  "
    elif case == "chosen equals rejected":
        rows[2]["rejected"] = rows[2]["chosen"]
    elif case == "missing field":
        del rows[3]["rejected"]
    return rows


CASES = {
    "empty chosen": "rm.jsonl: row 2: 'chosen' is empty",
    "chosen equals rejected": "rm.jsonl: row 3: chosen and rejected are the same text",
    "missing field": "rm.jsonl: row 4: missing 'rejected'",
    "gold_gap without scores": "no 'score_chosen' column, which stages.rm.margin: gold_gap reads",
    "lora null": "stages.rm: the reward model is trained as a LoRA adapter",
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_and_no_run_dir(tmp_path, capsys, case):
    rows = bad_rows(case)
    overrides = []
    if case == "gold_gap without scores":
        rows = [{k: v for k, v in r.items() if not k.startswith("score")} for r in rows]
        overrides = ["--set", "stages.rm.margin=gold_gap"]
    if case == "lora null":
        overrides = ["--set", "model.lora=null"]
    path = write_recipe(tmp_path, rows=rows, chat=False)
    runs = tmp_path / "runs"
    assert main(["run", str(path), "--output-dir", str(runs), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("alignlab: error: ") and CASES[case] in err[0], err
    assert not runs.exists(), "nothing is written before the input is valid"


def test_score_runs_each_distinct_input_once_and_returns_scores_in_input_order(trained):
    rm = RewardModel.load(trained.stage_dir("rm") / "reward_model", trained.recipe.model)
    rows = marker_pairs(3, seed=2, chat=False)
    prompts = [r["prompt"] for r in rows]
    completions = [r["chosen"] for r in rows]
    once = rm.score(prompts, completions)
    call, batch_rows = rm._call, []

    def counting(**inputs):  # the rows of each pass that scores (not a pass over shared prefixes alone)
        if inputs.get("past_key_values") is not None or not inputs["use_cache"]:
            batch_rows.append(len(inputs["input_ids"]))
        return call(**inputs)

    rm._call = counting
    # All-pairs sets repeat each completion in several pairs: here every input three times, out of order.
    order = [2, 0, 1, 0, 2, 1, 1, 2, 0]
    repeated = rm.score([prompts[i] for i in order], [completions[i] for i in order], batch_size=2)
    assert sum(batch_rows) == 3
    assert torch.allclose(repeated, once[order], atol=1e-5)
