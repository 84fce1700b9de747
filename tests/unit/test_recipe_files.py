"""Every recipe shipped under recipes/ loads and validates; every accelerate config parses."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig

from recipes.runner import load

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
CONFIGS = sorted((RECIPES / "configs").rglob("*.yaml"))
LAUNCHERS = sorted((RECIPES / "accelerate").glob("*.yaml"))


def test_there_are_recipes_and_launchers():
    assert CONFIGS and {p.stem for p in LAUNCHERS} >= {"single-gpu", "ddp", "zero2", "zero3", "fsdp", "cpu-2proc"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_validates(path, monkeypatch):
    # Recipes for larger models name hub ids, which load time checks can be fetched; this machine has no hub, so
    # validate the rest of each recipe as where the hub is reachable.
    monkeypatch.setattr("common.models._hub_reachable", lambda: True)
    recipe, _ = load(path, [])
    assert recipe.stages and recipe.order()
    for profile in recipe.profiles:
        load(path, [f"profile={profile}"])


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_accelerate_config_parses(path):
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.num_processes == yaml.safe_load(path.read_text())["num_processes"]


def test_quick_qlora_is_the_quick_profile_plus_the_qlora_one():
    # In a YAML merge key the first mapping listed (quick) wins a key both set, where qlora's value must hold.
    profiles = yaml.safe_load((RECIPES / "configs/smollm2-135m/sentiment.yaml").read_text())["profiles"]
    assert profiles["quick-qlora"] == profiles["quick"] | profiles["qlora"]
