"""The eval stage: every named model on the same suites, with the same seeds, side by side.

```yaml
eval:
  kind: eval
  models: [base, sft, dpo]        # `base` is the recipe's base model; a swept stage stands for all its members
  generation:
    prompts: {path: ../../data/sentiment/prompts_heldout.jsonl}
    samples_per_prompt: 4
    max_new_tokens: 64
    temperature: 1.0
    scorer: vader                 # a gold scorer (preferences.scorers); null = none
    reward_model: rm              # a reward_model stage scores every completion too; null = none
    reference: sft                # KL(model || reference) from the samples; null = none
  mc: {data: {path: ../../data/mc}, shots: 0, mode: letter, chat_template: false,
       circular: false,             # CircularEval: right only if right under every rotation of the options
       contamination: null}         # {shards: 10, permutations: 20}: Oren et al.'s test on these questions
  judge: {baseline: sft}          # + any judge key (judge.config); the local judge is the base model;
                                  # samples_per_prompt: k judges each prompt's first k samples (default: all)
  arena: {baseline: base, style_control: true, bootstrap: 1000, cache: judge.sqlite}  # + any judge key
```

Outputs (the report reads these names):
  results.json          {"models": {NAME: entry}, "config": {...}}, entry = {"source", "gen", "mc", "judge"}
  NAME/results.json     that model's entry
  NAME/samples.jsonl    its completions with their prompts and scores (eval.generation.sample_rows)
  metrics.jsonl         flat `eval/NAME/...` scalars
  arena.json            with an arena block: the leaderboard (judge.arena.leaderboard) and the judge calls made

Models are held as the design says: one base model in memory, every stage's adapter loaded onto it as a named peft
adapter, `base` being the same model with adapters disabled (`ModelPool`). The engine (`evaluate_models`) is
shared with the `alignlab eval` and `alignlab judge` commands (eval/cli.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import PartialState

from common.adapters import using
from common.config import DataSpec, ModelConfig, Recipe, StageConfig
from common.data import load_splits
from common.errors import InputError
from common.lora_folding import folded_lora
from common.runs import StageContext, StageResult, atomic_write_text
from common.sampling import DEFAULT_TOKEN_BUDGET, Prompt, Samples, encode_prompts, scorer_text, shard_of
from common.schema import to_dict, unknown_key_error
from common.tracking import Tracker
from eval import best_of as best_of_n
from eval.generation import SamplingSettings, kl_to_reference, sample_model, sample_rows, summarize
from judge import JudgeConfig, Pair, evaluate_pairs, with_paths

log = logging.getLogger(__name__)

BASE = "base"  # in `models:`, the recipe's base model
GOLD = "gold"  # in `best_of[].reward`, the generation block's scorer


# --- the recipe block --------------------------------------------------------------------------------

@dataclass
class MCDataSpec:
    """Multiple-choice questions (eval.mc.data.load_questions): a local folder or file, or a hub dataset."""

    path: str | None = None      # a folder with <split>.jsonl (recipes/data/mc), MMLU CSVs, or one table file
    hub: str | None = None       # a hub dataset in the cais/mmlu layout (needs internet)
    split: str = "test"
    dev_path: str | None = None  # k-shot examples; by default the same source's `dev_split`
    dev_split: str = "dev"
    subject: str | None = None   # keep one subject
    limit: int | None = None     # the first N questions

    def __post_init__(self):
        if bool(self.path) == bool(self.hub):
            raise ValueError("needs exactly one of path / hub: a local folder or file of questions, or a hub dataset")


@dataclass
class MCBlock:
    data: MCDataSpec
    shots: int = 0
    mode: Literal["letter", "cloze"] = "letter"
    chat_template: bool = False
    batch_size: int = 8
    circular: bool = False  # CircularEval: also score every rotation of the options (eval.mc.results.rotations)
    contamination: ContaminationBlock | None = None  # Oren et al.'s test on these questions; null = none


@dataclass
class GenerationBlock:
    # Every row is a prompt; with test_path, or a stage's data, the held-out file is used.
    prompts: DataSpec
    samples_per_prompt: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    token_budget: int = DEFAULT_TOKEN_BUDGET  # a sampling batch's rows x (prompt + max_new_tokens)
    scorer: Any = None               # a gold scorer spec (preferences.scorers), e.g. vader
    reward_model: str | None = None  # a reward_model stage
    reference: str | None = None     # a model name (base or a stage) for KL(model || reference)


@dataclass
class ContaminationBlock:
    """Oren et al. 2023's sharded permutation test (eval.contamination) on the MC questions."""

    shards: int = 10
    permutations: int = 20
    seed: int = 0


@dataclass
class EvalJudge(JudgeConfig):
    """A judge block (judge.config: backend, local / http, templates, cache, ...) plus the model every other model
    is compared with. A local judge without a model is the recipe's base model. `samples_per_prompt`: the judge
    reads each prompt's first k samples only (null: all of them): the gold and learned rewards are cheap enough to
    take several samples a prompt for tighter intervals, a judge call costs a generation."""

    baseline: str = field(kw_only=True)
    samples_per_prompt: int | None = field(default=None, kw_only=True)


