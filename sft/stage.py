"""The SFT stage: trl.SFTTrainer over LoRA, QLoRA or the full model.

Loss masking follows trl: prompt/completion records train on the completion only (`completion_only_loss`),
chat `messages` train on every token unless `assistant_only_loss: true`; `packing: true` packs sequences.
Output: `adapter/` (a PEFT adapter + tokenizer that `PeftModel.from_pretrained` loads) or, with `lora: null`,
`model/`; with `merge: true` also `merged/`, the adapter folded into a full model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from trl import SFTConfig, SFTTrainer

from common.config import Recipe, StageConfig
from common.data import load_splits
from common.errors import InputError
from common.fused_head import completion_positions_only
from common.models import load_for_inference, load_tokenizer, load_trainable_model, resolve_model
from common.prefix_sharing import trunk_shares_prefixes
from common.runs import StageContext, StageResult, train_and_evaluate
from common.tracking import MetricsCallback, Tracker


@dataclass
class SFTStage(StageConfig):
    merge: bool = False  # also export the adapter merged into a full model, for serving without peft

    trl_config = SFTConfig

    def validate(self, recipe: Recipe, where: str) -> None:
        super().validate(recipe, where)
        if self.data is None:
            raise InputError(f"recipe: {where} needs a data block (path, hub or stage) with SFT examples")
        if self.merge and recipe.model.lora is None:
            raise InputError(f"recipe: {where}.merge needs a LoRA model; with lora: null the output is already full")
        if self.data.path:  # local files are checked row by row now, not after the model has loaded
            load_splits(self.data, recipe, "sft", f"{where}.data")


def build_trainer(cfg: SFTStage, ctx: StageContext, callbacks: list | None = None) -> SFTTrainer:
    recipe = ctx.recipe
    where = f"stages.{ctx.name}"
    resolved = resolve_model(recipe.model.base)
    tokenizer = load_tokenizer(resolved)
    splits = load_splits(cfg.data, recipe, "sft", f"{where}.data",
                         ctx.run.stage_dir(cfg.data.stage) if cfg.data.stage else None)
    init_adapter = ctx.input_path(cfg.from_, "adapter") if cfg.from_ else None
    model = load_trainable_model(recipe.model, resolved, init_adapter)
    args = cfg.trainer_args(recipe, where, output_dir=ctx.dir / "checkpoints")
    if splits.test is None:
        args.eval_strategy = "no"
    return SFTTrainer(model=model, args=args, train_dataset=splits.train, eval_dataset=splits.test,
                      processing_class=tokenizer, callbacks=callbacks)


def train(cfg: SFTStage, ctx: StageContext) -> StageResult:
    recipe = ctx.recipe
    tracker = Tracker(ctx.dir, recipe.report_to, f"{recipe.name}/{ctx.name}", ctx.is_main, cfg.args)
    metrics_cb = MetricsCallback(tracker, perplexity=True)
    with completion_positions_only():
        trainer = build_trainer(cfg, ctx, [metrics_cb])
        # The chat template's system prompt, which every row opens with, runs once a batch.
        with trunk_shares_prefixes(trainer.model):
            train_and_evaluate(trainer, ctx)  # logs loss/eval and eval/perplexity through the callback
    tokenizer = trainer.processing_class
    tracker.close()

    out = "adapter" if recipe.model.lora is not None else "model"
    trainer.save_model(str(ctx.dir / out))  # main process only, inside the Trainer
    outputs = {out: out}
    if ctx.is_main:
        tokenizer.save_pretrained(ctx.dir / out)
        if cfg.merge:
            # Merge into full-precision base weights: folding a LoRA into 4-bit weights would round it away.
            full = dataclasses.replace(recipe.model, quantization="none")
            merged = load_for_inference(full, resolve_model(recipe.model.base), ctx.dir / out).merge_and_unload()
            merged.save_pretrained(ctx.dir / "merged")
            tokenizer.save_pretrained(ctx.dir / "merged")
            outputs["merged"] = "merged"
    final = {k: metrics_cb.last[k] for k in ("loss/eval", "eval/perplexity", "loss/train", "time/train")
             if k in metrics_cb.last}
    return StageResult(outputs=outputs, metrics=final)
