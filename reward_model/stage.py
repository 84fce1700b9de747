"""The reward-model stage (`kind: reward_model`): trl.RewardTrainer, a scalar reward r(x, y) over LoRA or QLoRA.

Loss (trl's RewardTrainer.compute_loss), per pair of chosen y_c and rejected y_r:

    -log sigmoid(r(x, y_c) - r(x, y_r) - m)  +  c * (r(x, y_c) + r(x, y_r))^2

the Bradley-Terry likelihood (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1), with the optional per-pair margin m
of Llama 2 (Touvron et al. 2023, eq. 2) and the optional reward-centering term of Eisenstein et al. 2023 (eq. 2;
`args.center_rewards_coefficient`, trl recommends 0.01), averaged over the batch. Every trl RewardConfig field is a
key of the stage's `args` (learning_rate, max_length, center_rewards_coefficient, ...).

Batches (`reward_model.trainer`): `group_by_prompt: true` (stage key, the default) puts the pairs of one prompt in
the same batch (InstructGPT's batching, Ouyang et al. 2022, sec. 3.5); `false` shuffles pairs one by one, as trl
does. Either way each distinct sequence of a batch goes through the model once: a completion that appears in
several pairs (all-pairs sets) is scored once per batch: with grouped batches a batch of 8 of the default recipe's
pairs holds ~9 distinct rows instead of 16, and the stage runs about 1.4x faster.

`margin: none | gold_gap` (stage key): `gold_gap` sets m = |score_chosen - score_rejected|, the gold-score gap the
preferences stage stored with each pair; trl uses a `margin` column when the data has one. The absolute value: m
says how strongly a pair is preferred, not which way, so a flipped (noisy) label gets the margin of its pair and the
margin never reveals the flip. `none` trains plain Bradley-Terry (and drops a `margin` column the data may carry).

Model: the recipe's base in sequence-classification form (a scalar head `score`, freshly initialised under the
recipe seed), a LoRA on the trunk and the head trained in full (peft `modules_to_save`). `from: STAGE` (any stage
that saved an `adapter`, typically sft) initialises the LoRA from that adapter: the reward model starts from the SFT
model, as in InstructGPT (Ouyang et al. 2022, sec. 3.5), and stays one adapter over the untouched base weights,
which is what lets PPO attach it to the policy's base (`RewardModel.attach`). Without `from`, a new LoRA on the base.
The recipe's model needs a lora block (QLoRA with quantization: 4bit).

Data: preference pairs (chat, text or Anthropic-HH; common.data), typically `data: {stage: prefs}`. trl drops pairs
longer than `args.max_length` (default 1024); the count is logged.

Metrics (trl's, under lab names): `loss/train`, `train/accuracy`, `train/margin`, `train/mean_reward`, ...; held out,
after training: `loss/eval`, `eval/accuracy` (share of test pairs with r_c > r_r, against the test labels, which
carry the label noise), `eval/margin` (mean r_c - r_r) and, when the pairs carry gold scores, `eval/gold_accuracy`:
agreement with the gold scorer's (noise-free) order, gold ties left out, over `eval/gold_pairs` pairs, and the same
within each third of the test pairs by gold-score gap (`eval/gold_accuracy_small_gaps`, `_middle_gaps`,
`_large_gaps`).

Output (key `reward_model`): `reward_model/` with the PEFT adapter (task SEQ_CLS; the head saved with it, so
`PeftModel.from_pretrained` on a sequence-classification base reloads it whole), the tokenizer,
`score_head.safetensors` (the head alone, to attach elsewhere) and `reward_model.json` (input format, max_length).
`reward_model.api.RewardModel` loads it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
import torch
from peft import PeftConfig, get_peft_model, get_peft_model_state_dict
from peft.utils import load_peft_weights, set_peft_model_state_dict
from safetensors.torch import save_file
from torch import Tensor
from trl import RewardConfig

from common.agreement import gold_agreement, gold_agreement_by_gap
from common.config import ModelConfig, Recipe, StageConfig, check_policy_source
from common.data import Splits, load_splits
from common.errors import InputError
from common.models import ResolvedModel, load_base_model, load_tokenizer, lora_config, resolve_model
from common.runs import StageContext, StageResult, atomic_write_json, train_and_evaluate
from common.tracking import MetricsCallback, Tracker
from reward_model.api import HEAD, HEAD_FILE, INFO_FILE, RewardModel
from reward_model.trainer import GroupedRewardTrainer

log = logging.getLogger(__name__)

SCORES = ("score_chosen", "score_rejected")
FINAL_METRICS = ("eval/accuracy", "eval/margin", "loss/eval", "loss/train", "time/train")


@dataclass
class RewardModelStage(StageConfig):
    margin: Literal["none", "gold_gap"] = "none"
    group_by_prompt: bool = True

    trl_config = RewardConfig

    def validate(self, recipe: Recipe, where: str) -> None:
        super().validate(recipe, where)
        if self.data is None:
            raise InputError(f"recipe: {where} needs a data block (path, hub or stage) with preference pairs "
                             "(prompt, chosen, rejected), e.g. data: {stage: prefs}")
        if recipe.model.lora is None:
            raise InputError(f"recipe: {where}: the reward model is trained as a LoRA adapter (so that PPO can attach "
                             "it to the policy's base); add a model.lora block")
        check_policy_source(recipe, self.from_, where)
        if self.data.path:  # local files are checked row by row now, not after the model has loaded
            splits = load_splits(self.data, recipe, "preference", f"{where}.data")
            self.check_margin_columns(splits.train, splits.source, where)

    def check_margin_columns(self, ds: datasets.Dataset, source: str, where: str) -> None:
        missing = [c for c in SCORES if c not in ds.column_names]
        if self.margin == "gold_gap" and missing:
            raise InputError(f"{source}: no '{missing[0]}' column, which {where}.margin: gold_gap reads; label the "
                             "pairs with a gold scorer (a preferences stage with a scorer) or set margin: none")


def gold_gap_margins(score_chosen: Tensor, score_rejected: Tensor) -> Tensor:
    """m = |score_chosen - score_rejected|: the strength of the gold preference, whichever way the label points."""
    return (torch.as_tensor(score_chosen, dtype=torch.float64) - torch.as_tensor(score_rejected,
                                                                                 dtype=torch.float64)).abs()


def with_margin(ds: datasets.Dataset, margin: str) -> datasets.Dataset:
    if "margin" in ds.column_names:
        ds = ds.remove_columns("margin")
    if margin == "none":
        return ds
    return ds.add_column("margin", gold_gap_margins(ds["score_chosen"], ds["score_rejected"]).tolist())


def load_trainable_reward_model(cfg: ModelConfig, resolved: ResolvedModel, init_adapter: Path | None = None):
    """The base with a scalar head, a LoRA on the trunk (new, or continued from `init_adapter`) and the head
    trained in full."""
    model = load_base_model(cfg, resolved, task="seq-cls")
    if init_adapter is None:
        return get_peft_model(model, lora_config(cfg.lora, task_type="SEQ_CLS", modules_to_save=[HEAD]))
    # The upstream LoRA was trained on a causal LM; its weights fit the sequence-classification trunk (both hold the
    # decoder under `model.`). The head is new: it keeps its fresh initialisation.
    config = PeftConfig.from_pretrained(str(init_adapter))
    config.task_type, config.modules_to_save, config.inference_mode = "SEQ_CLS", [HEAD], False
    model = get_peft_model(model, config)
    fresh_head = {k: v for k, v in get_peft_model_state_dict(model).items() if f".{HEAD}." in k}
    loaded = set_peft_model_state_dict(model, load_peft_weights(str(init_adapter)) | fresh_head)
    missing = [k for k in loaded.missing_keys if "lora_" in k]
    if loaded.unexpected_keys or missing:
        raise InputError(f"{init_adapter}: the adapter does not fit the base '{resolved.name}' (first mismatch: "
                         f"{(loaded.unexpected_keys or missing)[0]}); initialise from a stage trained on this base")
    return model


def head_state(model: Any) -> dict[str, Tensor]:
    """The trained head's tensors ({"weight": [1, hidden]}, plus "bias" if it has one), from the adapter's state."""
    state = get_peft_model_state_dict(model)
    return {k.split(f".{HEAD}.")[-1]: v.detach().cpu().contiguous() for k, v in state.items() if f".{HEAD}." in k}


def is_chat(ds: datasets.Dataset) -> bool:
    return isinstance(ds[0]["chosen"], list)


def gold_accuracy(rm: RewardModel, pairs: datasets.Dataset) -> dict[str, float]:
    """Agreement of the reward model's order with the gold scores' (noise-free labels), gold ties left out: over all
    pairs (`eval/gold_accuracy`, over `eval/gold_pairs` pairs: how far from chance it can tell) and within each third
    of them by gold-score gap (`eval/gold_accuracy_small_gaps`, `_middle_gaps`, `_large_gaps`)."""
    chosen = rm.score(pairs["prompt"], pairs["chosen"])
    rejected = rm.score(pairs["prompt"], pairs["rejected"])
    gold = torch.tensor(pairs["score_chosen"], dtype=torch.float64) - torch.tensor(pairs["score_rejected"],
                                                                                   dtype=torch.float64)
    by_gap = gold_agreement_by_gap(chosen - rejected, gold)
    return {"eval/gold_accuracy": gold_agreement(chosen - rejected, gold), "eval/gold_pairs": float((gold != 0).sum()),
            **{f"eval/gold_accuracy_{third}_gaps": acc for third, acc in by_gap.items()}}


def build_trainer(cfg: RewardModelStage, ctx: StageContext,
                  callbacks: list | None = None) -> tuple[GroupedRewardTrainer, Splits]:
    """The trainer, and the pairs as read (trl's prepared datasets hold prompt + completion in chosen / rejected)."""
    recipe = ctx.recipe
    where = f"stages.{ctx.name}"
    resolved = resolve_model(recipe.model.base)
    tokenizer = load_tokenizer(resolved)
    splits = load_splits(cfg.data, recipe, "preference", f"{where}.data",
                         ctx.run.stage_dir(cfg.data.stage) if cfg.data.stage else None)
    ctx.metrics.update(splits.metrics)  # degenerate pairs left out (data.bad_rows: drop)
    cfg.check_margin_columns(splits.train, splits.source, where)
    init_adapter = ctx.input_path(cfg.from_, "adapter") if cfg.from_ else None
    model = load_trainable_reward_model(recipe.model, resolved, init_adapter)
    args = cfg.trainer_args(recipe, where, output_dir=ctx.dir / "checkpoints")
    if splits.test is None:
        args.eval_strategy = "no"
    train_ds = with_margin(splits.train, cfg.margin)
    test_ds = with_margin(splits.test, cfg.margin) if splits.test is not None else None
    trainer = GroupedRewardTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=test_ds,
                                   processing_class=tokenizer, callbacks=callbacks, group_by_prompt=cfg.group_by_prompt)
    if recipe.model.quantization != "none":
        # trl casts every trainable parameter of a quantized model to bf16 (QLoRA's choice for the LoRA weights;
        # RewardTrainer.__init__), the head too, which then meets hidden states in the model's dtype: undo it there.
        hidden_dtype = trainer.model.get_input_embeddings().weight.dtype
        for name, param in trainer.model.named_parameters():
            if param.requires_grad and f".{HEAD}." in name:
                param.data = param.data.to(hidden_dtype)
    dropped = len(train_ds) - len(trainer.train_dataset)
    if dropped:
        log.warning("%s: trl dropped %d of %d training pairs longer than max_length %s", ctx.name, dropped,
                    len(train_ds), args.max_length)
    return trainer, splits


