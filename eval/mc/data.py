"""Multiple-choice question loaders: every source becomes a list of `MCQuestion`.

Three layouts are read:

- the hub layout of `cais/mmlu` (columns `question`, `subject`, `choices`, `answer` index), either by hub
  name through `datasets` (needs internet) or from a local parquet / jsonl / json / csv file in the same
  columns;
- the original MMLU CSV files (Hendrycks et al. 2021, github.com/hendrycks/test): `<subject>_test.csv`
  and `<subject>_dev.csv`, no header, columns question, one column per option, answer letter;
- jsonl with `question`, `choices`, `answer` (0-based index, or a letter) and an optional `subject`.

Any number of choices >= 2. Every row is checked; a bad one raises `InputError` naming the file and the
row, what was expected and what to do.
"""

from __future__ import annotations

import csv
import json
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import InputError

LETTERS = string.ascii_uppercase
TABLE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


@dataclass(frozen=True)
class MCQuestion:
    """One multiple-choice question. `answer` is the 0-based index of the right choice; `subject` may be ""
    (then the prompt header names no subject)."""

    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str = ""

    def __post_init__(self) -> None:
        # Normalise a list given by a caller into a tuple so questions stay hashable and immutable.
        object.__setattr__(self, "choices", tuple(self.choices))


def _answer_index(value: Any, n_choices: int, where: str) -> int:
    """An answer given as an int index, a digit string or a letter -> a checked 0-based index."""
    raw = value
    if isinstance(value, bool):
        raise InputError(f"{where}: 'answer' must be a 0-based choice index or a letter, got {value!r}; "
                         "fix the row")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            value = int(text)
        elif len(text) == 1 and text.upper() in LETTERS:
            value = LETTERS.index(text.upper())
        else:
            raise InputError(f"{where}: 'answer' must be a 0-based choice index or a letter A-"
                             f"{LETTERS[max(n_choices - 1, 0)]}, got {value!r}; fix the row")
    if not isinstance(value, int):
        raise InputError(f"{where}: 'answer' must be a 0-based choice index or a letter, got "
                         f"{type(value).__name__} {value!r}; fix the row")
    if not 0 <= value < n_choices:
        given = f"{raw!r} (index {value})" if raw != value else f"{value}"
        raise InputError(f"{where}: 'answer' {given} is out of range for {n_choices} choices (expected an "
                         f"index 0..{n_choices - 1} or a letter A-{LETTERS[n_choices - 1]}); fix the answer "
                         "(indices are 0-based)")
    return value


