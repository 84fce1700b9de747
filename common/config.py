"""The typed recipe schema, strict YAML loading and `--set` overrides.

A recipe is one YAML file:

    name: sentiment
    seed: 42
    model: {base: smollm2-135m-instruct, dtype: float32, quantization: none, lora: {r: 16}}
    stages:
      sft: {kind: sft, data: {path: ../../data/sentiment/sft.jsonl}, args: {max_steps: 40}}
      dpo: {kind: dpo, from: sft, data: {stage: prefs}, args: {beta: 0.1}}

Each stage kind has its own dataclass (a subclass of `StageConfig`) defined by the stage package; the
recipes package passes the mapping kind -> dataclass to `load_recipe`, so `common` imports no stage.
Relative paths in a recipe are relative to the recipe file.

A stage block may carry `sweep: {ARGS_KEY: [v1, v2, ...]}`: the loader replaces it by one ordinary stage per value
(see `expand_sweeps`), before anything is built or checked.
"""

from __future__ import annotations

import copy
import dataclasses
import graphlib
import hashlib
import itertools
import json
import re
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from common.errors import InputError, utf8_problem
from common.schema import build, check_value, to_dict, unknown_key_error

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class LoraSpec:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # "all-linear" is peft's shorthand for every linear layer but the output head.
    target_modules: str | list[str] = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"

    def __post_init__(self):
        # peft refuses these only once the model is built, in a long traceback after the run directory exists.
        if self.r < 1:
            raise ValueError(f"r must be a positive rank, got {self.r}; LoRA needs r >= 1 (8 to 64 is usual), or set "
                             "lora: null for full fine-tuning")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("target_modules is empty; name the modules to adapt, or use all-linear")


@dataclass
class ModelConfig:
    base: str = "smollm2-135m-instruct"
    dtype: Dtype = "auto"
    # `lora: null` means full fine-tuning.
    lora: LoraSpec | None = field(default_factory=LoraSpec)
    quantization: Literal["none", "8bit", "4bit"] = "none"
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Dtype = "auto"
    # bf16 autocast in the training passes (sft, reward_model, dpo, and ppo's whole rollout and update), over weights,
    # adapters and optimizer state kept in `dtype`. `auto`: on where bf16 matmuls are fast (a CUDA GPU with bf16, a
    # CPU with AMX), off elsewhere, where bf16 is slower than float32 (AVX512-BF16 alone: x1.29 to x1.49 a step). The
    # preferences stage's sampling and the eval stage stay in `dtype`.
    mixed_precision: Literal["none", "bf16", "auto"] = "none"
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.quantization != "none" and self.lora is None:
            raise ValueError(f"quantization is '{self.quantization}' but lora is null; quantized weights "
                             "cannot be trained directly: add a lora block (QLoRA) or set quantization: none")


@dataclass
class DataSpec:
    """Where a stage's records come from: exactly one of a local file, a hub dataset or another stage."""

    path: str | None = None
    hub: str | None = None
    stage: str | None = None
    subset: str | None = None
    split: str = "train"
    # Our field name -> the column that holds it in this dataset (e.g. {prompt: instruction}).
    fields: dict[str, str] = field(default_factory=dict)
    # Preference pairs whose final response is empty or whose chosen and rejected are the same text teach nothing.
    # drop: leave them out (their count and first row are logged and in the stage's metrics); error: refuse the data.
    # Unset: drop for a hub dataset (which the user cannot edit), error for a local file or a stage's output (which
    # the user or the lab wrote, so a bad row there is a bug worth seeing).
    bad_rows: Literal["drop", "error"] | None = None
    # A separate held-out file, or else this fraction of the rows is held out.
    test_path: str | None = None
    test_size: float = 0.1
    limit: int | None = None

    def __post_init__(self):
        given = [k for k in ("path", "hub", "stage") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"needs exactly one of path / hub / stage, got {given or 'none'}; "
                             "name the local file, the hub dataset or the stage")
        if not 0 <= self.test_size < 1:
            raise ValueError(f"test_size must be in [0, 1), got {self.test_size}")

    def bad_row_policy(self) -> Literal["drop", "error"]:
        return self.bad_rows or ("drop" if self.hub else "error")


