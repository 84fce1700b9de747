"""The eval stage over a tiny run (base and an SFT adapter): the results layout the report reads, and bad input
refused with one line and exit code 2 before anything runs."""

from __future__ import annotations

import json

import pytest

from recipes.cli import main
from recipes.runner import RunOptions, load, run_recipe
from tests.conftest import write_jsonl
from tests.stages.conftest import EVAL, PROMPTS, QUESTIONS


def test_eval_stage_writes_the_results_layout(eval_recipe, tmp_path):
    write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": f"Review film {i}.", "chosen": "Great :)", "rejected": "Bad :("}
                                           for i in range(8)])
    rm = {"kind": "reward_model", "from": "sft", "data": {"path": "prefs.jsonl", "test_size": 0},
          "args": {"max_steps": 2, "per_device_train_batch_size": 4, "save_strategy": "no"}}
    path = eval_recipe(generation={**EVAL["generation"], "reward_model": "rm"})
    run = run_recipe(path, RunOptions(overrides=[f"stages.rm={json.dumps(rm)}"], output_dir=tmp_path / "runs"))
    assert run.recipe.order() == ["sft", "rm", "eval"]
    out = run.stage_dir("eval")
    combined = json.loads((out / "results.json").read_text())
    assert list(combined["models"]) == ["base", "sft"] and combined["config"]["models"] == ["base", "sft"]
    for name, entry in combined["models"].items():
        assert set(entry) == {"source", "gen", "mc", "judge"}
        assert json.loads((out / name / "results.json").read_text()) == entry
        gen = entry["gen"]
        for key in ("gold_reward", "kl_to_ref", "length_tokens", "length_words"):
            assert set(gen[key]) == {"mean", "ci", "n"} and gen[key]["n"] == 6
            assert gen[key]["ci"][0] <= gen[key]["mean"] <= gen[key]["ci"][1]
        assert gen["rm_reward"]["n"] == 6 and 0 <= gen["distinct_1"] <= 1 and 0 <= gen["distinct_2"] <= 1
        assert entry["mc"]["n_questions"] == 3
        rows = [json.loads(line) for line in (out / name / "samples.jsonl").read_text().splitlines()]
        assert len(rows) == 6 and rows[5]["prompt"] == "What is the colour of grass?" and rows[5]["sample"] == 1
        assert all(isinstance(r["scores"]["gold"], float) and isinstance(r["scores"]["rm"], float) for r in rows)
        assert sum(r["scores"]["rm"] for r in rows) / 6 == pytest.approx(gen["rm_reward"]["mean"], abs=1e-6)
    base, sft = combined["models"]["base"], combined["models"]["sft"]
    assert base["gen"]["kl_to_ref"] == {"mean": 0.0, "ci": [0.0, 0.0], "n": 6}, "the reference is base itself"
    assert sft["gen"]["kl_to_ref"]["mean"] != 0.0, "the SFT adapter changed the model"
    # The paired gold difference to the reference, row by row over the same (prompt, sample) jobs; none for itself.
    gold = {name: [json.loads(row)["scores"]["gold"] for row in (out / name / "samples.jsonl").read_text().splitlines()]
            for name in ("base", "sft")}
    differences = [s - b for s, b in zip(gold["sft"], gold["base"], strict=True)]
    assert sft["gen"]["gold_reward_vs_ref"]["mean"] == pytest.approx(sum(differences) / 6, abs=1e-9)
    assert sft["gen"]["gold_reward_vs_ref"]["n"] == 6
    assert base["gen"]["gold_reward_vs_ref"] is None
    assert "adapter" in sft["source"] and "tiny-random-llama" in base["source"]
    assert sft["judge"] is None and base["judge"]["vs"] == "sft"
    judge = base["judge"]
    assert judge["wins"] + judge["ties"] + judge["losses"] == judge["n"] == 6
    assert judge["ci"][0] <= judge["win_rate"] <= judge["ci"][1]
    done = json.loads((out / "done.json").read_text())
    assert done["metrics"]["eval/sft/gold_reward"] == sft["gen"]["gold_reward"]["mean"]
    assert done["metrics"]["eval/base/judge_win_rate"] == judge["win_rate"]