@dataclass
class EvalArena(EvalJudge):
    """An arena of all `models` (judge.arena): a judge block whose baseline is the model anchored at 1000, plus
    `style_control` (answer length and markdown as regression features) and `bootstrap` (resamples of prompts)."""

    style_control: bool = field(default=False, kw_only=True)
    bootstrap: int = field(default=1000, kw_only=True)


@dataclass
class BestOfModel:
    """An eval-time model (eval.best_of): `n` samples of `policy` per answer, the one `reward` scores highest."""

    policy: str  # a model name, as in `models`
    reward: str  # a reward_model stage, or `gold`: the generation block's scorer
    n: int = 4
    name: str | None = None  # default best_of_<n>_<policy>

    @property
    def model_name(self) -> str:
        return self.name or f"best_of_{self.n}_{self.policy}"


@dataclass
class EvalStage(StageConfig):
    models: list[str] = field(default_factory=lambda: [BASE])
    best_of: list[BestOfModel] = field(default_factory=list)
    generation: GenerationBlock | None = None
    mc: MCBlock | None = None
    judge: EvalJudge | None = None
    arena: EvalArena | None = None  # writes arena.json

    def references(self) -> list[str]:
        refs = self.group_references()
        gen = self.generation
        if gen is not None:
            refs += [r for r in (gen.reward_model, gen.reference, gen.prompts.stage) if r and r != BASE]
        refs += [r for b in self.best_of for r in (b.policy, b.reward) if r not in (BASE, GOLD)]
        return list(dict.fromkeys(refs))

    def group_references(self) -> list[str]:
        # A swept stage in `models` stands for all its members: each is evaluated (Recipe.inputs runs them first).
        return [m for m in self.models if m != BASE]

    def with_groups_expanded(self, block: dict[str, Any], sweeps: dict[str, list[str]]) -> dict[str, Any]:
        return block | {"models": [member for m in self.models for member in sweeps.get(m, [m])]}

    def validate(self, recipe: Recipe, where: str) -> None:
        super().validate(recipe, where)
        if self.from_ or self.data is not None or self.args:
            raise InputError(f"recipe: {where}: an eval stage takes no from / data / args; name the models to "
                             "evaluate in models: and the data in generation.prompts / mc.data")
        if BASE in recipe.stages:
            raise InputError(f"recipe: stages.{BASE}: '{BASE}' names the base model in an eval stage's models; "
                             "rename that stage")
        if self.generation is None and self.mc is None:
            raise InputError(f"recipe: {where} evaluates nothing; add a generation block, an mc block or both")
        names = self.model_names(recipe, where)
        if self.generation is not None:
            generation_plan(self.generation, recipe, f"{where}.generation")
        if self.mc is not None:
            mc_plan(self.mc, recipe, f"{where}.mc", check_only=True)
        self.check_best_of(recipe, where, names)
        for block in ("judge", "arena"):
            if getattr(self, block) is not None and self.generation is None:
                raise InputError(f"recipe: {where}.{block} compares generated answers; add a generation block")
        if self.judge is not None:
            judge_plan(self.judge, recipe, f"{where}.judge", names)
        if self.arena is not None:
            arena_plan(self.arena, recipe, f"{where}.arena", names)

    def check_best_of(self, recipe: Recipe, where: str, names: list[str]) -> None:
        for i, b in enumerate(self.best_of):
            at = f"recipe: {where}.best_of[{i}]"
            if self.generation is None:
                raise InputError(f"{at}: best-of-N samples answers; add a generation block")
            if b.n < 1:
                raise InputError(f"{at}.n must be >= 1, got {b.n}: the number of samples the reward picks from")
            check_model_name(b.policy, recipe, f"{where}.best_of[{i}].policy")
            if b.reward == GOLD:
                if self.generation.scorer is None:
                    raise InputError(f"{at}.reward: gold picks by the generation block's scorer, which is null; "
                                     "set generation.scorer or name a reward_model stage")
            elif b.reward not in recipe.stages or recipe.stages[b.reward].kind != "reward_model":
                raise InputError(f"{at}.reward: '{b.reward}' is not a reward_model stage; name one, or '{GOLD}' "
                                 "for the generation block's scorer")
            if b.model_name in names or [c.model_name for c in self.best_of].count(b.model_name) > 1:
                raise InputError(f"{at}: the model name '{b.model_name}' is taken; give this entry a distinct name:")

    def model_names(self, recipe: Recipe, where: str) -> list[str]:
        """`models` with every swept stage replaced by its members, each checked to be a model."""
        if not self.models:
            raise InputError(f"recipe: {where}.models is empty; name at least one model, e.g. [{BASE}, sft]")
        names = [member for name in self.models for member in recipe.sweeps.get(name, [name])]
        for name in names:
            check_model_name(name, recipe, f"{where}.models")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InputError(f"recipe: {where}.models names {', '.join(duplicates)} twice; list each model once")
        return names


