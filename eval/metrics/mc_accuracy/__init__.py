"""An `evaluate` metric module; load it with `eval.metrics.load_metric` (evaluate.load on this folder)."""