def bad(case: str, eval_recipe) -> tuple:
    """A recipe path and --set overrides with one problem."""
    questions = [dict(q) for q in QUESTIONS]
    prompts = list(PROMPTS)
    changes, overrides = {}, []
    if case == "one choice":
        questions[1]["choices"] = ["green"]
        questions[1]["answer"] = 0
    elif case == "answer out of range":
        questions[0]["answer"] = 3
    elif case == "missing column":
        del questions[2]["answer"]
    elif case == "unknown model":
        changes["models"] = ["base", "sftt"]
    elif case == "baseline not evaluated":
        changes["judge"] = {"baseline": "dpo"}
    elif case == "judge reads no sample":
        changes["judge"] = {"baseline": "sft", "samples_per_prompt": 0}
    elif case == "judge key":
        changes["judge"] = {"baseline": "sft", "cahce": "judge.sqlite"}
    elif case == "prompt missing":
        prompts[1] = {"text": "no prompt here"}
    elif case == "bad scorer":
        changes["generation"] = {**EVAL["generation"], "scorer": "vadr"}
    elif case == "arena of one model":
        changes |= {"models": ["sft"], "judge": None, "arena": {"baseline": "sft"}}
    elif case == "too many contamination shards":
        changes["mc"] = {"data": {"path": "mc.jsonl"}, "contamination": {"shards": 2}}
    elif case == "eval of an eval":
        overrides = ["stages.eval2={kind: eval, models: [eval], mc: {data: {path: mc.jsonl}}}"]
    return eval_recipe(questions=questions, prompts=prompts, **changes), overrides