@dataclass
class StageConfig:
    """Keys every stage has. Stage packages subclass this with their own keys."""

    kind: str
    from_: str | None = field(default=None, metadata={"key": "from"})
    data: DataSpec | None = None
    args: dict[str, Any] = field(default_factory=dict)

    # Set by subclasses that validate `args` with a trl / transformers config dataclass.
    trl_config: typing.ClassVar[type | None] = None

    def references(self) -> list[str]:
        """The stages this one reads from (model and data)."""
        refs = [self.from_] if self.from_ else []
        if self.data is not None and self.data.stage:
            refs.append(self.data.stage)
        return refs

    def group_references(self) -> list[str]:
        """The references that may name a swept stage, standing for every stage it was expanded into (e.g. an eval
        stage's models); any other reference to a swept stage is ambiguous, an error. Subclasses extend."""
        return []

    def with_groups_expanded(self, block: dict[str, Any], sweeps: dict[str, list[str]]) -> dict[str, Any]:
        """The stage's raw block with each swept stage it names as a group replaced by its members: what
        resolved.yaml holds, where the sweeps are already expanded. Subclasses with group references override."""
        return block

    def validate(self, recipe: Recipe, where: str) -> None:
        """Checks that need the whole recipe or the file system; subclasses extend."""
        if self.trl_config is not None:
            self.args = check_trl_args(self.trl_config, self.args, f"{where}.args")
            self.trainer_args(recipe, where, output_dir=tempfile.gettempdir())

    def trainer_args(self, recipe: Recipe, where: str, output_dir: str | Path) -> Any:
        """trl's config for this stage: the lab's defaults, then the recipe's `args` on top."""
        bf16 = trains_in_bf16(recipe.model)
        defaults = {
            "seed": recipe.seed,
            # trl turns bf16 on by default, even on CPUs where it is slow: follow the model block instead.
            "bf16": bf16,
            # transformers rejects bf16 without a GPU unless told to train on the CPU (then it autocasts there).
            "use_cpu": bf16 and not _cuda_available(),
            "activation_checkpointing": recipe.model.gradient_checkpointing,
            "report_to": "none",  # common.tracking reports, with the lab's metric names
            # Pinned memory speeds copies to an accelerator; without one torch warns at every data loader.
            "dataloader_pin_memory": _accelerator_available(),
            "save_total_limit": 2,
            "disable_tqdm": False,
        }
        if "report_to" in self.args:
            raise InputError(f"recipe: {where}.args.report_to: set report_to once at the top of the recipe "
                             "(e.g. report_to: [tensorboard]); every stage then logs there")
        return trl_args(self.trl_config, defaults | self.args, f"{where}.args", output_dir=str(output_dir))


@dataclass
class Recipe:
    name: str
    model: ModelConfig = field(default_factory=ModelConfig)
    stages: dict[str, Any] = field(default_factory=dict)
    seed: int = 42
    # Several seeds: one full replica of the chain per seed (see `replicas`); `seed` then is unused.
    seeds: list[int] | None = None
    description: str = ""
    output_dir: str = "runs"
    # Named sets of overrides (dotted key -> value), chosen with `profile: NAME` or `--set profile=NAME`.
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    profile: str | None = None
    report_to: list[str] = field(default_factory=list)  # accelerate trackers (common.tracking); metrics.jsonl always

    # Filled by load_recipe, not by the YAML.
    source: Path = field(default=Path("recipe.yaml"), init=False, repr=False)
    # A swept stage's name -> the names of the stages it was expanded into (see expand_sweeps).
    sweeps: dict[str, list[str]] = field(default_factory=dict, init=False, repr=False)

    def order(self) -> list[str]:
        """Stage names in dependency order (ties in file order)."""
        sorter = graphlib.TopologicalSorter({name: self.inputs(name) for name in self.stages})
        try:
            ready = list(sorter.static_order())
        except graphlib.CycleError as e:
            cycle = " -> ".join(e.args[1])
            raise InputError(f"{self.source}: the stages form a cycle ({cycle}); "
                             "remove one of the from:/data.stage references") from None
        position = {name: i for i, name in enumerate(self.stages)}
        # static_order is a valid order; re-sort stably by (depth, file position) for readable runs.
        depth: dict[str, int] = {}
        for name in ready:
            depth[name] = 1 + max((depth[r] for r in self.inputs(name)), default=-1)
        return sorted(ready, key=lambda n: (depth[n], position[n]))

    def inputs(self, name: str) -> list[str]:
        """The stages `name` reads from; a swept stage's name (in its group_references) stands for every stage it
        was expanded into."""
        return [member for ref in self.stages[name].references() for member in self.sweeps.get(ref, [ref])]

    def stage_hash(self, name: str) -> str:
        """Hash of what determines a stage's output: its config, the model block, the seed and, through
        their hashes, the stages it reads from. Resume reuses a done stage only when this is unchanged."""
        stage = self.stages[name]
        payload = {"stage": to_dict(stage), "model": to_dict(self.model), "seed": self.seed,
                   "inputs": {r: self.stage_hash(r) for r in self.inputs(name)}}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def resolve_path(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.source.parent / p).resolve()

    def replicas(self) -> list[Recipe]:
        """One recipe per seed of `seeds`, each an independent copy whose `seed` is that seed and whose `seeds` is
        unset: a single-seed recipe, so every random stream of its chain (data order and splits, sampling, label
        noise, initialisation, all read from `seed`) derives from its own seed and nothing is shared."""
        copies = []
        for seed in self.seeds or []:
            replica = copy.deepcopy(self)
            replica.seed, replica.seeds = seed, None
            copies.append(replica)
        return copies


