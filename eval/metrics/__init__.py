"""`evaluate` metric modules written for alignlab, one folder each (`<name>/<name>.py`).

They are loaded from their local folder with `evaluate.load(path)`, so no hub access is needed.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent


def metric_path(name: str) -> Path:
    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        known = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
        raise KeyError(f"no metric module {name!r} in {METRICS_DIR}; known: {', '.join(known)}")
    return path


@cache
def load_metric(name: str):
    """`evaluate.load` of one of our metric folders (cached: loading copies and imports the module)."""
    import evaluate

    # keep_in_memory: no arrow cache files under ~/.cache, so parallel runs never contend for them.
    return evaluate.load(str(metric_path(name)), keep_in_memory=True)
