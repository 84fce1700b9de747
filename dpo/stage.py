"""The DPO stage: trl.DPOTrainer over LoRA or QLoRA, with the reference policy held as an adapter.

DPO (Rafailov et al. 2023, eq. 7) fits the policy pi to preference pairs (x, y_w, y_l) by minimising
-log sigmoid(beta * [log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x)]). trl implements it and its
variants; every DPOConfig field is a key of the stage's `args` (`beta`, `loss_type: [ipo]`, `label_smoothing`,
`precompute_ref_log_probs`, ...).

The reference pi_ref never costs a second model in memory:
- `from: sft` (any stage that saved an `adapter`): the policy continues that adapter, and trl 1.16 adds a frozen
  copy of it named "ref" on the same base (DPOTrainer.__init__: `model.add_adapter("ref", ...)`), which is
  switched on for the reference forward passes;
- no `from`: a new LoRA on the base, and the reference is the base with adapters disabled.
`precompute_ref_log_probs: true` computes the reference log-probs once before training instead of every step.

Held-out metrics (on the test split, after training) are trl's, with the implicit reward
r(x, y) = beta * log pi(y|x)/pi_ref(y|x): `eval/rewards/accuracies` (the share of pairs with r(chosen) > r(rejected)),
`eval/rewards/margins`, `eval/rewards/chosen|rejected`, `eval/logps/chosen|rejected`; training logs the same
names without `eval/`. Output: `adapter/`, a PEFT adapter + tokenizer that `PeftModel.from_pretrained` loads.
"""

from __future__ import annotations

import difflib
import logging
import re
import tempfile
from dataclasses import dataclass

import datasets
import trl
from trl import DPOConfig, DPOTrainer

from common.config import Recipe, StageConfig
from common.data import load_splits
from common.errors import InputError
from common.fused_head import completion_positions_only
from common.models import load_base_model, load_tokenizer, load_trainable_model, lora_config, resolve_model
from common.prefix_sharing import trunk_shares_prefixes
from common.runs import StageContext, StageResult, train_and_evaluate
from common.tracking import MetricsCallback, Tracker

log = logging.getLogger(__name__)



def trl_loss_types() -> tuple[str, ...]:
    """trl's DPO loss types, read from trl: the names its DPOConfig.loss_type field lists (trl 1.16 keeps no constant
    of them; DPOTrainer._compute_loss dispatches on the same names). trl rejects an unknown name only when the first
    batch's loss is computed, so the recipe checks them when it loads."""
    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    names = tuple(re.findall(r"`'(\w+)'`", help_text.split("If multiple")[0]))
    if not names:
        raise RuntimeError("dpo.stage: cannot read the loss types from trl's DPOConfig.loss_type help text; trl "
                           f"{trl.__version__} changed it, so update dpo.stage.trl_loss_types")
    return names


LOSS_TYPES = trl_loss_types()
# f-DPO regularisers (Wang et al. 2023) and the losses built on the chosen-rejected difference, the only ones that
# admit a non-default one (DPOTrainer.__init__).
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
FINAL_METRICS = ("eval/rewards/accuracies", "eval/rewards/margins", "loss/eval", "loss/train", "time/train")


@dataclass
class DPOStage(StageConfig):
    trl_config = DPOConfig

    def validate(self, recipe: Recipe, where: str) -> None:
        super().validate(recipe, where)
        if self.data is None:
            raise InputError(f"recipe: {where} needs a data block (path, hub or stage) with preference pairs "
                             "(prompt, chosen, rejected)")
        lora = recipe.model.lora
        if lora is None:
            raise InputError(f"recipe: {where}: the DPO stage trains a LoRA adapter, so that its reference is a "
                             "frozen adapter or the base, never a second full model; add a model.lora block")
        targets = [lora.target_modules] if isinstance(lora.target_modules, str) else lora.target_modules
        if "lm_head" in targets:
            raise InputError(f"recipe: model.lora.target_modules includes lm_head, which {where} cannot train (trl "
                             "computes log-probs from lm_head.weight directly); remove it")
        check_dpo_options(self.trainer_args(recipe, where, output_dir=tempfile.gettempdir()), f"{where}.args")
        if self.data.path:  # local files are checked row by row now, not after the model has loaded
            load_splits(self.data, recipe, "preference", f"{where}.data")