def check_policy_source(recipe: Recipe, from_: str | None, where: str) -> None:
    """`from` must name a stage that saves a model (sft, dpo, ppo), not one that saves data or a reward model."""
    kind = recipe.stages[from_].kind if from_ else None
    if kind in ("preferences", "reward_model"):
        raise InputError(f"recipe: {where}.from: '{from_}' is a {kind} stage, which saves no policy adapter; name the "
                         "stage whose adapter to start from (e.g. sft)")


def check_reward_stage(recipe: Recipe, stage: str, where: str) -> None:
    """The stage named as the reward must train a reward model (its `reward_model` output is what PPO loads)."""
    kind = recipe.stages[stage].kind  # the loader has checked that the stage exists
    if kind != "reward_model":
        raise InputError(f"{recipe.source}: {where}: stage '{stage}' is a '{kind}' stage; name a stage of kind "
                         "reward_model, or use a gold scorer, e.g. reward: {scorer: vader}")


def model_base_path(base: str, recipe: Recipe) -> str:
    """`model.base` follows the rule of every path in a recipe: relative to the recipe file. It is a path when it is
    absolute, starts with `.` or `~`, or names a directory beside the recipe; then it is made absolute here, so the
    run reads the same model from any working directory. Anything else is an alias or a hub id (org/name)."""
    path = Path(base).expanduser()
    if path.is_absolute():
        return str(path)
    if base.startswith(".") or (recipe.source.parent / path).is_dir():
        return str(recipe.resolve_path(base))
    return base


def trains_in_bf16(model: ModelConfig) -> bool:
    """Whether training passes run in bf16: bf16 weights, or bf16 autocast over other weights."""
    return model.dtype == "bfloat16" or (model.dtype == "auto" and _cuda_bf16()) or autocasts_bf16(model)


def autocasts_bf16(model: ModelConfig) -> bool:
    """`mixed_precision` resolved on this machine."""
    if model.mixed_precision == "auto":
        return native_bf16()
    return model.mixed_precision == "bf16"


def native_bf16() -> bool:
    """bf16 matmuls faster than float32 ones: a CUDA GPU with bf16, or (no GPU) a CPU with AMX tiles, on which bf16
    autocast roughly halves the time of a training step of the embedded model (2 cores, benchmarks/bf16_training.py).
    AVX512-BF16 alone is not enough: its dot products are native, but on 2 such cores a step took 1.29x (causal LM)
    and 1.49x (reward model) as long as in float32."""
    import torch

    if torch.cuda.is_available():
        return _cuda_bf16()
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("amx_bf16"))


def _cuda_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _accelerator_available() -> bool:
    import torch

    return torch.accelerator.is_available()


def check_trl_args(config_cls: type, args: dict[str, Any], where: str) -> dict[str, Any]:
    """Check a recipe's `args` block against trl's (or transformers') config dataclass: every key must be one
    of its fields (so every trl option is available, and a typo is caught with the valid keys listed), and
    simple types are checked and normalised here."""
    hints = typing.get_type_hints(config_cls)
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
    checked = {}
    for key, value in args.items():
        if key not in fields:
            raise unknown_key_error(key, list(fields), where, "recipe")
        if key == "output_dir":
            raise InputError(f"recipe: {where}.output_dir is set by the run directory; remove it")
        tp = hints.get(key, Any)
        checked[key] = check_value(value, tp, f"{where}.{key}", "recipe") if _checkable(tp) else value
        _check_sign(fields[key], checked[key], f"{where}.{key}")
    return checked


