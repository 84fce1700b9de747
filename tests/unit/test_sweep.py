"""Sweeps: a stage block with `sweep: {ARGS_KEY: [values]}` becomes one ordinary stage per value."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import yaml

from common.config import StageConfig, load_recipe
from common.errors import InputError
from common.schema import to_dict
from recipes.cli import main
from recipes.runner import load
from recipes.stages import config_classes
from tests.conftest import write_jsonl

PAIRS = [{"prompt": f"film {i}:", "chosen": " good", "rejected": " bad"} for i in range(8)]
BASE = {
    "name": "t",
    "model": {"base": "tiny-random-llama", "lora": {"r": 4}},
    "stages": {
        "sft": {"kind": "sft", "data": {"path": "sft.jsonl"}, "args": {"max_steps": 2}},
        "dpo": {"kind": "dpo", "from": "sft", "data": {"path": "prefs.jsonl"},
                "args": {"max_steps": 3, "learning_rate": 1.0e-3}, "sweep": {"beta": [0.05, 0.1, 0.5]}},
    },
}


@pytest.fixture
def sweep_recipe(recipe_file, tmp_path):
    def make(**dpo_changes):
        write_jsonl(tmp_path / "prefs.jsonl", PAIRS)
        recipe = copy.deepcopy(BASE)
        recipe["stages"]["dpo"].update(dpo_changes)
        return recipe_file(recipe)

    return make


def error_of(path, overrides=()) -> str:
    with pytest.raises(InputError) as e:
        load(path, list(overrides))
    assert "\n" not in str(e.value), "errors are one line"
    return str(e.value)


def test_one_stage_per_value_named_by_the_value_with_its_own_args(sweep_recipe):
    recipe, raw = load(sweep_recipe(), [])
    names = ["dpo-beta0p05", "dpo-beta0p1", "dpo-beta0p5"]
    assert list(recipe.stages) == ["sft", *names] and recipe.order() == ["sft", *names]
    assert recipe.sweeps == {"dpo": names}
    for name, beta in zip(names, [0.05, 0.1, 0.5], strict=True):
        stage = recipe.stages[name]
        assert stage.kind == "dpo" and stage.from_ == "sft" and stage.data.path == "prefs.jsonl"
        assert stage.args == {"max_steps": 3, "learning_rate": 1.0e-3, "beta": beta}
    assert len({recipe.stage_hash(n) for n in names}) == 3, "each value is its own run, resumed on its own"
    assert list(raw["stages"]) == ["sft", *names] and "sweep" not in raw["stages"]["dpo-beta0p1"]


def test_expansion_is_visible_in_resolved_config_and_validate_output(sweep_recipe, capsys):
    path = sweep_recipe()
    recipe, _ = load(path, [])
    resolved = yaml.safe_load(yaml.safe_dump({k: to_dict(v) for k, v in recipe.stages.items()}))
    assert resolved["dpo-beta0p5"]["args"]["beta"] == 0.5 and "dpo" not in resolved
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ok (4 stages: sft -> dpo-beta0p05 -> dpo-beta0p1 -> dpo-beta0p5)" in out
    assert "sweep dpo -> dpo-beta0p05, dpo-beta0p1, dpo-beta0p5" in out


def test_several_keys_sweep_their_grid_and_any_stage_kind_can_sweep(sweep_recipe):
    path = sweep_recipe(sweep={"beta": [0.1, 0.5], "loss_type": [["sigmoid"], ["ipo", "sft"]]})
    recipe, _ = load(path, ["stages.sft.sweep={learning_rate: [1.0e-4, 2.0e-5]}",
                            "stages.dpo.from=sft-learning_rate0p0001"])
    assert list(recipe.stages) == [
        "sft-learning_rate0p0001", "sft-learning_rate2e-05",
        "dpo-beta0p1-loss_typesigmoid", "dpo-beta0p1-loss_typeipo+sft",
        "dpo-beta0p5-loss_typesigmoid", "dpo-beta0p5-loss_typeipo+sft"]
    assert recipe.stages["dpo-beta0p5-loss_typeipo+sft"].args["loss_type"] == ["ipo", "sft"]
    assert recipe.stages["sft-learning_rate2e-05"].args == {"max_steps": 2, "learning_rate": 2e-5}


def test_override_narrows_a_sweep(sweep_recipe):
    recipe, _ = load(sweep_recipe(), ["stages.dpo.sweep.beta=[0.3]"])
    assert list(recipe.stages) == ["sft", "dpo-beta0p3"]


@pytest.mark.parametrize(("changes", "message"), [
    ({"sweep": {"bta": [0.1]}}, "unknown key 'bta' at stages.dpo.sweep; did you mean 'beta'?"),
    ({"sweep": {"beta": 0.1}}, "stages.dpo.sweep.beta must be a non-empty list of values to try, e.g. [0.1, 0.5]; "
                               "got 0.1"),
    ({"sweep": {"beta": []}}, "stages.dpo.sweep.beta must be a non-empty list"),
    ({"sweep": [0.1, 0.5]}, "stages.dpo.sweep must map keys of args to lists of values"),
    ({"sweep": {"beta": [0.1, 0.1]}}, "expands into a stage named 'dpo-beta0p1', which already exists"),
    ({"args": {"beta": 0.2}}, "stages.dpo: 'beta' is set both in args and in sweep; keep it in one place"),
])
def test_bad_sweeps_name_the_key_and_the_fix(sweep_recipe, changes, message):
    assert message in error_of(sweep_recipe(**changes))


def test_reading_from_a_swept_stage_names_its_members(sweep_recipe):
    path = sweep_recipe()
    msg = error_of(path, ["stages.dpo2={kind: dpo, from: dpo, data: {path: prefs.jsonl}}"])
    assert "stages.dpo2 reads from 'dpo', which is swept into dpo-beta0p05, dpo-beta0p1, dpo-beta0p5; name one " \
           "of those stages instead" in msg
    recipe, _ = load(path, ["stages.dpo2={kind: dpo, from: dpo-beta0p1, data: {path: prefs.jsonl}}"])
    assert recipe.order()[-1] == "dpo2"


def test_a_member_name_taken_by_another_stage_is_refused(sweep_recipe):
    path = sweep_recipe()
    recipe = yaml.safe_load(path.read_text())
    recipe["stages"]["dpo-beta0p5"] = {"kind": "sft", "data": {"path": "sft.jsonl"}}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    msg = error_of(path)
    assert "expands into a stage named 'dpo-beta0p5', which already exists" in msg


def test_overriding_an_expanded_stage_points_to_the_swept_one(sweep_recipe):
    msg = error_of(sweep_recipe(), ["stages.dpo-beta0p1.args.max_steps=5"])
    assert "stages.dpo-beta0p1 is created by the sweep of stages.dpo, after overrides apply; override stages.dpo " \
           "instead" in msg


@dataclass
class CompareStage(StageConfig):
    """A stage that reads several models, as an eval stage does."""

    models: list[str] = field(default_factory=list)

    def references(self) -> list[str]:
        return super().references() + self.models

    def group_references(self) -> list[str]:
        return self.models


def test_a_group_reference_to_a_swept_stage_stands_for_all_its_members(sweep_recipe):
    path = sweep_recipe()
    kinds = config_classes() | {"compare": CompareStage}
    compare = "stages.compare={kind: compare, models: [sft, dpo]}"
    recipe, _ = load_recipe(path, [compare], kinds)
    members = ["dpo-beta0p05", "dpo-beta0p1", "dpo-beta0p5"]
    assert recipe.inputs("compare") == ["sft", *members] and recipe.order()[-1] == "compare"
    changed, _ = load_recipe(path, [compare, "stages.dpo.args.max_steps=4"], kinds)
    assert changed.stage_hash("compare") != recipe.stage_hash("compare"), "a member's change reaches the hash"
    with pytest.raises(InputError, match="stages.compare reads from 'dpo', which is swept into"):
        load_recipe(path, ["stages.compare={kind: compare, from: dpo, models: [sft]}"], kinds)