def check_model_name(name: str, recipe: Recipe, where: str) -> None:
    if name == BASE:
        return
    if name not in recipe.stages:
        raise unknown_key_error(name, [BASE, *recipe.stages], f"{where} (a model: '{BASE}' or a stage)",
                                "recipe")
    if isinstance(recipe.stages[name], EvalStage):
        raise InputError(f"recipe: {where}: '{name}' is an eval stage, which trains no model; name '{BASE}' or "
                         "a training stage")


# --- plans: what to run, built from the recipe (for the stage) or from arguments (for the CLI) -------

@dataclass
class RewardModelSource:
    directory: Path
    model: ModelConfig  # the base the reward model's adapter sits on


@dataclass
class BestOfPlan:
    name: str
    policy: str
    n: int
    reward: RewardModelSource | None  # None: the generation scorer (gold)


@dataclass
class GenerationPlan:
    prompts: list[Prompt]
    settings: SamplingSettings
    scorer: Any = None  # a preferences.scorers.Scorer
    reward_model: RewardModelSource | None = None
    reference: str | None = None


@dataclass
class MCPlan:
    questions: list
    dev: list | None
    shots: int = 0
    mode: str = "letter"
    chat_template: bool = False
    batch_size: int = 8
    circular: bool = False
    contamination: ContaminationBlock | None = None


@dataclass
class JudgePlan:
    config: JudgeConfig
    baseline: str
    samples_per_prompt: int | None = None

    def rows(self, samples: Sequence[dict]) -> list[dict]:
        """The samples.jsonl rows the judge reads: each prompt's first `samples_per_prompt` samples."""
        return [row for row in samples if self.samples_per_prompt is None
                or row.get("sample", 0) < self.samples_per_prompt]


@dataclass
class ArenaPlan:
    judge: JudgePlan
    style_control: bool = False
    bootstrap: int = 1000


def load_prompts(spec: DataSpec, recipe: Recipe, where: str, stage_dir: Path | None = None) -> list[Prompt]:
    """Every row's prompt, or the held-out rows where the source has them (test_path, a stage's test.jsonl)."""
    splits = load_splits(dataclasses.replace(spec, test_size=0.0), recipe, "prompt", where, stage_dir)
    rows = splits.test if splits.test is not None else splits.train
    if spec.limit is not None:
        rows = rows.select(range(min(spec.limit, len(rows))))
    return list(rows["prompt"])


def check_sampling(settings: SamplingSettings, label: Callable[[str], str]) -> None:
    """`label(key)` names a setting in messages: its recipe key or its command-line flag."""
    for key in ("samples_per_prompt", "max_new_tokens", "token_budget"):
        if getattr(settings, key) < 1:
            raise InputError(f"{label(key)} must be >= 1, got {getattr(settings, key)}")
    if settings.temperature <= 0:
        raise InputError(f"{label('temperature')} must be > 0 (the KL estimate needs a sampling distribution), "
                         f"got {settings.temperature}")


def generation_plan(block: GenerationBlock, recipe: Recipe, where: str,
                    ctx: StageContext | None = None) -> GenerationPlan:
    """Check the generation block; with a run context (at run time) also locate the reward model's directory."""
    from preferences.scorers import build_scorer

    settings = SamplingSettings(block.samples_per_prompt, block.max_new_tokens, block.temperature,
                                block.token_budget, recipe.seed)
    check_sampling(settings, lambda key: f"recipe: {where}.{key}")
    if block.prompts.stage and ctx is None:
        prompts = []  # that stage writes them when it runs
    else:
        stage_dir = ctx.run.stage_dir(block.prompts.stage) if block.prompts.stage else None
        prompts = load_prompts(block.prompts, recipe, f"{where}.prompts", stage_dir)
    scorer = build_scorer(block.scorer, f"{where}.scorer") if block.scorer is not None else None
    if block.reference is not None:
        check_model_name(block.reference, recipe, f"{where}.reference")
    reward_model = None
    if block.reward_model is not None:
        if block.reward_model not in recipe.stages:
            raise unknown_key_error(block.reward_model, list(recipe.stages), f"{where}.reward_model (a reward_model "
                                    "stage)", "recipe")
        if recipe.stages[block.reward_model].kind != "reward_model":
            raise InputError(f"recipe: {where}.reward_model: '{block.reward_model}' is a "
                             f"{recipe.stages[block.reward_model].kind} stage; name a reward_model stage")
        if ctx is not None:
            reward_model = RewardModelSource(ctx.input_path(block.reward_model, "reward_model"), recipe.model)
    return GenerationPlan(prompts, settings, scorer, reward_model, block.reference)


