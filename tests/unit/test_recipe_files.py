"""Every recipe shipped under recipes/ loads and validates; every accelerate config parses."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig

from common.schema import to_dict
from recipes.runner import load

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
CONFIGS = sorted((RECIPES / "configs").rglob("*.yaml"))
LAUNCHERS = sorted((RECIPES / "accelerate").glob("*.yaml"))


def test_there_are_recipes_and_launchers():
    assert CONFIGS and {p.stem for p in LAUNCHERS} >= {"single-gpu", "ddp", "zero2", "zero3", "fsdp", "cpu-2proc"}


@pytest.fixture(autouse=True)
def hub_reachable(monkeypatch):
    # Recipes for larger models name hub ids, which load time checks can be fetched; this machine has no hub, so
    # validate the rest of each recipe as where the hub is reachable.
    monkeypatch.setattr("common.models._hub_reachable", lambda: True)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_validates(path):
    recipe, _ = load(path, [])
    assert recipe.stages and recipe.order()
    for profile in recipe.profiles:
        load(path, [f"profile={profile}"])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(RECIPES)))
def test_the_resolved_recipe_rebuilds_the_same_recipe(path, tmp_path):
    """The resolved config a run writes (resolved.yaml: profile and overrides applied) is a recipe of its own:
    written out and loaded again, from another YAML text, it makes the same typed recipe, stage for stage: its sweeps
    already expanded into their members, which an eval stage's models name one by one."""
    (tmp_path / "data").symlink_to(RECIPES / "data")  # data paths stay relative to the recipe file
    rebuilt_path = tmp_path / path.relative_to(RECIPES)
    rebuilt_path.parent.mkdir(parents=True)
    recipe, _ = load(path, [])
    for overrides in [[]] + [[f"profile={name}"] for name in recipe.profiles]:
        original, resolved = load(path, overrides)
        rebuilt_path.write_text(yaml.safe_dump(resolved, sort_keys=False))
        assert rebuilt_path.read_text() != path.read_text()
        rebuilt, _ = load(rebuilt_path, [])
        assert rebuilt.sweeps == {} and rebuilt.order() == original.order()
        assert with_models_named(rebuilt) == with_models_named(original), overrides


def with_models_named(recipe) -> dict:
    """The recipe as a dict, each eval stage's models with every swept stage replaced by its members (and without
    the profile's name: resolved.yaml holds the profile's values, not its name)."""
    data = to_dict(recipe)
    data.pop("profile")
    for name, stage in recipe.stages.items():
        if stage.kind == "eval":
            data["stages"][name]["models"] = stage.model_names(recipe, f"stages.{name}")
    return data


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_accelerate_config_parses(path):
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.num_processes == yaml.safe_load(path.read_text())["num_processes"]


def test_quick_qlora_is_the_quick_profile_plus_the_qlora_one():
    # In a YAML merge key the first mapping listed (quick) wins a key both set, where qlora's value must hold.
    profiles = yaml.safe_load((RECIPES / "configs/smollm2-135m/sentiment.yaml").read_text())["profiles"]
    assert profiles["quick-qlora"] == profiles["quick"] | profiles["qlora"]