def check_dpo_options(args: DPOConfig, where: str) -> None:
    """The option combinations DPOTrainer refuses only once it runs (trl 1.16), refused when the recipe loads."""
    for loss in args.loss_type:
        if loss not in LOSS_TYPES:
            close = difflib.get_close_matches(str(loss), LOSS_TYPES, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise InputError(f"recipe: {where}.loss_type: unknown loss '{loss}'; {hint}trl's losses are "
                             f"{', '.join(LOSS_TYPES)}")
    if args.f_divergence_type not in F_DIVERGENCES:
        raise InputError(f"recipe: {where}.f_divergence_type must be one of {', '.join(F_DIVERGENCES)}, "
                         f"got {args.f_divergence_type!r}")
    if args.f_divergence_type != "reverse_kl" and not set(args.loss_type) <= set(F_DIVERGENCE_LOSSES):
        raise InputError(f"recipe: {where}.f_divergence_type {args.f_divergence_type} needs loss types among "
                         f"{', '.join(F_DIVERGENCE_LOSSES)}; got {', '.join(args.loss_type)}")
    if "exo_pair" in args.loss_type and args.label_smoothing == 0:
        raise InputError(f"recipe: {where}: loss_type exo_pair needs label_smoothing > 0 (the EXO paper uses 1e-3)")
    if "robust" in args.loss_type and not 0 <= args.label_smoothing < 0.5:
        # Robust DPO (Chowdhury et al. 2024) divides by 1 - 2*label_smoothing, the label-flip rate.
        raise InputError(f"recipe: {where}.label_smoothing must be in [0, 0.5) for loss_type robust (a label-flip "
                         f"rate), got {args.label_smoothing}")
    if args.sync_ref_model:
        raise InputError(f"recipe: {where}.sync_ref_model needs a separate reference model, and this stage keeps the "
                         "reference as an adapter; remove it")


def preference_pairs(ds: datasets.Dataset) -> datasets.Dataset:
    """The three columns DPO trains on; provenance columns (scores, ids) stay in the data files."""
    return ds.select_columns(["prompt", "chosen", "rejected"])


def build_trainer(cfg: DPOStage, ctx: StageContext, callbacks: list | None = None) -> DPOTrainer:
    recipe = ctx.recipe
    where = f"stages.{ctx.name}"
    resolved = resolve_model(recipe.model.base)
    tokenizer = load_tokenizer(resolved)
    splits = load_splits(cfg.data, recipe, "preference", f"{where}.data",
                         ctx.run.stage_dir(cfg.data.stage) if cfg.data.stage else None)
    ctx.metrics.update(splits.metrics)  # degenerate pairs left out (data.bad_rows: drop)
    args = cfg.trainer_args(recipe, where, output_dir=ctx.dir / "checkpoints")
    if splits.test is None:
        args.eval_strategy = "no"
    if cfg.from_:
        # The policy continues the upstream adapter; trl adds its frozen copy "ref" as the reference.
        model = load_trainable_model(recipe.model, resolved, ctx.input_path(cfg.from_, "adapter"))
        peft_config = None
        log.info("%s: reference = %s's adapter, kept frozen as adapter 'ref' on the same base", ctx.name, cfg.from_)
    else:
        # trl wraps the base in a new adapter; with adapters disabled the model is the base, the reference.
        model = load_base_model(recipe.model, resolved)
        peft_config = lora_config(recipe.model.lora)
        log.info("%s: reference = the base model (adapters disabled)", ctx.name)
    return DPOTrainer(model=model, args=args, train_dataset=preference_pairs(splits.train),
                      eval_dataset=preference_pairs(splits.test) if splits.test is not None else None,
                      processing_class=tokenizer, callbacks=callbacks, peft_config=peft_config)


def train(cfg: DPOStage, ctx: StageContext) -> StageResult:
    recipe = ctx.recipe
    tracker = Tracker(ctx.dir, recipe.report_to, f"{recipe.name}/{ctx.name}", ctx.is_main, cfg.args)
    metrics_cb = MetricsCallback(tracker)
    with completion_positions_only():
        trainer = build_trainer(cfg, ctx, [metrics_cb])
        with trunk_shares_prefixes(trainer.model):  # a pair's prompt once for its chosen and rejected rows
            train_and_evaluate(trainer, ctx)  # ends with held-out implicit-reward accuracy and margins
    tracker.close()

    # The output is the policy alone: save_pretrained would also write the frozen reference copy as adapter/ref/.
    if "ref" in trainer.model.peft_config:
        trainer.model.delete_adapter("ref")
    trainer.save_model(str(ctx.dir / "adapter"))  # adapter + tokenizer, main process only, inside the Trainer
    final = {k: metrics_cb.last[k] for k in FINAL_METRICS if k in metrics_cb.last}
    return StageResult(outputs={"adapter": "adapter"}, metrics=final)
