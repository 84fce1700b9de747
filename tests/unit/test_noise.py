"""Library noise: the known harmless messages are silenced once (common/noise.py), the real ones still show, and the
Trainer's pin_memory warning is gone at its cause on a machine without an accelerator."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from common.noise import ScalarHeadLoadReport, quiet_library_noise


@pytest.fixture
def quiet():
    with warnings.catch_warnings():  # the filters the test installs go when it ends
        quiet_library_noise()
        yield
    loader_log = logging.getLogger("transformers.modeling_utils")
    for f in [f for f in loader_log.filters if isinstance(f, ScalarHeadLoadReport)]:
        loader_log.removeFilter(f)


def load_report(caplog, model_dir, **kwargs) -> list[str]:
    with caplog.at_level(logging.WARNING, logger="transformers.modeling_utils"):
        caplog.clear()
        AutoModelForSequenceClassification.from_pretrained(model_dir, **kwargs)
    return [r.getMessage() for r in caplog.records if "LOAD REPORT" in r.getMessage()]


def test_the_scalar_heads_load_report_is_dropped_but_not_a_report_of_other_keys(tiny_model_dir, tmp_path, caplog,
                                                                                   quiet):
    # The reward model's base: a causal checkpoint loaded as a classifier, whose `score` head it lacks.
    assert load_report(caplog, tiny_model_dir, num_labels=1) == []
    # A checkpoint that lacks a layer's weight too: that report is real, and shows.
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(broken / "model.safetensors"))
    del weights["model.norm.weight"]
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    [report] = load_report(caplog, broken, num_labels=1)
    assert "model.norm.weight" in report and "score.weight" in report


def test_peft_reading_the_deprecated_gradient_checkpointing_alias_warns_no_more(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning, even one seen before in this process ...
        quiet_library_noise()  # ... but the known noise
        get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_trainers_do_not_pin_memory_without_an_accelerator(recipe_file):
    from common.runs import Run, StageContext
    from recipes.runner import load
    from sft.stage import build_trainer

    path = recipe_file()
    recipe, raw = load(path, [])
    trainer = build_trainer(recipe.stages["sft"], StageContext(Run.create(recipe, "", raw, [],
                                                                          output_dir=path.parent / "runs"), "sft"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        next(iter(trainer.get_train_dataloader()))
    assert trainer.args.dataloader_pin_memory == torch.accelerator.is_available()
    assert not [w for w in caught if "pin_memory" in str(w.message)]
