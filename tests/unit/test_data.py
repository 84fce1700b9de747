"""Dataset loading from every local format, field mapping, and row-level validation messages."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from common.config import DataSpec, Recipe
from common.data import load_splits
from common.errors import InputError


def recipe_at(tmp_path) -> Recipe:
    recipe = Recipe(name="t")
    recipe.source = tmp_path / "recipe.yaml"
    return recipe


ROWS = [{"instruction": f"say {i}", "output": f"{i}"} for i in range(10)]


@pytest.mark.parametrize("ext", ["jsonl", "json", "csv", "parquet"])
def test_every_local_format_loads_with_field_mapping(tmp_path, ext):
    path = tmp_path / f"d.{ext}"
    frame = pd.DataFrame(ROWS)
    {"jsonl": lambda: frame.to_json(path, orient="records", lines=True),
     "json": lambda: path.write_text(json.dumps(ROWS)),
     "csv": lambda: frame.to_csv(path, index=False),
     "parquet": lambda: frame.to_parquet(path)}[ext]()
    spec = DataSpec(path=path.name, fields={"prompt": "instruction", "completion": "output"}, test_size=0.2)
    splits = load_splits(spec, recipe_at(tmp_path), "sft", "stages.sft.data")
    assert len(splits.train) == 8 and len(splits.test) == 2
    assert sorted(splits.train.column_names) == ["completion", "prompt"]
    assert {r["prompt"] for r in splits.train} | {r["prompt"] for r in splits.test} == {f"say {i}" for i in range(10)}


def test_split_is_seeded(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(20)))
    spec = DataSpec(path="d.jsonl", test_size=0.25)
    a = load_splits(spec, recipe_at(tmp_path), "sft", "w")
    b = load_splits(spec, recipe_at(tmp_path), "sft", "w")
    assert a.test["text"] == b.test["text"]


def error(tmp_path, text: str, shape: str = "sft", **spec) -> str:
    (tmp_path / "d.jsonl").write_text(text)
    with pytest.raises(InputError) as e:
        load_splits(DataSpec(path="d.jsonl", **spec), recipe_at(tmp_path), shape, "stages.sft.data")
    assert "\n" not in str(e.value)
    return str(e.value)


def test_empty_dataset(tmp_path):
    assert "the dataset is empty" in error(tmp_path, "")


def test_row_missing_a_field_names_file_row_and_field(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}, {"prompt": "e"}]
    msg = error(tmp_path, "".join(json.dumps(r) + "\n" for r in rows))
    assert "d.jsonl: row 3, field 'completion' is missing" in msg


def test_empty_text_and_bad_messages(tmp_path):
    assert "row 1, field 'text' is empty" in error(tmp_path, json.dumps({"text": "  "}) + "\n")
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}
    assert "row 1, field 'messages', message 2: expected {role: system|user|assistant" in error(
        tmp_path, json.dumps(bad) + "\n")
    no_answer = {"messages": [{"role": "user", "content": "hi"}]}
    assert "the last message must be the assistant's" in error(tmp_path, json.dumps(no_answer) + "\n")


def test_wrong_shape_lists_what_was_expected(tmp_path):
    msg = error(tmp_path, json.dumps({"question": "q", "answer": "a"}) + "\n")
    assert "expected messages or prompt/completion or text" in msg and "data.fields" in msg


def test_field_mapping_to_a_missing_column(tmp_path):
    msg = error(tmp_path, json.dumps({"text": "a"}) + "\n", fields={"text": "body"})
    assert "column 'body' named in data.fields is not in the data" in msg


def test_unreadable_file_and_unknown_extension(tmp_path):
    assert "d.jsonl: line 2 is not JSON (Expecting property name enclosed in double quotes at column 2)" in error(
        tmp_path, '{"text": "a"}\n{not json\n')
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(InputError, match="unsupported file type '.txt'"):
        load_splits(DataSpec(path="d.txt"), recipe_at(tmp_path), "sft", "w")


def test_offline_hub_dataset_fails_with_one_line(tmp_path):
    with pytest.raises(InputError, match="hub dataset 'nobody/nothing'.*offline machines need a local file"):
        load_splits(DataSpec(hub="nobody/nothing"), recipe_at(tmp_path), "sft", "w")


def test_preference_files_are_normalised_and_checked(tmp_path):
    hh = {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."}
    (tmp_path / "p.jsonl").write_text(json.dumps(hh) + "\n")
    splits = load_splits(DataSpec(path="p.jsonl", test_size=0.0), recipe_at(tmp_path), "preference", "w")
    assert splits.train[0]["prompt"] == "\n\nHuman: Hi?\n\nAssistant:" and splits.train[0]["chosen"] == " Hello!"
    same = {"prompt": "p", "chosen": "x", "rejected": "x "}
    assert "row 1" in error(tmp_path, json.dumps(same) + "\n", shape="preference")
