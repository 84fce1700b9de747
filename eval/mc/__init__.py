"""Multiple-choice log-likelihood evaluation (MMLU-style), lm-evaluation-harness compatible and fast.

    from eval.mc import evaluate_mc, load_questions
    test = load_questions("recipes/data/mc", split="test")
    dev = load_questions("recipes/data/mc", split="dev")
    result = evaluate_mc(model, tokenizer, test, dev, shots=5, mode="letter")
    result["metrics"]["mc/acc"]

Modules: `data` (loaders -> MCQuestion), `prompts` (lm-eval's prompt text), `scoring` (the fast scorer and
the slow reference), `results` (metrics dict via the `evaluate` modules in eval/metrics/).
Names are imported lazily so that loading data does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "MCQuestion": "eval.mc.data",
    "load_questions": "eval.mc.data",
    "load_jsonl": "eval.mc.data",
    "load_mmlu_csv": "eval.mc.data",
    "load_mmlu_csv_dir": "eval.mc.data",
    "load_table": "eval.mc.data",
    "load_hub": "eval.mc.data",
    "MCPrompt": "eval.mc.prompts",
    "build_prompt": "eval.mc.prompts",
    "evaluate_mc": "eval.mc.scoring",
    "build_prompts": "eval.mc.scoring",
    "score_prompts": "eval.mc.scoring",
    "reference_logprobs": "eval.mc.scoring",
    "aggregate": "eval.mc.results",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'eval.mc' has no attribute {name!r}")