def load_mc_questions(source: str | Path, split: str, dev_source: str | Path | None, dev_split: str, shots: int,
                      subject: str | None, limit: int | None, where: str) -> tuple[list, list | None]:
    """Test questions (the first `limit`) and, for k-shot prompts, the dev questions."""
    from eval.mc.data import load_questions

    if shots < 0:
        raise InputError(f"{where}: shots must be >= 0, got {shots}")
    if limit is not None and limit < 1:
        raise InputError(f"{where}: limit must be >= 1, got {limit}")
    if shots > 0 and dev_source is None and Path(source).is_file():
        raise InputError(f"{where}: {shots}-shot prompts need dev examples, and {source} is a single file; give "
                         "a dev file (dev_path in a recipe, --dev on the command line) or a folder with dev.jsonl")
    questions = load_questions(source, split=split, subject=subject)
    if limit is not None:
        questions = questions[:limit]
    dev = load_questions(dev_source or source, split=dev_split, subject=subject) if shots > 0 else None
    return questions, dev


def mc_plan(block: MCBlock, recipe: Recipe, where: str, check_only: bool = False) -> MCPlan | None:
    spec = block.data
    if block.batch_size < 1:
        raise InputError(f"recipe: {where}.batch_size must be >= 1, got {block.batch_size}")
    if check_only and spec.hub:
        return None  # a hub dataset is read when the stage runs (it needs internet)
    source = str(recipe.resolve_path(spec.path)) if spec.path else spec.hub
    dev_source = str(recipe.resolve_path(spec.dev_path)) if spec.dev_path else None
    questions, dev = load_mc_questions(source, spec.split, dev_source, spec.dev_split, block.shots, spec.subject,
                                       spec.limit, f"recipe: {where}")
    if block.contamination is not None:
        from eval.contamination import check_size

        check_size(len(questions), block.contamination.shards, block.contamination.permutations,
                   f"recipe: {where}.contamination")
    return MCPlan(questions, dev, block.shots, block.mode, block.chat_template, block.batch_size, block.circular,
                  block.contamination)


def judge_plan(block: EvalJudge, recipe: Recipe, where: str, names: Sequence[str]) -> JudgePlan:
    """The judge config with the lab's defaults: a local judge is the recipe's base model unless it names one;
    template and cache paths are relative to the recipe."""
    if block.baseline not in names:
        raise InputError(f"recipe: {where}.baseline '{block.baseline}' is not among the models evaluated "
                         f"({', '.join(names)}); add it to models or choose one of them")
    if block.samples_per_prompt is not None and block.samples_per_prompt < 1:
        raise InputError(f"recipe: {where}.samples_per_prompt is {block.samples_per_prompt}; the judge reads at least "
                         "1 sample a prompt: set a positive number, or null for every sample")
    config = with_paths(block, recipe.resolve_path, where)
    if config.backend == "local" and config.local.model is None:
        config = dataclasses.replace(config, local=dataclasses.replace(config.local, model=recipe.model.base))
    return JudgePlan(config, block.baseline, block.samples_per_prompt)


def arena_plan(block: EvalArena, recipe: Recipe, where: str, names: Sequence[str]) -> ArenaPlan:
    """The arena block: `judge_plan`'s judge (its baseline the model anchored at 1000), style control, bootstrap."""
    if len(names) < 2:
        raise InputError(f"recipe: {where}: an arena needs at least 2 models, models has {len(names)} "
                         f"({', '.join(names)}); add models or remove the arena block")
    if block.bootstrap < 1:
        raise InputError(f"recipe: {where}.bootstrap must be >= 1, got {block.bootstrap}")
    return ArenaPlan(judge_plan(block, recipe, where, names), block.style_control, block.bootstrap)


# --- models ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSource:
    """A model to evaluate: `model.base` (with its dtype and quantization) plus, optionally, a PEFT adapter."""

    name: str
    model: ModelConfig
    adapter: Path | None = None
    description: str = ""


def stage_model_source(name: str, model: ModelConfig, stage_dir: Path, outputs: dict[str, str]) -> ModelSource:
    """The model a training stage saved: its `adapter` on the base, or (full fine-tuning) its `model` directory."""
    if "adapter" in outputs:
        path = stage_dir / outputs["adapter"]
        return ModelSource(name, model, path, f"{name}: adapter {path}")
    if "model" in outputs:
        path = stage_dir / outputs["model"]
        return ModelSource(name, dataclasses.replace(model, base=str(path)), None, f"{name}: model {path}")
    raise InputError(f"stage '{name}' saved no model (its outputs: {', '.join(outputs) or 'none'}); evaluate a "
                     "stage that trains one (an adapter or a model)")


def eval_device() -> torch.device:
    """This process's device: its own GPU under a launch of several processes, else the GPU or the CPU."""
    return PartialState().device