CASES = {
    "one choice": "mc.jsonl, line 2: a question needs at least 2 choices, got 1",
    "answer out of range": "mc.jsonl, line 1: 'answer' 3 is out of range for 3 choices",
    "missing column": "mc.jsonl, line 3: missing column(s) 'answer'",
    "unknown model": "unknown key 'sftt' at stages.eval",
    "baseline not evaluated": "stages.eval.judge.baseline 'dpo' is not among the models evaluated (base, sft)",
    # A judge key is read as every other key is: the same one-line "did you mean" as the models' typo above.
    "judge key": "unknown key 'cahce' at stages.eval.judge; did you mean 'cache'? valid keys: ",
    "judge reads no sample": "stages.eval.judge.samples_per_prompt is 0; the judge reads at least 1 sample a prompt",
    "prompt missing": "prompts.jsonl: row 2, field 'prompt' is missing",
    "bad scorer": "stages.eval.generation.scorer",
    "eval of an eval": "stages.eval2.models: 'eval' is an eval stage, which trains no model",
    "arena of one model": "stages.eval.arena: an arena needs at least 2 models, models has 1 (sft)",
    "too many contamination shards": "stages.eval.mc.contamination: 3 examples cannot fill 2 shards of at least 2",
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_before_anything_runs(eval_recipe, tmp_path, capsys, case):
    path, overrides = bad(case, eval_recipe)
    runs = tmp_path / "runs"
    assert main(["run", str(path), "--output-dir", str(runs), *[f"--set={o}" for o in overrides]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("alignlab: error: ") and CASES[case] in err[0], err
    assert not runs.exists(), "nothing is written before the input is valid"


def test_the_judge_and_the_arena_can_read_each_prompts_first_samples_only(eval_recipe, tmp_path, capsys):
    first = {"samples_per_prompt": 1, "local": {"batch_size": 4}}
    path = eval_recipe(judge={"baseline": "sft", **first}, arena={"baseline": "base", "bootstrap": 20, **first})
    assert main(["run", str(path), "--output-dir", str(tmp_path / "runs")]) == 0
    # 3 prompts x 2 samples scored; the judges read sample 0 of each prompt.
    assert "arena: 2 models, 3 pairs of answers, 6 judgements (both orders)" in capsys.readouterr().out
    base = json.loads((next((tmp_path / "runs").glob("*/*/eval")) / "base" / "results.json").read_text())
    assert base["gen"]["gold_reward"]["n"] == 6 and base["judge"]["n"] == 3


def test_a_swept_stage_in_models_stands_for_all_its_members(eval_recipe):
    recipe, _ = load(eval_recipe(), ["stages.sft.sweep={warmup_steps: [0, 1]}", "stages.eval.judge=null"])
    members = ["sft-warmup_steps0", "sft-warmup_steps1"]
    assert recipe.stages["eval"].model_names(recipe, "stages.eval") == ["base", *members]
    assert recipe.order() == [*members, "eval"], "the eval runs after every member"


def test_eval_stage_with_an_arena_circular_eval_and_a_contamination_test(eval_recipe, tmp_path, capsys):
    path = eval_recipe(mc={"data": {"path": "mc.jsonl"}, "circular": True,
                           "contamination": {"shards": 1, "permutations": 3}},
                       judge=None, arena={"baseline": "base", "local": {"batch_size": 4}, "bootstrap": 20})
    assert main(["run", str(path), "--output-dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    # One pair of models x 3 prompts x 2 samples, each pair of answers judged in both orders.
    assert "arena: 2 models, 6 pairs of answers, 12 judgements (both orders)" in out
    assert "judge calls: 12 (not in the cache)" in out
    ev = next((tmp_path / "runs").glob("*/*/eval"))
    board = json.loads((ev / "arena.json").read_text())
    assert board["baseline"] == "base" and {r["model"] for r in board["models"]} == {"base", "sft"}
    mc = json.loads((ev / "sft" / "results.json").read_text())["mc"]
    assert mc["circular"]["n"] == 3 and mc["circular"]["accuracy"] <= mc["acc"]["accuracy"]
    assert mc["contamination"]["test"] == "permutation" and mc["contamination"]["n_examples"] == 3


def test_the_model_pool_runs_an_adapter_folded_and_gives_the_weights_back_bit_for_bit(tmp_path):
    import torch
    from peft import get_peft_model

    from common.config import LoraSpec, ModelConfig
    from common.models import load_base_model, load_for_inference, lora_config, resolve_model
    from eval.stage import ModelPool, ModelSource

    cfg = ModelConfig(base="tiny-random-llama", dtype="float32", lora=LoraSpec(r=4, alpha=8, dropout=0.0))
    resolved = resolve_model(cfg.base)
    config = lora_config(cfg.lora)
    config.init_lora_weights = False  # a random B: the adapter changes the logits
    torch.manual_seed(0)
    get_peft_model(load_base_model(cfg, resolved, training=False), config).save_pretrained(tmp_path / "adapter")
    unfolded = load_for_inference(cfg, resolved, tmp_path / "adapter")
    probe = torch.tensor([[5, 40, 41, 42, 43, 7]])
    pool = ModelPool([ModelSource("policy", cfg, tmp_path / "adapter"), ModelSource("base", cfg)])
    with torch.no_grad():
        with pool.use("base") as (model, _):
            base_logits = model(input_ids=probe).logits
            weights = {name: value.clone() for name, value in model.state_dict().items()}
        with pool.use("policy") as (model, _):
            assert all(layer.disable_adapters for layer in model.modules() if hasattr(layer, "lora_A"))  # folded
            torch.testing.assert_close(model(input_ids=probe).logits, unfolded(input_ids=probe).logits, atol=1e-5,
                                       rtol=0)
        assert all(torch.equal(weights[name], value) for name, value in model.state_dict().items())
        with pool.use("base") as (model, _):
            assert torch.equal(model(input_ids=probe).logits, base_logits)
    pool.close()
