"""The DPO stage on the tiny in-process model: it learns an easy preference held out, its reference (the SFT
adapter, or the base) and the base weights stay bit-identical, QLoRA runs on CPU, a beta sweep runs one stage per
value, every trl loss type takes a step from its hand-worked first loss, and bad input stops with one line and
exit code 2."""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file

from common.fused_head import completion_positions_only
from common.models import load_base_model, load_tokenizer, resolve_model
from common.prefix_sharing import trunk_shares_prefixes
from common.runs import Run, StageContext
from common.tracking import read_metrics
from dpo.stage import LOSS_TYPES, build_trainer
from recipes.cli import main
from recipes.runner import RunOptions, load, run_recipe
from tests.conftest import write_jsonl

GOOD = ["great", "lovely", "superb", "good", "moving", "brilliant"]
BAD = ["awful", "dull", "boring", "bad", "tedious", "weak"]


def preference_rows(n: int, seed: int = 0, chat: bool = False) -> list[dict]:
    """An easy preference: after any prompt, a positive word beats a negative one. As text, or as chat messages
    (the preferences stage's shape), with score fields that DPO ignores."""
    rnd = random.Random(seed)
    rows = [{"prompt": f"Film {i}:", "chosen": " " + rnd.choice(GOOD), "rejected": " " + rnd.choice(BAD),
             "score_chosen": 1.0, "score_rejected": -1.0} for i in range(n)]
    if chat:
        for r in rows:
            r |= {"prompt": [{"role": "user", "content": r["prompt"]}],
                  "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
                  "rejected": [{"role": "assistant", "content": r["rejected"].strip()}]}
    return rows


def dpo_recipe(recipe_file, tmp_path, rows: list[dict] | None = None, **dpo) -> dict:
    """The conftest SFT recipe plus a DPO stage from it, on a local preference file."""
    write_jsonl(tmp_path / "prefs.jsonl", rows if rows is not None else preference_rows(64))
    recipe = yaml.safe_load(recipe_file().read_text())
    recipe["stages"]["sft"]["args"]["max_steps"] = 2
    recipe["stages"]["dpo"] = {
        "kind": "dpo", "from": "sft", "data": {"path": "prefs.jsonl", "test_size": 0.25},
        "args": {"max_steps": 12, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 16,
                 "learning_rate": 1e-2, "beta": 0.1, "logging_steps": 2, "save_strategy": "no"}} | dpo
    return recipe


def write_recipe(tmp_path, recipe: dict):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_learns_held_out_preference_while_reference_adapter_and_base_stay_bit_identical(recipe_file, tmp_path):
    path = write_recipe(tmp_path, dpo_recipe(recipe_file, tmp_path))
    run = run_recipe(path, RunOptions(overrides=[], stage="sft", output_dir=tmp_path / "runs"))
    trainer = build_trainer(run.recipe.stages["dpo"], StageContext(run, "dpo"))
    params = dict(trainer.model.named_parameters())
    assert set(trainer.model.peft_config) == {"default", "ref"}, "the SFT adapter's frozen copy is the reference"
    base = {k: v.detach().clone() for k, v in params.items() if "lora_" not in k}
    ref = {k: v for k, v in params.items() if ".ref." in k}
    policy_b = {k: v.detach().clone() for k, v in params.items() if "lora_B.default" in k}
    assert ref and not any(v.requires_grad for v in ref.values())

    trainer.train()
    held_out = trainer.evaluate()

    assert held_out["eval_rewards/accuracies"] >= 0.9 and held_out["eval_rewards/margins"] > 0
    assert all(torch.equal(params[k], v) for k, v in base.items()), "base weights moved"
    sft = load_file(run.stage_dir("sft") / "adapter" / "adapter_model.safetensors")
    assert len(sft) == len(ref)
    assert all(torch.equal(params[k], sft[k.replace(".ref.", ".")]) for k in ref), "reference != the SFT adapter"
    assert all(not torch.equal(params[k], v) for k, v in policy_b.items()), "the policy adapter learnt"