def _check_sign(f: dataclasses.Field, value: Any, where: str) -> None:
    """Refuse the numbers trl and transformers do not define but accept silently: counts, sizes and rates below zero
    (`max_steps: -5` trains for whole epochs instead). A negative number is accepted only where it is the library's
    own default, a "not set" sentinel (-1 for max_steps)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    default = f.default if isinstance(f.default, int | float) and not isinstance(f.default, bool) else None
    sentinel = default is not None and default < 0
    # transformers trains num_train_epochs unless max_steps > 0, so 0 is as "not set" as -1: one spelling for it.
    unset_zero = f.name == "max_steps" and value == 0
    if (value < 0 and not (sentinel and value == default)) or unset_zero:
        allowed = f"{default} (not set) or a number > 0" if sentinel else "a number >= 0"
        raise InputError(f"recipe: {where} must be {allowed}, got {value}; fix the value in the recipe or the --set "
                         "override")


def trl_args(config_cls: type, args: dict[str, Any], where: str, output_dir: str) -> Any:
    """Construct the config dataclass; its own __post_init__ checks (e.g. conflicting options) become
    recipe errors."""
    checked = check_trl_args(config_cls, args, where)
    try:
        return config_cls(output_dir=output_dir, **checked)
    except (ValueError, TypeError) as e:
        raise InputError(f"recipe: {where} is rejected by {config_cls.__name__}: {str(e).splitlines()[0]}") from None


def _checkable(tp: Any) -> bool:
    """Annotations simple enough to check ourselves; others are left to the library's own checks."""
    if tp in (int, float, bool, str):
        return True
    args = typing.get_args(tp)
    return bool(args) and all(a in (int, float, bool, str, type(None)) for a in args) \
        and typing.get_origin(tp) is not Literal


# --- overrides --------------------------------------------------------------------------------------

def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value), the value read as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise InputError(f"--set {text!r}: expected KEY.PATH=VALUE, e.g. --set stages.sft.args.max_steps=10")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise InputError(f"--set {text!r}: the key is empty; expected KEY.PATH=VALUE")
    if not raw.strip():
        return parts, None
    try:
        return parts, yaml.load(raw, StrictLoader)
    except InputError as e:
        raise InputError(f"--set {text!r}: {e}") from None
    except yaml.YAMLError as e:
        raise InputError(f"--set {text!r}: the value is not valid YAML ({_yaml_problem(e)}); quote it as text "
                         "(--set 'KEY=\"...\"') or fix the list / mapping, e.g. [1, 2]") from None


def apply_override(data: dict, parts: list[str], value: Any, label: str) -> None:
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise InputError(f"{label}: '{'.'.join(parts[: i + 1])}' is {type(nxt).__name__}, not a mapping; "
                             "cannot set a key inside it")
        node = nxt
    node[parts[-1]] = value


# --- sweeps -----------------------------------------------------------------------------------------