class ModelPool:
    """Holds one base model at a time, with every adapter on that base loaded as a named peft adapter; switching
    between them is `common.adapters.using` (adapters off for the base itself), never a second copy of the base.
    Sources on other bases (another model, a fully fine-tuned stage) replace the loaded one when they are used."""

    def __init__(self, sources: Sequence[ModelSource]):
        self.sources = {s.name: s for s in sources}
        self._key: tuple | None = None
        self._model = None
        self._tokenizer = None
        self._adapters: dict[str, str] = {}

    @staticmethod
    def _base_key(source: ModelSource) -> tuple:
        m = source.model
        return (m.base, m.dtype, m.quantization, m.quant_type, m.double_quant, m.compute_dtype)

    def _load(self, key: tuple, cfg: ModelConfig) -> None:
        from peft import PeftModel

        from common.models import load_base_model, load_tokenizer, resolve_model

        self.close()
        resolved = resolve_model(cfg.base)
        model = load_base_model(cfg, resolved, training=False)
        if cfg.quantization == "none":  # bitsandbytes layers were placed when they loaded
            model = model.to(eval_device())
        on_base = [s for s in self.sources.values() if s.adapter is not None and self._base_key(s) == key]
        for i, source in enumerate(on_base):
            # Our own names: stage names may hold '.', which torch module names may not.
            self._adapters[source.name] = f"adapter{i}"
            if i == 0:
                model = PeftModel.from_pretrained(model, source.adapter, adapter_name="adapter0")
            else:
                model.load_adapter(source.adapter, adapter_name=f"adapter{i}")
        self._model, self._tokenizer, self._key = model.eval(), load_tokenizer(resolved), key
        log.info("loaded %s with %d adapter(s)", cfg.base, len(on_base))

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[tuple[Any, Any]]:
        """(model, tokenizer) as the model `name`, for forward passes only: its LoRA adapter is folded into the base
        weights for the block (`common.lora_folding`: one fold for all of the block's sampling, MC and KL passes)."""
        from peft import PeftModel

        source = self.sources[name]
        key = self._base_key(source)
        if key != self._key:
            self._load(key, source.model)
        model = self._model
        adapter = self._adapters[name] if source.adapter is not None else None  # None: the base, adapters off
        with using(model, adapter) if isinstance(model, PeftModel) else contextlib.nullcontext():
            with folded_lora(model):
                yield model, self._tokenizer

    def close(self) -> None:
        self._model = self._tokenizer = self._key = None
        self._adapters = {}
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --- the engine --------------------------------------------------------------------------------------

@dataclass
class ModelResult:
    source: str
    gen: dict[str, Any] | None = None
    mc: dict[str, Any] | None = None
    judge: dict[str, Any] | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)

    def entry(self) -> dict[str, Any]:
        return {"source": self.source, "gen": self.gen, "mc": self.mc, "judge": self.judge}


