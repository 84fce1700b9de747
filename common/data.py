"""Dataset loading (a hub name or a local jsonl / json / csv / parquet file) and record-shape validation.

Three record shapes flow through the lab:
  - SFT example: chat `messages`, or `prompt` + `completion` (text or chat), or plain `text`;
  - preference pair: `prompt`, `chosen`, `rejected` (or Anthropic-HH transcripts, split by common.preferences);
  - prompt: `prompt` (text or chat messages).
Validation names the file, the 1-based row and the field, so a bad row is found without a debugger.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pandas as pd

from common.config import DataSpec, Recipe
from common.errors import InputError, utf8_problem
from common.preferences import validate_preference_records

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
ROLES = {"system", "user", "assistant"}
SHAPES = {
    "sft": [("messages",), ("prompt", "completion"), ("text",)],
    "prompt": [("prompt",)],
}
# The shapes records of one shape can be read as: a preference pair's prompt is also a prompt (e.g. for PPO).
READABLE_AS = {"sft": {"sft"}, "prompt": {"prompt"}, "preference": {"preference", "prompt"}}


@dataclass
class Splits:
    train: datasets.Dataset
    test: datasets.Dataset | None
    source: str  # a human-readable name for messages and the manifest
    # What reading the data found, for the stage's metrics: rows left out under data.bad_rows: drop.
    metrics: dict[str, float] = field(default_factory=dict)


def source_name(spec: DataSpec, recipe: Recipe) -> str:
    if spec.path:
        return str(recipe.resolve_path(spec.path))
    return f"hub:{spec.hub}" if spec.hub else f"stage:{spec.stage}"


def read_file(path: Path, where: str) -> datasets.Dataset:
    fmt = LOCAL_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"{path}: unsupported file type '{path.suffix}' ({where}); use one of "
                         f"{', '.join(LOCAL_FORMATS)}")
    if not path.is_file():
        raise InputError(f"{path}: data file not found ({where}); restore it or fix the path (relative paths are "
                         "relative to the recipe file)")
    with open(path, "rb") as f:
        if not f.read(1 << 16).strip():
            raise InputError(f"{path}: the dataset is empty ({where}); give a file with at least one record")
    if fmt != "parquet":
        check_utf8(path, where)
    # A jsonl line that is not JSON: datasets logs three lines of its own and names the row 0-based; say it once,
    # with the line number an editor shows.
    bad_line = first_bad_json_line(path) if path.suffix.lower() == ".jsonl" else None
    if bad_line:
        raise InputError(f"{path}: {bad_line} ({where}); fix or remove that line")
    try:
        if fmt == "csv":  # cells are text: type inference would turn an answer "42" into an int
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
            return datasets.Dataset.from_pandas(frame.replace("", None), preserve_index=False)
        # Not load_dataset(fmt, ...): for a local file it still pings the hub to count a download, which on an
        # offline machine costs a timeout per file.
        reader = datasets.Dataset.from_json if fmt == "json" else datasets.Dataset.from_parquet
        return reader(str(path))
    except Exception as e:  # datasets wraps parser errors in several types; the first line says enough
        first_line = (str(e).splitlines() or [""])[0][:200]
        raise InputError(f"{path}: cannot be read as {fmt} ({type(e).__name__}: {first_line}); "
                         "check the file's format") from None


def check_utf8(path: Path, where: str) -> None:
    """pyarrow reads bytes that are not UTF-8 into its text columns and fails only when a row is read, in a
    traceback; decode the file first (C speed, one pass) and name the line."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: {utf8_problem(data, e)} ({where}); save the file as UTF-8") from None


