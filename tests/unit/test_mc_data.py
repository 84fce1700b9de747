"""Every loader on small files written in tmp_path, the shipped set, and bad rows -> InputError."""

import csv
import json
from pathlib import Path

import pytest

from common.errors import InputError
from eval.mc import data as mc_data
from eval.mc.data import MCQuestion, few_shot_pool, load_jsonl, load_mmlu_csv, load_questions, load_table

ROWS = [
    {"question": "What is 2 + 2?", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1},
    {"question": "Capital of France?", "subject": "geography", "choices": ["Paris", "Rome"], "answer": 0},
]
EXPECTED = [MCQuestion("What is 2 + 2?", ("3", "4", "5", "6"), 1, "math"),
            MCQuestion("Capital of France?", ("Paris", "Rome"), 0, "geography")]
SHIPPED = Path(__file__).resolve().parents[2] / "recipes" / "data" / "mc"


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: Path, rows) -> Path:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def test_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", ROWS)
    assert load_jsonl(path) == EXPECTED
    assert load_questions(path) == EXPECTED
    assert load_questions(path, subject="math") == EXPECTED[:1]


def test_jsonl_optional_subject_letter_answer_and_blank_lines(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "Q?", "choices": ["a", "b", "c"], "answer": "C"}\n\n')
    assert load_jsonl(path) == [MCQuestion("Q?", ("a", "b", "c"), 2, "")]


def test_directory_of_split_jsonl(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", ROWS)
    write_jsonl(tmp_path / "dev.jsonl", ROWS[:1])
    assert load_questions(tmp_path, split="test") == EXPECTED
    assert load_questions(tmp_path, split="dev") == EXPECTED[:1]


def test_mmlu_csv_file_and_directories(tmp_path):
    # The original MMLU layout: no header; question, options, answer letter; quoted newlines and commas.
    (tmp_path / "test").mkdir()
    (tmp_path / "dev").mkdir()
    write_csv(tmp_path / "test" / "high_school_biology_test.csv",
              [["Which organ pumps blood,\nmostly?", "Liver", "Heart", "Lung", "Skin", "B"]])
    write_csv(tmp_path / "test" / "anatomy_test.csv", [["Bones in the ear?", "3", "206", "A"]])
    write_csv(tmp_path / "dev" / "anatomy_dev.csv", [["Largest bone?", "Femur", "Ulna", "A"]])
    bio = MCQuestion("Which organ pumps blood,\nmostly?", ("Liver", "Heart", "Lung", "Skin"), 1, "high_school_biology")
    anatomy = MCQuestion("Bones in the ear?", ("3", "206"), 0, "anatomy")
    assert load_mmlu_csv(tmp_path / "test" / "high_school_biology_test.csv") == [bio]
    assert load_questions(tmp_path / "test" / "anatomy_test.csv") == [anatomy]
    # A folder with test/ and dev/ (sorted by subject), or one flat folder of *_test.csv.
    assert load_questions(tmp_path, split="test") == [anatomy, bio]
    assert load_questions(tmp_path / "test", split="test") == [anatomy, bio]
    assert load_questions(tmp_path, split="dev") == [MCQuestion("Largest bone?", ("Femur", "Ulna"), 0, "anatomy")]


def test_hub_layout_parquet_and_csv(tmp_path):
    import datasets

    table = datasets.Dataset.from_list(ROWS)
    table.to_parquet(str(tmp_path / "mmlu.parquet"))
    assert load_table(tmp_path / "mmlu.parquet") == EXPECTED
    assert load_questions(tmp_path / "mmlu.parquet") == EXPECTED


def test_hub_name_uses_datasets(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        # cais/mmlu's answer column is a ClassLabel A-D, which datasets hands over as ints.
        features = datasets.Features({"question": datasets.Value("string"), "subject": datasets.Value("string"),
                                      "choices": datasets.Sequence(datasets.Value("string")),
                                      "answer": datasets.ClassLabel(names=["A", "B", "C", "D"])})
        return datasets.Dataset.from_list(ROWS, features=features)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_questions("cais/mmlu", split="dev") == EXPECTED
    assert calls == [("cais/mmlu", "all", "dev")]
    load_questions("cais/mmlu", split="test", subject="anatomy")
    assert calls[-1] == ("cais/mmlu", "anatomy", "test")


def test_hub_offline_is_one_clear_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(InputError, match="internet"):
        mc_data.load_hub("cais/mmlu")


def test_shipped_set():
    test = load_questions(SHIPPED, split="test")
    dev = load_questions(SHIPPED, split="dev")
    assert len(test) >= 60
    subjects = {q.subject for q in test}
    assert len(subjects) >= 5
    pool = few_shot_pool(dev)
    assert all(len(pool[s]) >= 5 for s in subjects)
    assert (SHIPPED / "README.md").is_file()


# ----------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"question": "Q?", "choices": ["only"], "answer": 0}, "at least 2 choices"),
        ({"question": "Q?", "choices": ["a", "b"], "answer": 2}, "out of range"),
        ({"question": "Q?", "choices": ["a", "b"], "answer": -1}, "out of range"),
        ({"question": "Q?", "answer": 0}, "missing column"),
        ({"choices": ["a", "b"], "answer": 0}, "missing column"),
        ({"question": "Q?", "choices": "a b", "answer": 0}, "list"),
        ({"question": "Q?", "choices": ["a", "b"], "answer": "Z"}, "out of range"),
        ({"question": "Q?", "choices": ["a", "b"], "answer": "maybe"}, "letter"),
    ],
)
def test_bad_jsonl_rows_name_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], row])
    with pytest.raises(InputError, match=message) as err:
        load_jsonl(path)
    assert f"{path}, line 2" in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "Q?"\n')
    with pytest.raises(InputError, match=r"line 1: not valid JSON"):
        load_jsonl(path)


def test_bad_csv_rows_name_file_and_row(tmp_path):
    one_choice = write_csv(tmp_path / "x_test.csv", [["Q?", "a", "b", "A"], ["Q?", "a", "A"]])
    with pytest.raises(InputError, match="row 2") as err:
        load_mmlu_csv(one_choice)
    assert str(one_choice) in str(err.value)
    out_of_range = write_csv(tmp_path / "y_test.csv", [["Q?", "a", "b", "C"]])
    with pytest.raises(InputError, match=r"row 1: 'answer' 'C' \(index 2\) is out of range"):
        load_mmlu_csv(out_of_range)


def test_bad_parquet_row_and_missing_column(tmp_path):
    import datasets

    bad = [ROWS[0], {**ROWS[1], "answer": 5}]
    datasets.Dataset.from_list(bad).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(InputError, match=r"bad.parquet, row 2: 'answer' 5 is out of range"):
        load_table(tmp_path / "bad.parquet")
    datasets.Dataset.from_list([{"question": "Q?", "choices": ["a", "b"]}]).to_parquet(str(tmp_path / "nocol.parquet"))
    with pytest.raises(InputError, match=r"nocol.parquet, row 1: missing column\(s\) 'answer'"):
        load_table(tmp_path / "nocol.parquet")


def test_missing_files(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        load_questions(tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match="no '\\*_test.csv' files"):
        load_questions(tmp_path, split="test")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(InputError, match="no questions"):
        load_jsonl(empty)
