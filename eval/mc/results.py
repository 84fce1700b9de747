"""Turn per-question log-likelihoods into the metrics dict (JSON-serialisable) the eval stage writes.

Layout:
    mode, shots, chat_template, n_questions, n_subjects
    acc:       {accuracy, stderr, n, macro_accuracy, macro_stderr, n_subjects, per_subject{s: {accuracy, stderr, n}}}
    acc_norm:  the same, choosing argmax(loglik / len(answer text in characters))  (cloze mode; lm-eval's acc_norm)
    acc_bytes: the same with the length in UTF-8 bytes                              (cloze mode; lm-eval's acc_bytes)
    circular:  with CircularEval, the accuracy block of "right under every rotation of the options"
    letters:   predicted-letter histogram, gold-letter shares, chance level, majority baseline
    calibration: ece, mce, brier, reliability bins, from the softmax over each question's choices
    metrics:   flat namespaced scalars for metrics.jsonl and the report ("mc/acc", "mc/ece", ...)
    records:   per question: subject, answer, pred, logprobs (optional)

Every metric is computed by one of our `evaluate` modules (eval/metrics/), loaded from its local folder.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from eval.mc.data import MCQuestion
from eval.metrics import load_metric

NO_SUBJECT = "(none)"


def softmax_over_choices(logprobs: Sequence[float]) -> list[float]:
    """Probabilities the model gives each choice, renormalised over the choices (max-shifted for stability)."""
    x = np.asarray(logprobs, dtype=np.float64)
    p = np.exp(x - x.max())
    return (p / p.sum()).tolist()


def predictions(logprobs: Sequence[Sequence[float]], lengths: Sequence[Sequence[float]] | None = None) -> list[int]:
    """argmax per question (first on ties, as lm-eval's np.argmax); with `lengths`, of loglik / length."""
    if lengths is None:
        return [int(np.argmax(lp)) for lp in logprobs]
    return [int(np.argmax(np.asarray(lp) / np.asarray(n, dtype=np.float64)))
            for lp, n in zip(logprobs, lengths, strict=True)]


def rotations(q: MCQuestion) -> list[MCQuestion]:
    """CircularEval (Liu et al. 2023, "MMBench", sec. 3.2; OpenCompass): the question with its options shifted
    circularly by 0, 1, ..., N-1 places, the answer following its option. Rotation 0 is the question itself."""
    n = len(q.choices)
    return [MCQuestion(q.question, q.choices[r:] + q.choices[:r], (q.answer - r) % n, q.subject) for r in range(n)]


def circular_correct(questions: Sequence[MCQuestion], logprobs: Sequence[Sequence[float]]) -> list[bool]:
    """Per question, whether every rotation's argmax is its answer; `logprobs` holds the rows of all rotations of
    the first question, then of the second, ... (as `rotations` lists them)."""
    out, k = [], 0
    for q in questions:
        rotated = rotations(q)
        preds = predictions(logprobs[k:k + len(rotated)])
        out.append(all(p == r.answer for p, r in zip(preds, rotated, strict=True)))
        k += len(rotated)
    if k != len(logprobs):
        raise ValueError(f"{len(logprobs)} rows of log-probs for {k} rotations")
    return out


def aggregate(questions: Sequence[MCQuestion], logprobs: Sequence[Sequence[float]], mode: str = "letter",
              shots: int = 0, chat_template: bool = False, n_bins: int = 10, include_records: bool = True,
              circular: Sequence[bool] | None = None) -> dict:
    """The metrics dict (module docstring); `circular`, when given, is `circular_correct` per question."""
    if len(questions) != len(logprobs):
        raise ValueError(f"{len(questions)} questions but {len(logprobs)} rows of log-probs")
    for i, (q, lp) in enumerate(zip(questions, logprobs, strict=True)):
        if len(lp) != len(q.choices):
            raise ValueError(f"question {i}: {len(q.choices)} choices but {len(lp)} log-probs")
    golds = [q.answer for q in questions]
    subjects = [q.subject or NO_SUBJECT for q in questions]
    preds = predictions(logprobs)
    accuracy = load_metric("mc_accuracy")
    result: dict = {
        "mode": mode,
        "shots": shots,
        "chat_template": chat_template,
        "n_questions": len(questions),
        "n_subjects": len(set(subjects)),
        "acc": accuracy.compute(predictions=preds, references=golds, subjects=subjects),
    }
    if mode == "cloze":
        # lm-eval (api/task.py, process_results): acc_norm divides by len(choice) in characters, acc_bytes by
        # its UTF-8 length; the same for ASCII answers.
        chars = [[len(c) for c in q.choices] for q in questions]
        utf8 = [[len(c.encode("utf-8")) for c in q.choices] for q in questions]
        result["acc_norm"] = accuracy.compute(predictions=predictions(logprobs, chars), references=golds,
                                              subjects=subjects)
        result["acc_bytes"] = accuracy.compute(predictions=predictions(logprobs, utf8), references=golds,
                                               subjects=subjects)
    if circular is not None:
        result["circular"] = accuracy.compute(predictions=[int(c) for c in circular], references=[1] * len(circular),
                                              subjects=subjects)
    result["letters"] = load_metric("mc_answer_distribution").compute(
        predictions=preds, references=golds, n_choices=[len(q.choices) for q in questions])
    probs = [softmax_over_choices(lp) for lp in logprobs]
    result["calibration"] = load_metric("mc_calibration").compute(predictions=probs, references=golds,
                                                                  n_bins=n_bins)
    result["metrics"] = flat_metrics(result)
    if include_records:
        result["records"] = [{"subject": q.subject, "answer": q.answer, "pred": p, "logprobs": list(map(float, lp))}
                             for q, p, lp in zip(questions, preds, logprobs, strict=True)]
    return result


def flat_metrics(result: dict) -> dict[str, float | None]:
    """Scalars under stable namespaced names, the same in metrics.jsonl, the stage summary and the report."""
    out: dict[str, float | None] = {}
    for key in ("acc", "acc_norm", "acc_bytes", "circular"):
        if key not in result:
            continue
        block = result[key]
        out[f"mc/{key}"] = block["accuracy"]
        out[f"mc/{key}_stderr"] = block["stderr"]
        out[f"mc/{key}_macro"] = block.get("macro_accuracy")
        out[f"mc/{key}_macro_stderr"] = block.get("macro_stderr")
        for subject, sub in block.get("per_subject", {}).items():
            out[f"mc/{key}/{subject}"] = sub["accuracy"]
    out["mc/chance"] = result["letters"]["chance"]
    out["mc/majority_baseline"] = result["letters"]["majority_baseline"]
    for letter, share in result["letters"]["predicted_share"].items():
        out[f"mc/pred_share/{letter}"] = share
    out["mc/ece"] = result["calibration"]["ece"]
    out["mc/mce"] = result["calibration"]["mce"]
    out["mc/brier"] = result["calibration"]["brier"]
    out["mc/mean_confidence"] = result["calibration"]["mean_confidence"]
    return out