def first_bad_json_line(path: Path) -> str | None:
    """The first line of a JSON-lines file that is not JSON, as "line N is not JSON (what is wrong)", N 1-based;
    None when every line parses."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    json.loads(line)
                except ValueError as e:
                    return f"line {number} is not JSON ({getattr(e, 'msg', e)} at column {getattr(e, 'colno', '?')})"
    return None


def read_hub(spec: DataSpec, split: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(spec.hub, spec.subset, split=split)
    except Exception as e:
        raise InputError(f"hub dataset '{spec.hub}' (split '{split}') could not be loaded ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}); offline machines need a local file in data.path") from None


def load_splits(spec: DataSpec, recipe: Recipe, shape: str, where: str, stage_dir: Path | None = None) -> Splits:
    """Load, rename fields, validate the shape and split off a held-out set.

    `stage_dir` is the output directory of the stage named by `spec.stage` (its `data/` folder holds
    `train.jsonl` and `test.jsonl`).
    """
    name = source_name(spec, recipe)
    if spec.path:
        train = read_file(recipe.resolve_path(spec.path), where)
    elif spec.hub:
        train = read_hub(spec, spec.split)
    else:
        assert stage_dir is not None, "a stage's data is read after that stage ran"
        train = read_file(stage_dir / "data" / "train.jsonl", where)
    test = None
    if spec.test_path:
        test = read_file(recipe.resolve_path(spec.test_path), f"{where}.test_path")
    elif spec.stage and (stage_dir / "data" / "test.jsonl").is_file():
        test = read_file(stage_dir / "data" / "test.jsonl", where)

    metrics: dict[str, float] = {}
    train = validate(rename_fields(train, spec.fields, name), shape, name, spec.bad_row_policy(), metrics)
    if test is not None:
        test_name = spec.test_path or name
        test = validate(rename_fields(test, spec.fields, test_name), shape, test_name, spec.bad_row_policy(),
                        metrics, prefix="data/test_")
    elif spec.test_size > 0 and len(train) >= 2:
        parts = train.train_test_split(test_size=spec.test_size, seed=recipe.seed)
        train, test = parts["train"], parts["test"]
    if spec.limit is not None:
        train = train.select(range(min(spec.limit, len(train))))
    return Splits(train=train, test=test, source=name, metrics=metrics)


def rename_fields(ds: datasets.Dataset, fields: dict[str, str], source: str) -> datasets.Dataset:
    missing = [col for col in fields.values() if col not in ds.column_names]
    if missing:
        raise InputError(f"{source}: column '{missing[0]}' named in data.fields is not in the data; columns are "
                         f"{', '.join(ds.column_names)}")
    return ds.rename_columns({col: ours for ours, col in fields.items() if col != ours})


def validate(ds: datasets.Dataset, shape: str, source: str, bad_rows: str = "error",
             metrics: dict[str, float] | None = None, prefix: str = "data/") -> datasets.Dataset:
    """Check every row has one of the shape's field sets, with non-empty values of the right kind; keep only
    those fields. Preference pairs are also normalised (chat, text or Anthropic-HH transcripts) to
    prompt / chosen / rejected by common.preferences, which leaves out degenerate pairs under bad_rows="drop";
    their count and first row go into `metrics` (`data/bad_rows_dropped`, `data/first_bad_row`)."""
    if len(ds) == 0:
        raise InputError(f"{source}: the dataset is empty; give a file with at least one record")
    if shape == "preference":
        pairs = validate_preference_records(ds, source, bad_rows=bad_rows)
        if pairs.bad_rows and metrics is not None:
            metrics.update({f"{prefix}bad_rows_dropped": len(pairs.bad_rows),
                            f"{prefix}first_bad_row": pairs.bad_rows[0]})
        return datasets.Dataset.from_list(pairs.records)
    options = SHAPES[shape]
    fields = next((opt for opt in options if all(f in ds.column_names for f in opt)), None)
    if fields is None:
        wanted = " or ".join("/".join(opt) for opt in options)
        raise InputError(f"{source}: row 1 has fields {', '.join(ds.column_names)}; expected {wanted} "
                         "(map other names with data.fields, e.g. {prompt: instruction})")
    for i, row in enumerate(ds.select_columns(list(fields))):
        for f in fields:
            check_field(row[f], f, i + 1, source)
    return ds.select_columns(list(fields))


def check_field(value: Any, name: str, row: int, source: str) -> None:
    where = f"{source}: row {row}, field '{name}'"
    if value is None:
        raise InputError(f"{where} is missing; every row needs it")
    if isinstance(value, str):
        if not value.strip():
            raise InputError(f"{where} is empty; give text or drop the row")
        return
    if isinstance(value, list):  # chat messages
        if not value:
            raise InputError(f"{where} is an empty message list; give at least one message")
        for j, msg in enumerate(value):
            if not isinstance(msg, dict) or not isinstance(msg.get("content"), str) or msg.get("role") not in ROLES:
                raise InputError(f"{where}, message {j + 1}: expected {{role: system|user|assistant, content: "
                                 f"text}}, got {msg!r:.120}")
        if name in ("messages", "completion", "chosen", "rejected") and value[-1]["role"] != "assistant":
            raise InputError(f"{where}: the last message must be the assistant's (the text to learn)")
        return
    raise InputError(f"{where}: expected text or a list of chat messages, got {type(value).__name__}")


def fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
