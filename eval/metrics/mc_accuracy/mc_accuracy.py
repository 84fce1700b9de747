"""Multiple-choice accuracy with standard errors: per subject, micro (over questions) and macro (over subjects).

Loaded from this folder with `evaluate.load(path)`, so it works offline. Self-contained (numpy only):
`evaluate` copies this file into its module cache and imports it on its own.
"""

import math

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy of predicted choice indices against gold indices. With `subjects`, also the accuracy of each
subject and the macro average (the unweighted mean of the subjects' accuracies, what MMLU papers call the
average over subjects); the micro average weights every question equally.

Standard errors are those of lm-evaluation-harness (`mean_stderr`, api/metrics.py): the sample standard
deviation (n - 1 denominator) over sqrt(n). The macro average is a mean of independent subject means, so
its standard error is sqrt(sum of the subjects' squared standard errors) / number of subjects. A standard
error that needs two or more questions is None with fewer.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): the predicted choice index of each question.
    references (list of int): the gold choice index of each question.
    subjects (list of str, optional): each question's subject.
Returns:
    accuracy, stderr, n; and with subjects: macro_accuracy, macro_stderr, n_subjects, per_subject
    (subject -> {accuracy, stderr, n}).
Examples:
    >>> metric = evaluate.load("eval/metrics/mc_accuracy")
    >>> metric.compute(predictions=[0, 1, 2, 3], references=[0, 1, 2, 0])["accuracy"]
    0.75
"""


def mean_and_stderr(values):
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    mean = float(values.mean()) if n else None
    stderr = float(values.std(ddof=1) / math.sqrt(n)) if n >= 2 else None
    return mean, stderr


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class McAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, subjects=None):
        correct = np.asarray(predictions) == np.asarray(references)
        accuracy, stderr = mean_and_stderr(correct)
        result = {"accuracy": accuracy, "stderr": stderr, "n": int(len(correct))}
        if subjects is None:
            return result
        if len(subjects) != len(correct):
            raise ValueError(f"subjects has {len(subjects)} entries for {len(correct)} predictions")
        subjects = np.asarray(subjects, dtype=object)
        per_subject = {}
        for subject in sorted(set(subjects.tolist())):
            acc, se = mean_and_stderr(correct[subjects == subject])
            per_subject[subject] = {"accuracy": acc, "stderr": se, "n": int((subjects == subject).sum())}
        accs = [v["accuracy"] for v in per_subject.values()]
        errs = [v["stderr"] for v in per_subject.values()]
        result["macro_accuracy"] = float(np.mean(accs))
        result["macro_stderr"] = (None if any(e is None for e in errs)
                                  else float(math.sqrt(sum(e * e for e in errs)) / len(errs)))
        result["n_subjects"] = len(per_subject)
        result["per_subject"] = per_subject
        return result