def train(cfg: RewardModelStage, ctx: StageContext) -> StageResult:
    recipe = ctx.recipe
    tracker = Tracker(ctx.dir, recipe.report_to, f"{recipe.name}/{ctx.name}", ctx.is_main, cfg.args)
    metrics_cb = MetricsCallback(tracker)
    trainer, splits = build_trainer(cfg, ctx, [metrics_cb])
    tokenizer = trainer.processing_class
    train_and_evaluate(trainer, ctx)  # ends with eval/accuracy and eval/margin

    out = ctx.dir / "reward_model"
    trainer.save_model(str(out))  # the adapter with the head (modules_to_save); main process only, in the Trainer
    chat = is_chat(splits.train)
    if ctx.is_main:
        tokenizer.save_pretrained(out)
        save_file(head_state(trainer.model), str(out / HEAD_FILE))
        atomic_write_json(out / INFO_FILE, {"chat": chat, "max_length": trainer.args.max_length,
                                            "base": recipe.model.base, "init_adapter": cfg.from_})
    final = {}
    if splits.test is not None and all(c in splits.test.column_names for c in SCORES):
        rm = RewardModel.from_classifier(trainer.model.eval(), tokenizer, chat, trainer.args.max_length)
        final.update(gold_accuracy(rm, splits.test))
        tracker.log(final, trainer.state.global_step)
    tracker.close()
    final.update({k: metrics_cb.last[k] for k in FINAL_METRICS if k in metrics_cb.last})
    return StageResult(outputs={"reward_model": "reward_model"}, metrics=final)
