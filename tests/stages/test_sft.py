"""The SFT stage on the tiny in-process model: LoRA learns, the base does not move, QLoRA runs on CPU."""

from __future__ import annotations

import dataclasses
import json

import torch
from peft import PeftModel
from safetensors.torch import load_file

from common.fused_head import completion_positions_only
from common.models import load_base_model, load_tokenizer, resolve_model
from common.prefix_sharing import trunk_shares_prefixes
from common.runs import Run, StageContext
from common.tracking import read_metrics
from recipes.runner import RunOptions, load, run_recipe
from sft.stage import build_trainer

FAST = ["stages.sft.args.max_steps=4"]


def test_lora_changes_and_base_stays_bit_identical(recipe_file, tmp_path):
    recipe, raw = load(recipe_file(), FAST)
    run = Run.create(recipe, "", raw, [], output_dir=tmp_path / "runs")
    trainer = build_trainer(recipe.stages["sft"], StageContext(run, "sft"))
    params = dict(trainer.model.named_parameters())
    base_before = {k: v.detach().clone() for k, v in params.items() if "lora_" not in k}
    lora_before = {k: v.detach().clone() for k, v in params.items() if "lora_" in k}
    assert lora_before and all(not params[k].requires_grad for k in base_before)
    trainer.train()
    assert all(torch.equal(params[k], v) for k, v in base_before.items()), "base weights moved"
    changed = [k for k, v in lora_before.items() if not torch.equal(params[k], v)]
    # LoRA's B starts at zero, so every B must have moved (A moves once B is non-zero).
    assert all(k in changed for k in lora_before if "lora_B" in k)


def test_the_prefix_rows_share_runs_once_and_the_head_scores_completions_with_the_loss_and_gradients_of_whole_rows(
        recipe_file, tmp_path):
    recipe, raw = load(recipe_file(), FAST)
    run = Run.create(recipe, "", raw, [], output_dir=tmp_path / "runs")
    trainer = build_trainer(recipe.stages["sft"], StageContext(run, "sft"))
    model = trainer.model
    batch = next(iter(trainer.get_train_dataloader()))  # right-padded; loss on the completions only
    fed = []
    model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: fed.append(inputs[0].numel()))

    def loss_and_grads():
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole, whole_grads = loss_and_grads()
    with completion_positions_only(), trunk_shares_prefixes(model):
        shared, shared_grads = loss_and_grads()
    # The rows open alike ("What is the colour of ..."): the prefixes' pass and the rests' feed fewer tokens.
    assert len(fed) == 3 and fed[1] + fed[2] < fed[0] == batch["input_ids"].numel()
    torch.testing.assert_close(shared, whole, atol=1e-5, rtol=0)
    assert whole_grads.keys() == shared_grads.keys() and any("lora_" in n for n in whole_grads)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_loss_falls_on_a_memorisable_set_and_adapter_reloads(recipe_file, tmp_path):
    run = run_recipe(recipe_file(), RunOptions(
        overrides=["stages.sft.args.max_steps=16", "stages.sft.args.learning_rate=1e-2"],
        output_dir=tmp_path / "runs"))
    losses = [m["loss/train"] for m in read_metrics(run.stage_dir("sft") / "metrics.jsonl") if "loss/train" in m]
    assert len(losses) == 16 and sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4
    done = json.loads((run.stage_dir("sft") / "done.json").read_text())
    assert done["outputs"] == {"adapter": "adapter"} and "loss/eval" in done["metrics"]

    adapter = run.stage_dir("sft") / "adapter"
    saved = load_file(adapter / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved), "only the adapter is saved, not the base"
    resolved = resolve_model("tiny-random-llama")
    base = load_base_model(run.recipe.model, resolved, training=False)
    tok = load_tokenizer(resolved)
    chat = [{"role": "user", "content": "What is the colour of the sky?"}, {"role": "assistant", "content": "blue"}]
    prompt_len = len(tok(tok.apply_chat_template(chat[:1], add_generation_prompt=True, tokenize=False)).input_ids)
    ids = tok(tok.apply_chat_template(chat, tokenize=False), return_tensors="pt").input_ids
    labels = ids.clone()
    labels[:, :prompt_len] = -100  # score the answer only

    with torch.no_grad():
        base_loss = base(input_ids=ids, labels=labels).loss
        tuned_loss = PeftModel.from_pretrained(base, adapter).eval()(input_ids=ids, labels=labels).loss
    assert tuned_loss < base_loss - 1.0, "the reloaded adapter has learnt the answer"