def test_lm_head_scores_only_completion_positions_with_the_log_probs_of_scoring_all(recipe_file, tmp_path,
                                                                                   monkeypatch):
    import trl.trainer.utils as trl_utils

    shipped = trl_utils._use_triton  # False on CPU: every position
    path = write_recipe(tmp_path, dpo_recipe(recipe_file, tmp_path, preference_rows(16, chat=True)))
    run = run_recipe(path, RunOptions(overrides=[], stage="sft", output_dir=tmp_path / "runs"))
    trainer = build_trainer(run.recipe.stages["dpo"], StageContext(run, "dpo"))
    batch = next(iter(trainer.get_train_dataloader()))
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    projected = []
    apply = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply",
                        lambda hidden, *rest: projected.append(hidden.shape[0]) or apply(hidden, *rest))

    def log_probs():
        with torch.no_grad():
            return trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 labels=labels, fused_lm_head=True).log_probs

    with completion_positions_only():
        compact = log_probs()
    assert trl_utils._use_triton is shipped, "trl is left as shipped after the block"
    full = log_probs()
    assert projected == [int((labels[:, 1:] != -100).sum()), labels[:, 1:].numel()]
    assert projected[0] < projected[1] / 2, "the prompt positions are most of a pair's tokens here"
    torch.testing.assert_close(compact, full, rtol=0, atol=1e-6)


def test_a_pairs_prompt_runs_once_with_the_log_probs_and_gradients_of_whole_rows(recipe_file, tmp_path):
    path = write_recipe(tmp_path, dpo_recipe(recipe_file, tmp_path, preference_rows(16, chat=True)))
    run = run_recipe(path, RunOptions(overrides=[], stage="sft", output_dir=tmp_path / "runs"))
    trainer = build_trainer(run.recipe.stages["dpo"], StageContext(run, "dpo"))
    batch = next(iter(trainer.get_train_dataloader()))  # 8 pairs: [chosen rows, rejected rows], right-padded
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    model = trainer.model
    fed = []
    model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: fed.append(inputs[0].numel()))

    def log_probs_and_grads():
        model.zero_grad()
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                    fused_lm_head=True).log_probs
        (out * torch.linspace(-1, 1, out.shape[1])).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    with completion_positions_only():
        whole, whole_grads = log_probs_and_grads()
        with trunk_shares_prefixes(model):
            shared, shared_grads = log_probs_and_grads()
        assert "forward" not in model.get_base_model().base_model.__dict__, "the trunk is as shipped after the block"
        again, _ = log_probs_and_grads()

    pairs = len(batch["input_ids"]) // 2
    prompt_len = [int((m == 0).sum() - (a == 0).sum()) for m, a in zip(batch["completion_mask"],
                                                                        batch["attention_mask"], strict=True)]
    # Whole rows, then the prefixes' pass and the rests', then whole rows again. The pairs' rows share their prompts:
    # each runs once, so the two passes feed fewer tokens than the whole rows less half the prompts' tokens.
    assert len(fed) == 4 and fed[0] == fed[3] == batch["input_ids"].numel()
    assert fed[1] + fed[2] < fed[0] - sum(prompt_len[:pairs]) / 2, (fed, prompt_len)
    torch.testing.assert_close(shared, whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(again, whole, rtol=0, atol=0)
    assert whole_grads.keys() == shared_grads.keys() and any("lora_" in n for n in whole_grads)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_beta_sweep_runs_one_stage_per_value_with_reloadable_adapters_and_trl_metric_names(recipe_file, tmp_path):
    recipe = dpo_recipe(recipe_file, tmp_path, preference_rows(64, chat=True), sweep={"beta": [0.1, 0.5]})
    del recipe["stages"]["dpo"]["args"]["beta"]
    recipe["stages"]["dpo"]["args"] |= {"max_steps": 2, "logging_steps": 1}
    path, runs = write_recipe(tmp_path, recipe), tmp_path / "runs"
    assert main(["run", str(path), "--output-dir", str(runs), "--run-id", "r"]) == 0

    run = runs / "t" / "r"
    resolved = yaml.safe_load((run / "resolved.yaml").read_text())["stages"]
    assert [resolved[s]["args"]["beta"] for s in ("dpo-beta0p1", "dpo-beta0p5")] == [0.1, 0.5]
    model = resolve_model("tiny-random-llama")
    tok = load_tokenizer(model)
    ids = tok("Film 1: great" + tok.eos_token, return_tensors="pt").input_ids
    base = load_base_model(load(path, [])[0].model, model, training=False)
    peft = PeftModel.from_pretrained(base, run / "sft" / "adapter", adapter_name="sft").eval()
    for stage in ("dpo-beta0p1", "dpo-beta0p5"):
        done = json.loads((run / stage / "done.json").read_text())
        assert done["outputs"] == {"adapter": "adapter"} and "eval/rewards/accuracies" in done["metrics"]
        names = set().union(*map(set, read_metrics(run / stage / "metrics.jsonl")))
        assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "eval/rewards/accuracies", "eval/rewards/margins", "loss/train"} <= names
        adapter = run / stage / "adapter"
        assert not (adapter / "ref").exists(), "the frozen reference copy is not part of the output"
        assert all("lora_" in k for k in load_file(adapter / "adapter_model.safetensors"))
        peft.load_adapter(adapter, adapter_name=stage)
    logits = {}
    with torch.no_grad():
        for name in ("sft", "dpo-beta0p1", "dpo-beta0p5"):
            peft.set_adapter(name)
            logits[name] = peft(ids).logits
    assert not torch.allclose(logits["dpo-beta0p1"], logits["sft"]), "the DPO adapter reloads, and moved from SFT"
    assert not torch.allclose(logits["dpo-beta0p1"], logits["dpo-beta0p5"]), "each beta trained its own adapter"