def expand_sweeps(stages_raw: dict, kinds: dict[str, type[StageConfig]],
                  source: str) -> tuple[dict, dict[str, list[str]]]:
    """Replace every stage block that has a `sweep` by one block per value; return the blocks (in file order) and
    swept name -> expanded names.

        dpo: {kind: dpo, from: sft, args: {max_steps: 40}, sweep: {beta: [0.1, 0.5]}}
    becomes
        dpo-beta0p1: {kind: dpo, from: sft, args: {max_steps: 40, beta: 0.1}}
        dpo-beta0p5: {kind: dpo, from: sft, args: {max_steps: 40, beta: 0.5}}

    `sweep` maps keys of the stage's `args` to non-empty lists; several keys sweep every combination, named
    `dpo-beta0p1-learning_rate1e-05`. Each expanded stage is an ordinary stage (its own folder, done marker, hash),
    evaluated like any other model. A reference that takes several models (one of a stage's `group_references`,
    e.g. an eval stage's models) may name the swept stage, which then stands for all of them (`Recipe.inputs`);
    any other reference to it (`from:`, `data.stage`, ...) would be ambiguous and is an error: it names one
    expanded stage instead.
    """
    expanded: dict = {}
    sweeps: dict[str, list[str]] = {}
    for name, block in stages_raw.items():
        if not isinstance(block, dict) or "sweep" not in block:
            expanded[name] = block
            continue
        where = f"stages.{name}.sweep"
        grid = block["sweep"]
        if not isinstance(grid, dict) or not grid:
            raise InputError(f"{source}: {where} must map keys of args to lists of values, e.g. "
                             f"sweep: {{beta: [0.1, 0.5]}}; got {grid!r}")
        args = block.get("args") or {}
        if not isinstance(args, dict):
            raise InputError(f"{source}: stages.{name}.args must be a mapping of keys to values, "
                             f"got {type(args).__name__}")
        kind = block.get("kind")
        config_cls = getattr(kinds.get(kind) if isinstance(kind, str) else None, "trl_config", None)
        for key, values in grid.items():
            if config_cls is not None:
                valid = [f.name for f in dataclasses.fields(config_cls) if f.init]
                if key not in valid:
                    raise unknown_key_error(str(key), valid, where, source)
            if not isinstance(values, list) or not values:
                raise InputError(f"{source}: {where}.{key} must be a non-empty list of values to try, e.g. "
                                 f"[0.1, 0.5]; got {values!r}")
            if key in args:
                raise InputError(f"{source}: stages.{name}: '{key}' is set both in args and in sweep; keep it "
                                 "in one place")
        sweeps[name] = []
        for combo in itertools.product(*grid.values()):
            member = "-".join([name, *(f"{key}{_sweep_label(v)}" for key, v in zip(grid, combo, strict=True))])
            if isinstance(stages_raw.get(member), dict) and "kind" not in stages_raw[member]:
                raise InputError(f"{source}: stages.{member} is created by the sweep of stages.{name}, after "
                                 f"overrides apply; override stages.{name} instead (it applies to every value)")
            if member in stages_raw or member in expanded:
                raise InputError(f"{source}: {where} expands into a stage named '{member}', which already exists; "
                                 "rename that stage or sweep distinct values")
            expanded[member] = {k: v for k, v in block.items() if k != "sweep"} | {
                "args": args | dict(zip(grid, combo, strict=True))}
            sweeps[name].append(member)
    return expanded, sweeps