def test_resumed_at_its_last_checkpoint_a_stage_keeps_its_final_training_metrics(recipe_file, tmp_path):
    # What a kill between the last checkpoint and done.json leaves: every step done, the stage not marked done.
    # 5 steps of 4 rows are one epoch of the 20 training rows: resumed, transformers trains nothing more.
    options = RunOptions(overrides=["stages.sft.args.max_steps=5", "stages.sft.args.save_strategy=steps",
                                    "stages.sft.args.save_steps=5"],
                         output_dir=tmp_path / "runs", run_id="r")
    run = run_recipe(recipe_file(), options)
    done = run.stage_dir("sft") / "done.json"
    finished = json.loads(done.read_text())["metrics"]
    assert (run.stage_dir("sft") / "checkpoints" / "checkpoint-5").is_dir() and "loss/train" in finished
    done.unlink()

    run_recipe(recipe_file(), dataclasses.replace(options, resume=True))
    resumed = json.loads(done.read_text())["metrics"]
    assert {k: resumed[k] for k in ("loss/train", "loss/eval")} == {k: finished[k] for k in ("loss/train", "loss/eval")}


def test_qlora_4bit_runs_on_cpu(recipe_file, tmp_path):
    import bitsandbytes as bnb

    overrides = [*FAST, "model.quantization=4bit", "model.compute_dtype=float32"]
    recipe, raw = load(recipe_file(), overrides)
    run = Run.create(recipe, "", raw, [], output_dir=tmp_path / "runs")
    trainer = build_trainer(recipe.stages["sft"], StageContext(run, "sft"))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())
    lora_b = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_B" in k}
    trainer.train()
    params = dict(trainer.model.named_parameters())
    assert all(not torch.equal(params[k], v) for k, v in lora_b.items())


def test_full_fine_tuning_moves_the_weights_and_the_merged_export_reproduces_base_plus_adapter(recipe_file, tmp_path):
    from transformers import AutoModelForCausalLM

    resolved = resolve_model("tiny-random-llama")
    ids = torch.tensor([[5, 40, 41, 42, 43, 44, 45, 46]])

    full = run_recipe(recipe_file(), RunOptions(overrides=[*FAST, "model.lora=null",
                                                           "stages.sft.args.learning_rate=1e-2"],
                                                output_dir=tmp_path / "a"))
    trained = load_file(full.stage_dir("sft") / "model" / "model.safetensors")
    base = load_base_model(full.recipe.model, resolved, training=False).state_dict()
    # Every weight moved, the embeddings and norms included (which a LoRA could not touch), and none went missing.
    assert set(trained) <= set(base) and "model.embed_tokens.weight" in trained
    assert [k for k, v in trained.items() if not torch.equal(v, base[k])] == list(trained)

    merged_run = run_recipe(recipe_file(), RunOptions(overrides=[*FAST, "stages.sft.merge=true",
                                                                 "stages.sft.args.learning_rate=1e-2"],
                                                      output_dir=tmp_path / "b"))
    stage = merged_run.stage_dir("sft")
    assert not list((stage / "merged").glob("adapter_*"))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(stage / "merged").eval()(ids).logits
        base_model = load_base_model(merged_run.recipe.model, resolved, training=False)
        plain = base_model.eval()(ids).logits
        with_adapter = PeftModel.from_pretrained(base_model, stage / "adapter").eval()(ids).logits
    # The merged model is base + adapter, computed once: its logits are those of the base with the adapter on, and
    # not the base's (the adapter learnt something).
    torch.testing.assert_close(merged, with_adapter, atol=1e-5, rtol=0)
    assert (with_adapter - plain).abs().max() > 1e-3