def test_resumed_run_ends_where_an_uninterrupted_one_does(recipe_file, tmp_path):
    recipe = dpo_recipe(recipe_file, tmp_path)
    recipe["stages"]["dpo"]["args"] |= {"max_steps": 2, "logging_steps": 1, "save_strategy": "steps",
                                        "save_steps": 1}
    path, runs = write_recipe(tmp_path, recipe), tmp_path / "runs"
    common = ["run", str(path), "--output-dir", str(runs), "--run-id", "r"]
    assert main(common) == 0
    stage = runs / "t" / "r" / "dpo"
    whole = load_file(stage / "adapter" / "adapter_model.safetensors")
    # Interrupted after step 1: the reference adapter is rebuilt from SFT's, the policy from checkpoint-1.
    shutil.rmtree(stage / "checkpoints" / "checkpoint-2")
    shutil.rmtree(stage / "adapter")
    (stage / "done.json").unlink()
    assert main([*common, "--resume"]) == 0
    steps = [m["step"] for m in read_metrics(stage / "metrics.jsonl") if "rewards/margins" in m]
    # The resumed run starts after checkpoint-1 and drops the logged step 2 it redoes: each step once, in order.
    assert steps == [1, 2]
    resumed = load_file(stage / "adapter" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    assert all(torch.allclose(whole[k], resumed[k], atol=1e-6) for k in whole)


def test_qlora_from_the_base_runs_on_cpu_with_precomputed_reference(recipe_file, tmp_path):
    import bitsandbytes as bnb

    recipe = dpo_recipe(recipe_file, tmp_path)
    del recipe["stages"]["dpo"]["from"]  # a new adapter: the reference is the base, adapters disabled
    recipe["stages"]["dpo"]["args"] |= {"max_steps": 2, "precompute_ref_log_probs": True}
    path = write_recipe(tmp_path, recipe)
    loaded, raw = load(path, ["model.quantization=4bit", "model.compute_dtype=float32"])
    run = Run.create(loaded, "", raw, [], output_dir=tmp_path / "runs")
    trainer = build_trainer(loaded.stages["dpo"], StageContext(run, "dpo"))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())
    assert set(trainer.model.peft_config) == {"default"} and trainer.ref_model is None
    assert "ref_chosen_logps" in trainer.train_dataset.column_names
    lora_b = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_B" in k}
    trainer.train()
    params = dict(trainer.model.named_parameters())
    assert all(not torch.equal(params[k], v) for k, v in lora_b.items())


LOG2 = math.log(2)
# The first batch's loss of each trl loss type when the policy is its reference (a fresh LoRA, B = 0, against the base
# with adapters disabled): every log-ratio is 0. With beta 0.1 and label_smoothing 0.1 (trl 1.16,
# DPOTrainer._compute_loss), s = sigmoid:
FIRST_LOSS = {
    "sigmoid": LOG2,  # -log sigmoid(0)
    "hinge": 1.0,  # relu(1 - 0)
    "ipo": 25.0,  # (0 - 1 / (2 * 0.1))^2
    "exo_pair": math.log(1 / 0.6),  # 0.5 (-log 2 - log 0.9) + 0.5 (-log 2 - log 0.1) = -log 2 - 0.5 log 0.09
    "nca_pair": 2 * LOG2,  # -log s(0) - 0.5 log s(0) - 0.5 log s(0)
    "robust": LOG2,  # (0.9 log 2 - 0.1 log 2) / (1 - 0.2)
    "bco_pair": 2 * LOG2,  # -log s(0) - log s(0)
    "sppo_hard": 50.0,  # (0 - 0.5 / 0.1)^2 + (0 + 0.5 / 0.1)^2
    "aot": LOG2,  # 0.9 (-log s(0)) + 0.1 (-log s(0))
    "aot_unpaired": LOG2,
    "apo_zero": 1.0,  # 1 - s(0) + s(0)
    "apo_down": 1.0,  # s(0) + 1 - s(0)
    "discopop": 0.5 * LOG2 + 0.5,  # modulation s(0 / tau) = 0.5 between -log s(0) and exp(-0)
    "sft": None,  # the chosen completions' NLL: checked against the model below
    "sigmoid_norm": LOG2,  # -log sigmoid(0), on per-token averages
}