def evaluate_models(pool: ModelPool, names: Sequence[str], gen: GenerationPlan | None = None,
                    mc: MCPlan | None = None, judge: JudgePlan | None = None,
                    best_of: Sequence[BestOfPlan] = (), shard: tuple[int, int] = (0, 1)) -> dict[str, ModelResult]:
    """Run the suites over `names` (all in `pool`, as are the reference and the best-of-N policies). Each model is
    made active once for its samples and MC questions; then the reference once for every model's KL; then the models
    are freed before the reward model and the judge load. Best-of-N models (`best_of`, generation only) come after
    `names` in the results.

    Under a launch of several processes (`shard=(index, count)`, every process calls) the sampling and the KL passes
    are split between the processes, which exchange what they computed; the main process (index 0) then answers
    the MC questions, scores, judges and returns the results, the others return empty entries."""
    from eval.contamination import contamination_test, mc_example_texts
    from eval.mc import evaluate_mc

    main = shard[0] == 0
    results = {name: ModelResult(pool.sources[name].description or name) for name in names}
    samples: dict[str, Samples] = {}
    vocabularies: dict[str, dict] = {}
    for i, name in enumerate(names, 1):
        log.info("model %d/%d: %s", i, len(names), name)
        with pool.use(name) as (model, tokenizer):
            if gen is not None:
                encoded = encode_prompts(tokenizer, gen.prompts, name)
                samples[name] = sample_model(model, tokenizer, encoded, gen.settings, f"sampling {name}", shard)
                vocabularies[name] = tokenizer.get_vocab()
            if mc is not None and main:
                results[name].mc = evaluate_mc(model, tokenizer, mc.questions, mc.dev, shots=mc.shots, mode=mc.mode,
                                               chat_template=mc.chat_template, batch_size=mc.batch_size,
                                               circular=mc.circular)
                if mc.contamination is not None:
                    results[name].mc["contamination"] = contamination_test(
                        model, tokenizer, mc_example_texts(mc.questions), **dataclasses.asdict(mc.contamination))
    if gen is None:
        pool.close()
        return results
    pool_of_n: dict[str, Samples] = {}  # each best-of-N model's policy samples, N per answer
    for plan in best_of:
        with pool.use(plan.policy) as (model, tokenizer):
            settings = dataclasses.replace(gen.settings, samples_per_prompt=gen.settings.samples_per_prompt * plan.n)
            pool_of_n[plan.name] = sample_model(model, tokenizer, encode_prompts(tokenizer, gen.prompts, plan.policy),
                                                settings, f"sampling {plan.policy} for {plan.name}", shard)

    kl: dict[str, list[float] | None] = dict.fromkeys(names)
    if gen.reference is not None:
        with pool.use(gen.reference) as (reference, ref_tokenizer):
            for name in names:
                if vocabularies[name] != ref_tokenizer.get_vocab():
                    raise InputError(f"KL({name} || {gen.reference}) compares log-probs of the same tokens, but "
                                     "the two tokenizers differ; choose a reference on the same base model")
                if name == gen.reference:  # 0 by construction; recomputed it would be float rounding
                    kl[name] = [0.0] * len(samples[name].completions)
                    continue
                log.info("KL(%s || %s)", name, gen.reference)
                kl[name] = kl_to_reference(reference, ref_tokenizer.pad_token_id, samples[name], gen.settings, shard)
    pool.close()
    if not main:
        return results  # the main process scores, judges and writes what every process sampled

    texts = [scorer_text(p) for p in gen.prompts]
    n = gen.settings.samples_per_prompt
    flat_texts = [t for t in texts for _ in range(n)]
    reward_models: dict[Path, Any] = {}

    def rm_score(source: RewardModelSource, completions: list[str], per_prompt: int) -> list[float]:
        from reward_model.api import RewardModel

        if source.directory not in reward_models:
            reward_models[source.directory] = RewardModel.load(source.directory, source.model)
        reward_model = reward_models[source.directory]
        # A reward model trained on text pairs reads a chat prompt as its text.
        prompts = [p for p in (gen.prompts if reward_model.chat else texts) for _ in range(per_prompt)]
        return reward_model.score(prompts, completions).tolist()

    gold = {name: gen.scorer.score(flat_texts, samples[name].texts) if gen.scorer else None for name in names}
    rm: dict[str, list[float] | None] = dict.fromkeys(names)
    if gen.reward_model is not None:
        for name in names:
            rm[name] = rm_score(gen.reward_model, samples[name].texts, n)
    picked = {}
    for plan in best_of:
        everything, per_prompt = pool_of_n.pop(plan.name), n * plan.n
        if plan.reward is None:
            scores = gen.scorer.score([t for t in texts for _ in range(per_prompt)], everything.texts)
        else:
            scores = rm_score(plan.reward, everything.texts, per_prompt)
        rewards = torch.tensor(scores, dtype=torch.float64).view(len(gen.prompts), per_prompt)
        chosen = best_of_n.select_best(rewards, plan.n)
        samples[plan.name] = best_of_n.pick(everything, chosen.flatten().tolist(), n)
        picked[plan.name] = {"policy": plan.policy, "n": plan.n, "kl_bound": best_of_n.kl_bound(plan.n),
                             "kl_estimate": best_of_n.kl_estimate(rewards, plan.n)}
        results[plan.name] = ModelResult(f"best of {plan.n} samples of {plan.policy} by "
                                         f"{'gold' if plan.reward is None else plan.reward.directory}")
        gold[plan.name] = gen.scorer.score(flat_texts, samples[plan.name].texts) if gen.scorer else None
        rm[plan.name] = rm_score(gen.reward_model, samples[plan.name].texts, n) if gen.reward_model else None
    reward_models.clear()
    gc.collect()
    for name in results:
        # The reference's own difference is 0 by construction: only the other models get one.
        ref_gold = gold.get(gen.reference) if name != gen.reference else None
        results[name].gen = summarize(samples[name], n, gold[name], rm[name], kl.get(name), ref_gold,
                                      seed=gen.settings.seed)
        if name in picked:  # KL(best-of-N || its policy): the bound and its sampled estimate
            results[name].gen["best_of"] = picked[name]
            if picked[name]["policy"] == gen.reference:  # its estimate is its KL to the reference: on the frontier
                results[name].gen["kl_to_ref"] = {"mean": picked[name]["kl_estimate"], "ci": None}
        results[name].samples = sample_rows(gen.prompts, samples[name], n, gold[name], rm[name], kl.get(name))
    if judge is not None:
        for name in results:
            if name != judge.baseline:
                log.info("judge: %s vs %s", name, judge.baseline)
                results[name].judge = judge_samples(judge.config, judge.rows(results[name].samples),
                                                    judge.rows(results[judge.baseline].samples), judge.baseline)
    return results


def sample_key(row: dict) -> str:
    """What pairs two models' answers: the same prompt and sample number."""
    return json.dumps([row["prompt"], row.get("sample", 0)], sort_keys=True)


