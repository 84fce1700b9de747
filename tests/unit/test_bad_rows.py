"""Degenerate preference rows (an empty final response, chosen equal to rejected), as public datasets such as
Anthropic-HH have a few of: `data.bad_rows: drop` leaves them out and says how many and where, `error` refuses
the data naming the row; unset, a hub dataset drops them and a local file refuses them."""

from __future__ import annotations

import logging

import datasets
import pytest

from common.config import DataSpec
from common.data import validate
from common.errors import InputError
from common.preferences import validate_preference_records

H, A = "\n\nHuman:", "\n\nAssistant:"


def hh_rows() -> list[dict]:
    """Five HH-style transcripts: rows 2 and 5 end with an empty Assistant turn in one dialogue, row 4 has the
    same reply on both sides; rows 1 and 3 are good."""
    return [
        {"chosen": f"{H} Hi{A} Hello! How can I help?", "rejected": f"{H} Hi{A} Go away."},
        {"chosen": f"{H} Tell me a joke{A}", "rejected": f"{H} Tell me a joke{A} No."},
        {"chosen": f"{H} 2+2?{A} 4{H} Sure?{A} Yes, 4.", "rejected": f"{H} 2+2?{A} 4{H} Sure?{A} 5."},
        {"chosen": f"{H} Thanks{A} You're welcome.", "rejected": f"{H} Thanks{A} You're welcome. "},
        {"chosen": f"{H} Bye{A} Goodbye!", "rejected": f"{H} Bye{A}"},
    ]


def test_drop_leaves_out_empty_and_identical_rows_and_says_which(caplog):
    with caplog.at_level(logging.WARNING, logger="common.preferences"):
        data = validate_preference_records(hh_rows(), "hh.jsonl", bad_rows="drop")
    assert data.bad_rows == [2, 4, 5]
    assert [r["prompt"] for r in data.records] == [f"{H} Hi{A}", f"{H} 2+2?{A} 4{H} Sure?{A}"]
    assert [r["chosen"] for r in data.records] == [" Hello! How can I help?", " Yes, 4."]
    assert ("hh.jsonl: dropped 3 of 5 rows whose chosen or rejected response is empty or whose chosen and rejected "
            "are the same text (first: row 2)") in caplog.text


def test_error_names_the_first_bad_row_and_the_setting():
    with pytest.raises(InputError, match=r"^hh\.jsonl: row 2: 'chosen' is empty; remove the row or fill in the "
                                         r"response, or set data\.bad_rows: drop to leave such rows out$"):
        validate_preference_records(hh_rows(), "hh.jsonl", bad_rows="error")
    with pytest.raises(InputError, match=r"^hh\.jsonl: row 1: chosen and rejected are the same text, which "
                                         r"teaches no preference; remove the row, or set data\.bad_rows: drop"):
        validate_preference_records(hh_rows()[3:4], "hh.jsonl", bad_rows="error")


def test_only_bad_rows_is_still_an_error():
    with pytest.raises(InputError, match=r"^hh: no usable preference records \(2 have an empty response or chosen "
                                         r"equal to rejected, 0 differ before the last assistant turn\)"):
        validate_preference_records([hh_rows()[1], hh_rows()[3]], "hh", bad_rows="drop")


def test_default_policy_drops_for_hub_datasets_and_refuses_local_files():
    assert DataSpec(hub="Anthropic/hh-rlhf").bad_row_policy() == "drop"
    assert DataSpec(path="hh.jsonl").bad_row_policy() == "error"
    assert DataSpec(stage="prefs").bad_row_policy() == "error"
    assert DataSpec(path="hh.jsonl", bad_rows="drop").bad_row_policy() == "drop"
    assert DataSpec(hub="Anthropic/hh-rlhf", bad_rows="error").bad_row_policy() == "error"


def test_dropped_rows_reach_the_stage_metrics():
    metrics: dict[str, float] = {}
    ds = validate(datasets.Dataset.from_list(hh_rows()), "preference", "hh", "drop", metrics)
    assert len(ds) == 2
    assert metrics == {"data/bad_rows_dropped": 3, "data/first_bad_row": 2}
    clean: dict[str, float] = {}
    validate(datasets.Dataset.from_list(hh_rows()[:1]), "preference", "hh", "drop", clean)
    assert clean == {}, "nothing dropped, nothing reported"