def _sweep_label(value: Any) -> str:
    """A value as it appears in a stage name: 0.1 -> '0p1', 2e-05 -> '2e-05', [ipo, sft] -> 'ipo+sft', true -> 'true'.

    No '.': a stage name is also a `--set stages.NAME.key` path segment and the name of its adapter when models are
    loaded side by side on one base (peft adapter names cannot contain '.')."""
    if isinstance(value, list):
        return "+".join(_sweep_label(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return str(value).replace(".", "p")
    return re.sub(r"[^A-Za-z0-9_+-]", "_", str(value))


# --- seeds ------------------------------------------------------------------------------------------

# numpy's seed range; transformers.set_seed passes the seed to numpy, which refuses anything outside it.
SEED_LIMIT = 2**32


def parse_seeds_option(texts: list[str]) -> list[int | str]:
    """`--seeds 42 43`: the words as integers where they are written as integers (the rest stay text, for
    `check_seeds` to name)."""
    return [int(t) if re.fullmatch(r"[+-]?\d+", t.strip()) else t for t in texts]


def check_seeds(seeds: list, seed: Any, where: str, source: str) -> None:
    """The `seeds` list (built already, so its items are integers): at least one, each once, in numpy's range; and a
    `seed` given beside it (None when not) must be one of them, or the recipe says two different things."""
    hint = "e.g. seeds: [42, 43, 44]" if where == "seeds" else "e.g. --seeds 42 43 44"
    if not seeds:
        raise InputError(f"{source}: {where} is empty; name at least one seed, {hint} (one replica of the chain "
                         "each)")
    for i, value in enumerate(seeds):
        if not isinstance(value, int) or isinstance(value, bool):
            raise InputError(f"{source}: {where}[{i}] must be an integer seed, got {value!r}; {hint}")
        if not 0 <= value < SEED_LIMIT:
            raise InputError(f"{source}: {where}[{i}] must be in [0, 2**32), got {value}; {hint}")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise InputError(f"{source}: {where} names seed {repeated[0]} more than once; each seed is one replica, list "
                         "it once")
    if seed is not None and seed not in seeds:
        raise InputError(f"{source}: seed is {seed} but {where} is {list(seeds)}; one replica runs per seed in "
                         f"{where}: remove seed, or make it one of them")


# --- loading ----------------------------------------------------------------------------------------

class StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last value silently, so a
    second `seed:` far down a recipe would override the first without a word."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in seen:
                raise InputError(f"key '{key}' is given twice in one mapping, on line {seen[key]} and line {line}; "
                                 "keep one")
            seen[key] = line
        return super().construct_mapping(node, deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return f"{where}{getattr(e, 'problem', None) or e}"


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"{path}: recipe file not found; give the path to a YAML recipe "
                         "(e.g. recipes/configs/smollm2-135m/sentiment.yaml)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: {utf8_problem(path.read_bytes(), e)}; save the recipe as UTF-8") from None
    try:
        data = yaml.load(text, StrictLoader)
    except InputError as e:
        raise InputError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise InputError(f"{path}:{line} is not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a recipe must be a YAML mapping with name, model and stages")
    return data


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                stage_kinds: dict[str, type[StageConfig]] | None = None,
                seeds: list[int | str] | None = None) -> tuple[Recipe, dict]:
    """Read, override and validate a recipe. Returns the recipe and the raw mapping after overrides.

    `seeds` (the command line's `--seeds`) replaces the recipe's `seed` and `seeds`, after every other override.
    Every check runs here: schema, types, trl args, references, cycles, data files and their rows.
    """
    path = Path(path)
    raw = read_yaml(path)
    data = copy.deepcopy(raw)
    parsed = [parse_override(o) for o in overrides]
    for parts, value in parsed:  # profile first, so explicit overrides win over the profile's
        if parts == ["profile"]:
            data["profile"] = value
    profile = data.get("profile")
    if profile is not None:
        profiles = data.get("profiles") or {}
        if profile not in profiles:
            raise InputError(f"{path}: profile '{profile}' is not defined; defined profiles: "
                             f"{', '.join(profiles) or 'none'}")
        for key, value in (profiles[profile] or {}).items():
            apply_override(data, str(key).split("."), value, f"{path}: profiles.{profile}.{key}")
    for (parts, value), text in zip(parsed, overrides, strict=True):
        if parts != ["profile"]:
            apply_override(data, parts, value, f"--set {text}")

    if seeds is not None:
        check_seeds(seeds, None, "--seeds", "command line")
        data.pop("seed", None)
        data["seeds"] = list(seeds)

    stages_raw = data.pop("stages", None)
    recipe = build(Recipe, data, "", str(path))
    if recipe.seeds is not None:
        check_seeds(recipe.seeds, data.get("seed"), "seeds", str(path))
    recipe.source = path.resolve()
    recipe.model.base = model_base_path(recipe.model.base, recipe)
    from common.models import check_model_base

    try:
        check_model_base(recipe.model.base)
    except InputError as e:
        raise InputError(f"{path}: model.base: {e}") from None
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise InputError(f"{path}: 'stages' must be a non-empty mapping of stage name -> stage block")
    kinds = stage_kinds or {}
    stages_raw, recipe.sweeps = expand_sweeps(stages_raw, kinds, str(path))
    for name, block in stages_raw.items():
        where = f"stages.{name}"
        if not isinstance(block, dict) or "kind" not in block:
            raise InputError(f"{path}: {where} needs a 'kind' ({', '.join(sorted(kinds)) or 'none registered'})")
        kind = block["kind"]
        if kind not in kinds:
            raise unknown_key_error(str(kind), list(kinds), f"{where}.kind", str(path)) from None
        recipe.stages[name] = build(kinds[kind], block, where, str(path))

    for name, stage in recipe.stages.items():
        for ref in stage.references():
            if ref in recipe.sweeps and ref not in stage.group_references():
                raise InputError(f"{path}: stages.{name} reads from '{ref}', which is swept into "
                                 f"{', '.join(recipe.sweeps[ref])}; name one of those stages instead")
            if ref not in recipe.stages and ref not in recipe.sweeps:
                raise unknown_key_error(ref, list(recipe.stages), f"stages.{name} (a from:/data.stage reference "
                                        "to a stage)", str(path))
    recipe.order()  # raises on cycles
    from common.tracking import check_report_to

    check_report_to(recipe.report_to, "report_to")
    for name, stage in recipe.stages.items():
        stage.validate(recipe, f"stages.{name}")
    data["stages"] = {name: recipe.stages[name].with_groups_expanded(block, recipe.sweeps)
                      for name, block in stages_raw.items()}
    data.pop("profile", None)  # applied: its values are in `data`, and loading it again must not apply it twice
    return recipe, data