def judge_samples(config: JudgeConfig, rows_a: Sequence[dict], rows_b: Sequence[dict], vs: str) -> dict[str, Any]:
    """Pairwise win rate of answers a against answers b (samples.jsonl rows), paired by prompt and sample number;
    the judge entry of results.json."""
    by_key = {sample_key(row): row for row in rows_b}
    pairs = []
    for row in rows_a:
        other = by_key.get(sample_key(row))
        if other is not None:
            pairs.append(Pair(scorer_text(row["prompt"]), row["completion"], other["completion"],
                              gold_a=(row.get("scores") or {}).get("gold"),
                              gold_b=(other.get("scores") or {}).get("gold")))
    if not pairs:
        raise InputError("judge: the two sets of answers share no (prompt, sample) pair; compare answers to the "
                         "same prompts")
    _, m = evaluate_pairs(local_judge_on_device(config), pairs)

    def rate(key: str) -> float | None:  # NaN (no parseable or no decisive pair) is not JSON: null
        value = m.get(key)
        return None if value is None or math.isnan(value) else value

    return {
        "vs": vs, "n": len(pairs), "win_rate": rate("judge/win_rate"),
        "ci": [rate("judge/win_rate_ci_low"), rate("judge/win_rate_ci_high")],
        "lc_win_rate": rate("judge/length_controlled_win_rate"),
        "position_consistency": rate("judge/position_consistency"),
        "wins": int(m["judge/wins"]), "ties": int(m["judge/ties"]), "losses": int(m["judge/losses"]),
        "gold_agreement": rate("judge/gold_agreement"),
    }


def arena_pairs(samples: dict[str, Sequence[dict]]) -> list[tuple[str, str, Any]]:
    """(model a, model b, judge Pair) for every unordered pair of models and every (prompt, sample) both answered."""
    names = list(samples)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            by_key = {sample_key(row): row for row in samples[b]}
            for row in samples[a]:
                other = by_key.get(sample_key(row))
                if other is not None:
                    out.append((a, b, Pair(scorer_text(row["prompt"]), row["completion"], other["completion"])))
    return out


class AnnouncingJudge:
    """A judge that says how many calls it is about to make before it makes them: the judge protocol hands its
    backend, in one `ask`, exactly the queries the cache does not hold."""

    def __init__(self, judge: Any):
        self.judge, self.judge_id, self.calls = judge, judge.judge_id, 0

    def ask(self, queries, labels, on_result=None):
        print(f"judge calls: {len(queries)} (not in the cache)", flush=True)
        self.calls += len(queries)
        return self.judge.ask(queries, labels, on_result=on_result)


def run_arena(config: Any, samples: dict[str, Sequence[dict]], baseline: str, style_control: bool = False,
              n_resamples: int = 1000) -> dict[str, Any]:
    """Judge every pair of models on their shared (prompt, sample)s, both orders, and fit the leaderboard
    (judge.arena). `samples`: model name -> samples.jsonl rows."""
    from judge import build_judge, build_templates, judge_pairs, open_cache
    from judge.arena import Battle, leaderboard

    pairs = arena_pairs(samples)
    if not pairs:
        raise InputError(f"arena: the models ({', '.join(samples)}) share no (prompt, sample); compare answers to "
                         "the same prompts")
    print(f"arena: {len(samples)} models, {len(pairs)} pairs of answers, {2 * len(pairs)} judgements (both orders)",
          flush=True)
    config = local_judge_on_device(config)
    judge = AnnouncingJudge(build_judge(config))
    cache = open_cache(config)
    started = time.perf_counter()
    try:
        verdicts = judge_pairs(judge, [p for _, _, p in pairs], template=build_templates(config)["pairwise"],
                               cache=cache)
    finally:
        if cache is not None:
            cache.close()
    if judge.calls == 0:
        print("judge calls: 0 (every judgement was in the cache)", flush=True)
    # An unparseable verdict is no battle; a position-inconsistent one is already a tie.
    battles = [Battle(p.prompt, a, b, v.winner, p.answer_a, p.answer_b)
               for (a, b, p), v in zip(pairs, verdicts, strict=True) if v.winner is not None]
    board = leaderboard(battles, baseline, style_control=style_control, n_resamples=n_resamples,
                        seed=getattr(config, "seed", 0))
    return board | {"judge_calls": judge.calls, "judge_seconds": round(time.perf_counter() - started, 3),
                    "unparseable": len(pairs) - len(battles)}


def local_judge_on_device(config: Any) -> Any:
    """A local judge resolved to its model directory and on the GPU when there is one."""
    if config.backend != "local":
        return config
    from common.models import resolve_model

    local = config.local
    return dataclasses.replace(config, local=dataclasses.replace(
        local, model=str(resolve_model(local.model).path),
        device=local.device or ("cuda" if torch.cuda.is_available() else None)))


# The numbers done.json (and the run's summary table) carry; metrics.jsonl has every scalar.
ARENA_FILE = "arena.json"
HEADLINE = ("gold_reward", "gold_reward_vs_ref", "rm_reward", "kl_to_ref", "mc_acc", "judge_win_rate", "arena_rating")