def test_the_loss_types_are_trls_own_names():
    # Read from trl (dpo.stage.trl_loss_types), so a new trl loss needs no change here; the ones below must be there.
    assert {"sigmoid", "ipo", "hinge", "robust", "sft"} <= set(LOSS_TYPES) and len(set(LOSS_TYPES)) == len(LOSS_TYPES)


@pytest.mark.parametrize("loss", LOSS_TYPES)
def test_one_step_of_every_trl_loss_type_on_the_tiny_model(recipe_file, tmp_path, loss):
    recipe = dpo_recipe(recipe_file, tmp_path, preference_rows(4, chat=True), data={"path": "prefs.jsonl",
                                                                                    "test_size": 0})
    del recipe["stages"]["dpo"]["from"]  # a fresh LoRA: the policy starts as its reference, the base
    recipe["stages"]["dpo"]["args"] |= {"max_steps": 1, "per_device_train_batch_size": 4, "loss_type": [loss],
                                        "label_smoothing": 0.1, "logging_steps": 1}
    loaded, raw = load(write_recipe(tmp_path, recipe), [])
    run = Run.create(loaded, "", raw, [], output_dir=tmp_path / "runs")
    with completion_positions_only():
        trainer = build_trainer(loaded.stages["dpo"], StageContext(run, "dpo"))
        batch = next(iter(trainer.get_train_dataloader()))
        with torch.no_grad():
            first = float(trainer.compute_loss(trainer.model, batch))
        if FIRST_LOSS[loss] is None:  # sft: the mean NLL of the chosen completions' tokens
            chosen = {k: v[:4] for k, v in batch.items() if isinstance(v, torch.Tensor) and len(v) == 8}
            with torch.no_grad():
                logits = trainer.model(input_ids=chosen["input_ids"], attention_mask=chosen["attention_mask"]).logits
            logps = logits[:, :-1].log_softmax(-1).gather(-1, chosen["input_ids"][:, 1:, None])[..., 0]
            expected = float(-logps[chosen["completion_mask"][:, 1:].bool()].mean())
        else:
            expected = FIRST_LOSS[loss]
        assert first == pytest.approx(expected, abs=1e-5)
        lora_b = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_B" in k}
        trainer.train()
    params = dict(trainer.model.named_parameters())
    assert all(not torch.equal(params[k], v) for k, v in lora_b.items()), f"{loss}: one step moved the adapter"


BAD_INPUT = {
    "chosen equals rejected": ([], "prefs.jsonl: row 3: chosen and rejected are the same text"),
    "unknown dpo arg": (["stages.dpo.args.bta=0.1"], "unknown key 'bta' at stages.dpo.args; did you mean 'beta'?"),
    "unknown loss type": (["stages.dpo.args.loss_type=[sigmod]"],
                          "stages.dpo.args.loss_type: unknown loss 'sigmod'; did you mean 'sigmoid'?"),
    "exo without smoothing": (["stages.dpo.args.loss_type=[exo_pair]"], "exo_pair needs label_smoothing > 0"),
    "sweep over an unknown key": (["stages.dpo.sweep={bta: [0.1]}"], "unknown key 'bta' at stages.dpo.sweep"),
    "sweep over a non-list": (["stages.dpo.sweep={learning_rate: 0.1}"],
                              "stages.dpo.sweep.learning_rate must be a non-empty list of values"),
    "full fine-tuning": (["model.lora=null"], "the DPO stage trains a LoRA adapter"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_exits_2_with_one_line_and_nothing_written(recipe_file, tmp_path, capsys, case):
    rows = preference_rows(8)
    if case == "chosen equals rejected":
        rows[2]["rejected"] = rows[2]["chosen"] + "  "
    path = write_recipe(tmp_path, dpo_recipe(recipe_file, tmp_path, rows))
    overrides, message = BAD_INPUT[case]
    runs = tmp_path / "runs"
    argv = ["run", str(path), "--output-dir", str(runs)] + [a for o in overrides for a in ("--set", o)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("alignlab: error: ") and message in err[0], err
    assert not runs.exists(), "nothing is written before the input is valid"

