"""Recipe loading: strictness, types, references, cycles, overrides, profiles."""

from __future__ import annotations

import copy

import pytest
import yaml

from common.errors import InputError
from recipes.runner import load

BASE = {
    "name": "t",
    "model": {"base": "tiny-random-llama", "lora": {"r": 4}},
    "stages": {"sft": {"kind": "sft", "data": {"path": "sft.jsonl"}, "args": {"max_steps": 2}}},
}


def write(recipe_file, **changes) -> tuple:
    recipe = copy.deepcopy(BASE)
    for path, value in changes.items():
        node = recipe
        *head, last = path.split("__")
        for part in head:
            node = node[part]
        node[last] = value
    return recipe_file(recipe)


def error_of(path, overrides=()) -> str:
    with pytest.raises(InputError) as e:
        load(path, list(overrides))
    message = str(e.value)
    assert "\n" not in message, "errors are one line"
    return message


def test_valid_recipe_loads_with_typed_sections(recipe_file):
    recipe, _ = load(write(recipe_file), [])
    assert recipe.model.lora.r == 4 and recipe.model.lora.target_modules == "all-linear"
    assert recipe.stages["sft"].args == {"max_steps": 2}
    assert recipe.order() == ["sft"]


def test_unknown_top_level_key_names_key_and_suggests(recipe_file):
    path = write(recipe_file, sead=3)
    msg = error_of(path)
    assert "unknown key 'sead'" in msg and "did you mean 'seed'" in msg and "valid keys:" in msg


def test_unknown_nested_key_names_its_path(recipe_file):
    msg = error_of(write(recipe_file, model__lora={"r": 4, "alpah": 8}))
    assert "unknown key 'alpah' at model.lora" in msg and "did you mean 'alpha'" in msg


def test_unknown_trl_arg_is_caught_with_suggestion(recipe_file):
    msg = error_of(write(recipe_file, stages__sft__args={"lerning_rate": 1e-4}))
    assert "unknown key 'lerning_rate' at stages.sft.args" in msg and "did you mean 'learning_rate'" in msg


def test_wrong_type_names_expected_type(recipe_file):
    msg = error_of(write(recipe_file, seed="forty"))
    assert "seed must be int" in msg and "'forty'" in msg
    msg = error_of(write(recipe_file, stages__sft__args={"max_steps": "many"}))
    assert "stages.sft.args.max_steps must be int" in msg


def test_literal_choices_are_listed(recipe_file):
    msg = error_of(write(recipe_file, model__quantization="3bit"))
    assert "model.quantization must be 'none' | '8bit' | '4bit'" in msg


def test_float_written_without_dot_is_accepted(recipe_file):
    # PyYAML reads 1e-4 as a string; a recipe author means a number.
    recipe, _ = load(write(recipe_file, stages__sft__args={"learning_rate": "1e-4"}), [])
    assert recipe.stages["sft"].args["learning_rate"] == pytest.approx(1e-4)


def test_missing_data_file(recipe_file):
    msg = error_of(write(recipe_file, stages__sft__data={"path": "nope.jsonl"}))
    assert "nope.jsonl: data file not found (stages.sft.data)" in msg


def test_unknown_stage_reference_and_cycle(recipe_file):
    bad_ref = write(recipe_file, stages__sft__from="pretrain")
    assert "unknown key 'pretrain' at stages.sft (a from:/data.stage reference" in error_of(bad_ref)
    cyc = copy.deepcopy(BASE)
    cyc["stages"]["a"] = {"kind": "sft", "from": "b", "data": {"path": "sft.jsonl"}}
    cyc["stages"]["b"] = {"kind": "sft", "from": "a", "data": {"path": "sft.jsonl"}}
    assert "form a cycle" in error_of(recipe_file(cyc))


def test_unknown_kind_suggests(recipe_file):
    msg = error_of(write(recipe_file, stages__sft__kind="stf"))
    assert "unknown key 'stf' at stages.sft.kind" in msg and "did you mean 'sft'" in msg


def test_quantization_without_lora_is_refused(recipe_file):
    msg = error_of(write(recipe_file, model={"base": "tiny-random-llama", "lora": None, "quantization": "4bit"}))
    assert "model: quantization is '4bit' but lora is null" in msg


def test_report_to_in_stage_args_points_to_the_top_level(recipe_file):
    msg = error_of(write(recipe_file, stages__sft__args={"report_to": "tensorboard"}))
    assert "set report_to once at the top of the recipe" in msg
    assert "unknown tracker 'tensorbored'" in error_of(write(recipe_file, report_to=["tensorbored"]))