def flat_metrics(results: dict[str, ModelResult]) -> dict[str, float]:
    """Every scalar of the results as `eval/NAME/...` (a mean for an interval), for metrics.jsonl."""
    out: dict[str, float] = {}
    for name, r in results.items():
        for key, value in (r.gen or {}).items():
            if isinstance(value, dict) and "mean" in value:
                out[f"eval/{name}/{key}"] = value["mean"]
            elif isinstance(value, dict):  # best_of: its numbers (n, the KL bound and estimate)
                out.update({f"eval/{name}/{key}/{k}": v for k, v in value.items() if isinstance(v, int | float)})
            elif value is not None:
                out[f"eval/{name}/{key}"] = value
        if r.mc is not None:
            out[f"eval/{name}/mc_acc"] = r.mc["metrics"]["mc/acc"]
            if "circular" in r.mc:
                out[f"eval/{name}/mc_circular_acc"] = r.mc["circular"]["accuracy"]
            if "contamination" in r.mc:
                out[f"eval/{name}/contamination_p"] = r.mc["contamination"]["p_value"]
        if r.judge is not None and r.judge["win_rate"] is not None:
            out[f"eval/{name}/judge_win_rate"] = r.judge["win_rate"]
    return out


def write_results(directory: Path, results: dict[str, ModelResult], config: dict[str, Any]) -> None:
    """results.json (all models, in the order evaluated), and per model NAME/results.json and NAME/samples.jsonl."""
    def dump(data: Any) -> str:  # not sorted: the order of the models is the recipe's
        return json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n"

    for name, r in results.items():
        atomic_write_text(directory / name / "results.json", dump(r.entry()))
        if r.samples:
            atomic_write_text(directory / name / "samples.jsonl",
                              "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in r.samples))
    atomic_write_text(directory / "results.json",
                      dump({"models": {name: r.entry() for name, r in results.items()}, "config": config}))


# --- the stage ---------------------------------------------------------------------------------------

def done_outputs(ctx: StageContext, stage: str) -> dict[str, str]:
    record = ctx.run.done_record(stage)
    if record is None:
        raise InputError(f"stage '{stage}' has not finished in {ctx.run.root}; run it first (alignlab run RECIPE "
                         f"--resume --run-id {ctx.run.root.name})")
    return record["outputs"]


def train(cfg: EvalStage, ctx: StageContext) -> StageResult:
    recipe = ctx.recipe
    where = f"stages.{ctx.name}"
    names = cfg.model_names(recipe, where)
    gen = generation_plan(cfg.generation, recipe, f"{where}.generation", ctx) if cfg.generation else None
    mc = mc_plan(cfg.mc, recipe, f"{where}.mc") if cfg.mc else None
    judge = judge_plan(cfg.judge, recipe, f"{where}.judge", names) if cfg.judge is not None else None
    arena = arena_plan(cfg.arena, recipe, f"{where}.arena", names) if cfg.arena is not None else None

    best_of = [BestOfPlan(b.model_name, b.policy, b.n, None if b.reward == GOLD else RewardModelSource(
        ctx.input_path(b.reward, "reward_model"), recipe.model)) for b in cfg.best_of]
    extra = [gen.reference] if gen and gen.reference else []
    wanted = list(dict.fromkeys([*names, *extra, *(b.policy for b in cfg.best_of)]))
    sources = [ModelSource(BASE, recipe.model, None, f"base model {recipe.model.base}") if name == BASE else
               stage_model_source(name, recipe.model, ctx.run.stage_dir(name), done_outputs(ctx, name))
               for name in wanted]
    started = time.perf_counter()
    results = evaluate_models(ModelPool(sources), names, gen, mc, judge, best_of, shard_of(PartialState()))
    if not ctx.is_main:
        return StageResult()  # it sampled its share; the main process scores, judges and writes
    if arena is not None:
        board = run_arena(arena.judge.config, {name: arena.judge.rows(r.samples) for name, r in results.items()},
                          arena.judge.baseline, arena.style_control, arena.bootstrap)
        atomic_write_text(ctx.dir / ARENA_FILE, json.dumps(board, indent=2) + "\n")
    metrics = flat_metrics(results) | {"time/eval": time.perf_counter() - started}
    if arena is not None:
        metrics |= {f"eval/{row['model']}/arena_rating": row["rating"] for row in board["models"]}
    write_results(ctx.dir, results, to_dict(cfg) | {"models": names, "seed": recipe.seed})
    tracker = Tracker(ctx.dir, recipe.report_to, f"{recipe.name}/{ctx.name}", ctx.is_main, to_dict(cfg))
    tracker.log(metrics, step=0)
    tracker.close()
    headline = {k: v for k, v in metrics.items() if k.rsplit("/", 1)[-1] in HEADLINE or k == "time/eval"}
    return StageResult(outputs={"results": "results.json"}, metrics=headline)