def _choices(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise InputError(f"{where}: 'choices' must be a list of at least 2 strings, got "
                         f"{type(value).__name__}; write the options as a JSON list")
    choices = tuple(value)
    if len(choices) < 2:
        raise InputError(f"{where}: a question needs at least 2 choices, got {len(choices)}; "
                         "add the missing options or drop the row")
    for i, choice in enumerate(choices):
        if not isinstance(choice, str) or choice.strip() == "":
            raise InputError(f"{where}: choice {i} must be a non-empty string, got {choice!r}; fix the row")
    return choices


def question_from_record(record: Mapping[str, Any], where: str, default_subject: str = "") -> MCQuestion:
    """Validate one record in the hub / jsonl layout. `where` names the file and row for error messages."""
    if not isinstance(record, Mapping):
        raise InputError(f"{where}: expected an object with 'question', 'choices', 'answer', got "
                         f"{type(record).__name__}; write one JSON object per line")
    missing = [key for key in ("question", "choices", "answer") if key not in record or record[key] is None]
    if missing:
        raise InputError(f"{where}: missing column(s) {', '.join(repr(k) for k in missing)}; every row needs "
                         "'question', 'choices' (list) and 'answer' (0-based index), 'subject' is optional")
    question = record["question"]
    if not isinstance(question, str) or question.strip() == "":
        raise InputError(f"{where}: 'question' must be a non-empty string, got {question!r}; fix the row")
    choices = _choices(record["choices"], where)
    answer = _answer_index(record["answer"], len(choices), where)
    subject = record.get("subject")
    if subject is None:
        subject = default_subject
    if not isinstance(subject, str):
        raise InputError(f"{where}: 'subject' must be a string, got {subject!r}; fix the row")
    return MCQuestion(question=question, choices=choices, answer=answer, subject=subject.strip())


def questions_from_records(records: Iterable[Mapping[str, Any]], source: str,
                           default_subject: str = "", first_row: int = 1) -> list[MCQuestion]:
    """Validate rows of a table (a `datasets.Dataset`, a list of dicts); rows are numbered from `first_row`."""
    out = [question_from_record(rec, f"{source}, row {i}", default_subject)
           for i, rec in enumerate(records, start=first_row)]
    if not out:
        raise InputError(f"{source}: no questions found; expected at least one row")
    return out


def load_jsonl(path: str | Path, default_subject: str = "") -> list[MCQuestion]:
    """One JSON object a line: `question`, `choices`, `answer`, optional `subject`. Blank lines are skipped."""
    path = Path(path)
    out = []
    with _open_text(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{where}: not valid JSON ({err.msg}); write one JSON object per line") from None
            out.append(question_from_record(record, where, default_subject))
    if not out:
        raise InputError(f"{path}: no questions found; expected one JSON object per line")
    return out


def _open_text(path: Path):
    if not path.is_file():
        raise InputError(f"{path}: file not found; check the path")
    return path.open(encoding="utf-8", newline="")


def subject_from_csv_name(path: Path) -> tuple[str, str]:
    """`high_school_biology_test.csv` -> ("high_school_biology", "test")."""
    stem = path.stem
    for split in ("test", "dev", "val", "validation", "auxiliary_train", "train"):
        if stem.endswith("_" + split):
            return stem[: -len(split) - 1], split
    return stem, ""


def load_mmlu_csv(path: str | Path, subject: str | None = None) -> list[MCQuestion]:
    """An original MMLU CSV: no header; question, one column per option, answer letter (or index).

    The subject comes from the file name (`<subject>_test.csv`) unless given.
    """
    path = Path(path)
    if subject is None:
        subject, _ = subject_from_csv_name(path)
    out = []
    with _open_text(path) as handle:
        # csv handles quoted fields with embedded newlines and commas, which MMLU questions contain.
        for row_no, row in enumerate(csv.reader(handle), start=1):
            if not row or all(not cell.strip() for cell in row):
                continue
            where = f"{path}, row {row_no}"
            if len(row) < 4:
                raise InputError(f"{where}: expected columns question, at least 2 options, answer letter "
                                 f"(no header), got {len(row)} column(s); fix the row")
            question, choices, answer = row[0], row[1:-1], row[-1]
            out.append(question_from_record({"question": question, "choices": choices, "answer": answer,
                                             "subject": subject}, where))
    if not out:
        raise InputError(f"{path}: no questions found; expected MMLU CSV rows (question, options, answer)")
    return out


def load_mmlu_csv_dir(directory: str | Path, split: str = "test") -> list[MCQuestion]:
    """Every `<subject>_<split>.csv` in `directory`, or in `directory/<split>/` (the MMLU tarball layout:
    data/test/, data/dev/), sorted by subject."""
    directory = Path(directory)
    candidates = [directory / split, directory]
    for folder in candidates:
        files = sorted(folder.glob(f"*_{split}.csv")) if folder.is_dir() else []
        if files:
            return [q for f in files for q in load_mmlu_csv(f)]
    raise InputError(f"{directory}: no '*_{split}.csv' files here or in '{directory / split}'; point at the "
                     "MMLU data folder (with test/ and dev/) or at one folder of '<subject>_<split>.csv' files")


def load_table(path: str | Path, default_subject: str = "") -> list[MCQuestion]:
    """A local parquet / json / csv table in the hub layout of `cais/mmlu`, read with `datasets`."""
    import datasets

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found; check the path")
    builder = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}.get(path.suffix)
    if builder is None:
        raise InputError(f"{path}: unsupported file type {path.suffix!r}; expected one of {', '.join(TABLE_SUFFIXES)}")
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # datasets raises many types for unreadable files
        raise InputError(f"{path}: could not be read as {builder} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); check the file") from None
    missing = [c for c in ("question", "choices", "answer") if c not in table.column_names]
    if missing:
        raise InputError(f"{path}, row 1: missing column(s) {', '.join(repr(c) for c in missing)}; expected the "
                         f"cais/mmlu layout (question, subject, choices, answer), found {table.column_names}")
    return questions_from_records(table, str(path), default_subject)


def load_hub(name: str, split: str = "test", config: str | None = None) -> list[MCQuestion]:
    """A hub dataset in the `cais/mmlu` layout (`config` "all" or one subject). Needs internet."""
    import datasets

    try:
        # cais/mmlu has one config per subject plus "all"; other hub sets in its layout may have none.
        table = datasets.load_dataset(name, config or ("all" if name == "cais/mmlu" else None), split=split)
    except Exception as err:
        raise InputError(f"{name}: could not load split {split!r} from the hub ({type(err).__name__}); it needs "
                         "internet access, or download it and point at a local parquet/jsonl file") from None
    return questions_from_records(table, f"{name} ({split})")


def load_questions(source: str | Path, split: str = "test", subject: str | None = None) -> list[MCQuestion]:
    """Load one split from any supported source.

    - a directory with `<split>.jsonl` (the shipped `recipes/data/mc/` layout) or MMLU CSVs
      (`<subject>_<split>.csv`, directly or under `<split>/`);
    - a `.jsonl` file (our layout; `cais/mmlu` rows are the same shape), `.json`, `.parquet` or `.csv`
      table in the hub layout, or an MMLU CSV named `<subject>_<split>.csv` (no header);
    - otherwise a hub dataset name (`cais/mmlu`), `subject` being its config.

    `subject`, when given for a local source, keeps only that subject's questions.
    """
    path = Path(source)
    if path.is_dir():
        jsonl = path / f"{split}.jsonl"
        questions = load_jsonl(jsonl) if jsonl.is_file() else load_mmlu_csv_dir(path, split)
    elif path.is_file():
        if path.suffix == ".jsonl":
            questions = load_jsonl(path)
        elif path.suffix == ".csv" and _looks_like_mmlu_csv(path):
            questions = load_mmlu_csv(path)
        else:
            questions = load_table(path)
    elif path.suffix in TABLE_SUFFIXES or str(source).startswith((".", "/", "~")):
        raise InputError(f"{source}: file not found; check the path")
    else:
        return load_hub(str(source), split=split, config=subject)
    if subject is not None:
        questions = [q for q in questions if q.subject == subject]
        if not questions:
            raise InputError(f"{source}: no questions with subject {subject!r}; check the subject name")
    return questions


def _looks_like_mmlu_csv(path: Path) -> bool:
    """The original MMLU CSVs have no header; a hub-layout CSV starts with a 'question' header."""
    with _open_text(path) as handle:
        first = next(csv.reader(handle), [])
    return not ({"question", "choices", "answer"} <= {cell.strip() for cell in first})


def few_shot_pool(dev_questions: Iterable[MCQuestion] | None) -> dict[str, list[MCQuestion]]:
    """Group the dev split by subject, keeping file order (lm-eval's `first_n` sampler takes them in order)."""
    pool: dict[str, list[MCQuestion]] = {}
    for q in dev_questions or ():
        pool.setdefault(q.subject, []).append(q)
    return pool