def test_set_overrides_apply_before_validation(recipe_file):
    path = write(recipe_file)
    recipe, raw = load(path, ["stages.sft.args.max_steps=7", "model.lora.r=2", "seed=3"])
    assert recipe.stages["sft"].args["max_steps"] == 7 and recipe.model.lora.r == 2 and recipe.seed == 3
    assert "unknown key 'max_stepz' at stages.sft.args" in error_of(path, ["stages.sft.args.max_stepz=1"])
    assert "expected KEY.PATH=VALUE" in error_of(path, ["seed"])


def test_profile_applies_its_overrides_and_explicit_set_wins(recipe_file):
    recipe = copy.deepcopy(BASE)
    recipe["profiles"] = {"quick": {"stages.sft.args.max_steps": 1, "seed": 9}}
    path = recipe_file(recipe)
    quick, _ = load(path, ["profile=quick", "seed=5"])
    assert quick.stages["sft"].args["max_steps"] == 1 and quick.seed == 5 and quick.profile == "quick"
    assert "profile 'slow' is not defined" in error_of(path, ["profile=slow"])


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nstages: [\n")
    assert "bad.yaml: line" in error_of(path)


def test_stage_hash_changes_with_config_and_upstream(recipe_file):
    recipe = copy.deepcopy(BASE)
    recipe["stages"]["sft2"] = {"kind": "sft", "from": "sft", "data": {"path": "sft.jsonl"}}
    path = recipe_file(recipe)
    a, _ = load(path, [])
    b, _ = load(path, ["stages.sft.args.max_steps=3"])
    assert a.stage_hash("sft") != b.stage_hash("sft")
    assert a.stage_hash("sft2") != b.stage_hash("sft2"), "a changed input changes the downstream hash"
    assert a.stage_hash("sft") == load(path, [])[0].stage_hash("sft")
    assert a.order() == ["sft", "sft2"]


def test_the_resolved_config_rebuilds_the_same_recipe(recipe_file, tmp_path):
    """What a run writes as resolved.yaml (the recipe after --set overrides, sweeps expanded) loads again, from
    another text, as the same typed recipe."""
    from common.schema import to_dict

    path = write(recipe_file)
    overrides = ["model.lora.r=8", "stages.sft.sweep={learning_rate: [0.001, 0.01]}", "seed=7"]
    original, resolved = load(path, overrides)
    rebuilt_path = path.with_name("rebuilt.yaml")
    rebuilt_path.write_text(yaml.safe_dump(resolved, sort_keys=False))
    rebuilt, _ = load(rebuilt_path, [])
    assert to_dict(rebuilt) == to_dict(original)
    assert rebuilt.model.lora.r == 8 and rebuilt.seed == 7 and rebuilt.model.lora.alpha == 32
    assert [(name, s.args["learning_rate"]) for name, s in rebuilt.stages.items()] == [
        ("sft-learning_rate0p001", 0.001), ("sft-learning_rate0p01", 0.01)]


@pytest.mark.parametrize("setting, capabilities, expected", [
    ("none", {"amx_bf16": True, "avx512_bf16": True}, False),
    ("bf16", {}, True),  # asked for: on, even where it is emulated
    ("auto", {"amx_bf16": True}, True),
    ("auto", {"avx512_bf16": True}, False),  # bf16 dot products without AMX: slower than float32
    ("auto", {"avx512_f": True, "avx2": True}, False),  # no bf16 matmuls in hardware: slower than float32
])
def test_mixed_precision_turns_on_bf16_autocast_in_trainer_args(recipe_file, monkeypatch, tmp_path, setting,
                                                                 capabilities, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    recipe, _ = load(write(recipe_file, model__mixed_precision=setting), [])
    args = recipe.stages["sft"].trainer_args(recipe, "stages.sft", tmp_path)
    assert (args.bf16, args.use_cpu) == (expected, expected)
    assert recipe.model.dtype == "auto"  # the weights' dtype is not changed by it


def test_mixed_precision_no_is_refused_with_the_choices(recipe_file):
    # YAML reads a bare `no` as false: the choices say `none`.
    msg = error_of(write(recipe_file, model__mixed_precision=False))
    assert "model.mixed_precision" in msg and "'none'" in msg and "'auto'" in msg
