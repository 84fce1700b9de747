"""Preference records: HH transcript splitting, conversational and explicit rows, and bad-input messages.
Also: the sentiment task's prompt files are what their generator writes."""

import importlib.util
import json
import logging
from pathlib import Path

import pytest

from common.errors import InputError
from common.preferences import split_hh, validate_preference_records

H, A = "\n\nHuman:", "\n\nAssistant:"


def one(record, **kwargs):
    data = validate_preference_records([record], "prefs.jsonl", **kwargs)
    assert len(data.records) == 1
    return data.records[0]


# --- explicit text -------------------------------------------------------------------------------------

def test_explicit_text_passes_through_with_provenance():
    data = validate_preference_records([{"prompt": "Review X.", "chosen": " Lovely.", "rejected": "Dull.",
                                         "id": 3, "score_chosen": 0.9}], "prefs.jsonl")
    assert data.format == "text" and data.dropped == 0
    assert data.records == [{"prompt": "Review X.", "chosen": " Lovely.", "rejected": "Dull.", "id": 3,
                             "score_chosen": 0.9}]


# --- Anthropic-HH transcripts --------------------------------------------------------------------------

def test_hh_single_turn():
    chosen = f"{H} What is the capital of France?{A} Paris."
    rejected = f"{H} What is the capital of France?{A} I don't know."
    r = one({"chosen": chosen, "rejected": rejected})
    assert r == {"prompt": f"{H} What is the capital of France?{A}", "chosen": " Paris.",
                 "rejected": " I don't know."}
    # Lossless: trl's RewardTrainer scores prompt + chosen, which is the original transcript.
    assert r["prompt"] + r["chosen"] == chosen and r["prompt"] + r["rejected"] == rejected


def test_hh_multi_turn_splits_at_the_last_shared_assistant_turn():
    shared = f"{H} Can you recommend a film?{A} Sure, what genre?{H} Something funny, please."
    chosen = shared + f"{A} Try 'Sunday Leagues', it is light and charming."
    rejected = shared + f"{A} No."
    r = one({"chosen": chosen, "rejected": rejected})
    assert r["prompt"] == shared + A
    assert r["chosen"] == " Try 'Sunday Leagues', it is light and charming."
    assert r["rejected"] == " No."


def test_hh_replies_sharing_their_first_words_still_split_at_the_marker():
    # The common prefix runs into the replies ("Sure, ..."), but the prompt ends at "\n\nAssistant:".
    r = one({"chosen": f"{H} Help?{A} Sure, here is how.", "rejected": f"{H} Help?{A} Sure, no."})
    assert (r["prompt"], r["chosen"], r["rejected"]) == (f"{H} Help?{A}", " Sure, here is how.", " Sure, no.")


def test_hh_without_leading_newlines_and_with_a_newline_inside_a_turn():
    chosen = f"Human: Two lines:\nline one\n\nline two{A} Got it."
    r = one({"chosen": chosen, "rejected": f"Human: Two lines:\nline one\n\nline two{A} What?"})
    assert r["prompt"] == f"Human: Two lines:\nline one\n\nline two{A}"
    assert (r["chosen"], r["rejected"]) == (" Got it.", " What?")


EARLY_CHOSEN = f"{H} Hi{A} Hello!{H} Tell me a joke{A} Why did the chicken cross the road?"
EARLY_REJECTED = f"{H} Hi{A} Hey.{H} Tell me a joke{A} No."  # differs in the first assistant reply


def test_hh_early_divergence_drop_is_the_default(caplog):
    good = {"chosen": f"{H} Hi{A} Hello!", "rejected": f"{H} Hi{A} Go away."}
    with caplog.at_level(logging.WARNING):
        data = validate_preference_records([good, {"chosen": EARLY_CHOSEN, "rejected": EARLY_REJECTED}], "hh")
    assert data.dropped == 1 and len(data.records) == 1
    assert "hh: dropped 1 of 2 rows" in caplog.text and "first: row 2" in caplog.text


def test_hh_early_divergence_keep_splits_at_the_last_shared_marker():
    r = one({"chosen": EARLY_CHOSEN, "rejected": EARLY_REJECTED}, early_divergence="keep")
    assert r["prompt"] == f"{H} Hi{A}"
    assert r["chosen"] == f" Hello!{H} Tell me a joke{A} Why did the chicken cross the road?"
    assert r["rejected"] == f" Hey.{H} Tell me a joke{A} No."


def test_hh_different_number_of_turns_is_early_divergence():
    chosen = f"{H} Hi{A} Hello!"
    rejected = f"{H} Hi{A} Hello!{H} Are you there?{A} Yes."
    r = one({"chosen": chosen, "rejected": rejected}, early_divergence="keep")
    assert (r["prompt"], r["chosen"], r["rejected"]) == (f"{H} Hi{A}", " Hello!", f" Hello!{H} Are you there?{A} Yes.")
    with pytest.raises(InputError, match="differ before their last assistant turn"):
        one({"chosen": chosen, "rejected": rejected}, early_divergence="error")


def test_hh_early_divergence_error_names_the_row_and_the_place():
    with pytest.raises(InputError, match=r"^hh: row 1: chosen and rejected differ before their last assistant "
                                         r"turn \(from character 26: 'llo!.*' vs 'y\..*'\); they must share every "
                                         r"turn but the last, or set early_divergence to drop or keep$"):
        validate_preference_records([{"chosen": EARLY_CHOSEN, "rejected": EARLY_REJECTED}], "hh",
                                    early_divergence="error")


def test_hh_keep_with_different_first_human_turns_is_an_error():
    with pytest.raises(InputError, match=r"row 1: chosen and rejected differ already in the first human turn"):
        one({"chosen": f"{H} Hi{A} Hello!", "rejected": f"{H} Bye{A} Goodbye!"}, early_divergence="keep")


@pytest.mark.parametrize(("chosen", "message"), [
    (f"Question: hi{A} Hello", r"the chosen transcript does not start with a '\\n\\nHuman:' turn \(it starts "
                               r"'Question: hi.*'\)"),
    (f"{H} Hi there", r"the chosen transcript has no '\\n\\nAssistant:' turn"),
    (f"{H} Hi{A} Hello{H} And?", r"the chosen transcript ends with a Human turn; expected it to end with the "
                                 r"assistant's reply"),
])
def test_malformed_hh_transcripts(chosen, message):
    with pytest.raises(InputError, match=r"^hh: row 1: " + message):
        validate_preference_records([{"chosen": chosen, "rejected": f"{H} Hi{A} Bye"}], "hh")
    with pytest.raises(InputError, match=message.replace("chosen", "rejected")):
        split_hh(f"{H} Hi{A} Bye", chosen)


def test_hh_empty_reply_is_an_error():
    with pytest.raises(InputError, match=r"^hh: row 1: 'chosen' is empty; remove the row or fill in the response, "
                                         r"or set data\.bad_rows: drop to leave such rows out$"):
        validate_preference_records([{"chosen": f"{H} Hi{A} ", "rejected": f"{H} Hi{A} Bye"}], "hh")


# --- conversational ------------------------------------------------------------------------------------

def msg(role, content):
    return {"role": role, "content": content}


def test_conversational_implicit_prompt_multi_turn():
    shared = [msg("system", "Be brief."), msg("user", "A film?"), msg("assistant", "Genre?"), msg("user", "Comedy")]
    data = validate_preference_records([{"chosen": [*shared, msg("assistant", "Sunday Leagues.")],
                                         "rejected": [*shared, msg("assistant", "No.")]}], "conv.jsonl")
    assert data.format == "conversational"
    assert data.records == [{"prompt": shared, "chosen": [msg("assistant", "Sunday Leagues.")],
                             "rejected": [msg("assistant", "No.")]}]


def test_conversational_early_divergence():
    chosen = [msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "Joke?"), msg("assistant", "Sure...")]
    rejected = [msg("user", "Hi"), msg("assistant", "Hey."), msg("user", "Joke?"), msg("assistant", "No.")]
    good = {"chosen": chosen, "rejected": [*chosen[:3], msg("assistant", "No.")]}
    data = validate_preference_records([good, {"chosen": chosen, "rejected": rejected}], "c")
    assert data.dropped == 1 and data.records[0]["prompt"] == chosen[:3]
    r = one({"chosen": chosen, "rejected": rejected}, early_divergence="keep")
    assert (r["prompt"], r["chosen"], r["rejected"]) == ([msg("user", "Hi")], chosen[1:], rejected[1:])
    with pytest.raises(InputError, match=r"^prefs\.jsonl: row 1: chosen and rejected differ before their last "
                                         r"assistant message \(at message 1\)"):
        one({"chosen": chosen, "rejected": rejected}, early_divergence="error")


def test_conversational_explicit_prompt_list_or_string_and_repeated_prompt_removed():
    prompt = [msg("user", "Review X.")]
    r = one({"prompt": prompt, "chosen": [msg("assistant", "Great.")], "rejected": [msg("assistant", "Bad.")]})
    assert r == {"prompt": prompt, "chosen": [msg("assistant", "Great.")], "rejected": [msg("assistant", "Bad.")]}
    # A string prompt is one user message; completions that repeat it (UltraFeedback-binarized style) lose it.
    r = one({"prompt": "Review X.", "chosen": [*prompt, msg("assistant", "Great.")],
             "rejected": [*prompt, msg("assistant", "Bad.")]})
    assert r == {"prompt": prompt, "chosen": [msg("assistant", "Great.")], "rejected": [msg("assistant", "Bad.")]}


@pytest.mark.parametrize(("record", "message"), [
    ({"prompt": "Q", "chosen": [msg("user", "Q2"), msg("assistant", "A")], "rejected": [msg("assistant", "B")]},
     r"row 1: after the prompt, 'chosen' starts with a 'user' message; expected the assistant's reply"),
    ({"chosen": [msg("user", "Q"), msg("assistant", "A"), msg("user", "?")], "rejected": [msg("user", "Q"),
                                                                                          msg("assistant", "B")]},
     r"row 1: 'chosen' ends with a 'user' message; expected it to end with the assistant's reply"),
    ({"chosen": [msg("assistant", "A")], "rejected": [msg("assistant", "B")]},
     r"row 1: no prompt messages come before the assistant's reply; add a 'prompt' field"),
    ({"chosen": [{"role": "user"}], "rejected": [msg("assistant", "B")]},
     r"row 1: chosen\[0\] must be a message \{role: str, content: str\}, got \{'role': 'user'\}"),
    ({"chosen": [], "rejected": [msg("assistant", "B")]}, r"row 1: 'chosen' must be a non-empty list of"),
    ({"prompt": "Q", "chosen": [msg("assistant", "  ")], "rejected": [msg("assistant", "B")]},
     r"row 1: 'chosen' is empty"),
    ({"prompt": "Q", "chosen": [msg("assistant", "B ")], "rejected": [msg("assistant", "B")]},
     r"row 1: chosen and rejected are the same text"),
])
def test_conversational_errors(record, message):
    with pytest.raises(InputError, match=r"^prefs\.jsonl: " + message):
        validate_preference_records([record], "prefs.jsonl")


# --- validation messages -------------------------------------------------------------------------------

GOOD = {"prompt": "Review X.", "chosen": "Lovely.", "rejected": "Dull."}


@pytest.mark.parametrize(("bad", "message"), [
    ({"prompt": "Review X.", "rejected": "Dull."}, r"row 2: missing 'chosen'; expected explicit prompt/chosen/"
                                                   r"rejected text, .* \(map other column names with data\.fields\)$"),
    ({"prompt": "Review X.", "chosen": "Lovely.", "rejected": None}, r"row 2: missing 'rejected'"),
    ({"prompt": "Review X.", "chosen": "", "rejected": "Dull."}, r"row 2: 'chosen' is empty; remove the row or "
                                                                 r"fill in the response, or set data\.bad_rows: drop"),
    ({"prompt": "Review X.", "chosen": "Lovely.", "rejected": " \n"}, r"row 2: 'rejected' is empty"),
    ({"prompt": "Review X.", "chosen": "Same.", "rejected": " Same.\n"}, r"row 2: chosen and rejected are the "
                                                                         r"same text, which teaches no preference"),
    ({"prompt": " ", "chosen": "Lovely.", "rejected": "Dull."}, r"row 2: the prompt is empty"),
    ({"chosen": "Lovely.", "rejected": "Dull."}, r"row 2: missing 'prompt', and chosen / rejected are not "
                                                 r"Human/Assistant transcripts; add a prompt field"),
    ({"prompt": ["Review X."], "chosen": "Lovely.", "rejected": "Dull."}, r"row 2: 'prompt' is a list but "
                                                                          r"chosen / rejected are text"),
    ({"prompt": "Q", "chosen": "Lovely.", "rejected": [msg("assistant", "Dull.")]},
     r"row 2: chosen is str and rejected is list; both must be text or both lists"),
    ({"prompt": "Q", "chosen": [msg("assistant", "A")], "rejected": [msg("assistant", "B")]},
     r"row 2: is conversational but row 1 is text; one source must use one shape"),
    ("not a record", r"row 2: expected a mapping with chosen and rejected, got str$"),
])
def test_bad_rows_name_file_and_row(bad, message):
    with pytest.raises(InputError, match=r"^data/prefs\.jsonl: " + message) as e:
        validate_preference_records([GOOD, bad], "data/prefs.jsonl")
    assert "\n" not in str(e.value)


def test_row_numbers_are_used_when_given():
    with pytest.raises(InputError, match=r"^prefs\.jsonl: row 7: 'chosen' is empty"):
        validate_preference_records([GOOD, {**GOOD, "chosen": ""}], "prefs.jsonl", row_numbers=[5, 7])


def test_empty_sources_and_bad_option():
    with pytest.raises(InputError, match=r"^prefs\.jsonl: no preference records; expected rows of"):
        validate_preference_records([], "prefs.jsonl")
    with pytest.raises(InputError, match=r"^hh: no usable preference records \(all 1 differ before the last "
                                         r"assistant turn\); set early_divergence: keep to split them there$"):
        validate_preference_records([{"chosen": EARLY_CHOSEN, "rejected": EARLY_REJECTED}], "hh")
    with pytest.raises(InputError, match=r"early_divergence must be one of drop, keep, error, got 'skip'"):
        validate_preference_records([GOOD], "prefs.jsonl", early_divergence="skip")


# --- the sentiment task's prompt files -----------------------------------------------------------------

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "recipes" / "data" / "sentiment"


def load_generator():
    spec = importlib.util.spec_from_file_location("make_prompts", PROMPTS_DIR / "make_prompts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prompt_files_match_their_generator(tmp_path):
    make_prompts = load_generator()
    assert make_prompts.main(["--check"]) == 0, "run recipes/data/sentiment/make_prompts.py"
    assert make_prompts.main(["--out", str(tmp_path)]) == 0
    for name in ("prompts_train.jsonl", "prompts_heldout.jsonl"):
        assert (tmp_path / name).read_bytes() == (PROMPTS_DIR / name).read_bytes()


def test_prompt_split_sizes_and_no_film_in_both():
    rows = {s: [json.loads(line) for line in (PROMPTS_DIR / f"prompts_{s}.jsonl").read_text().splitlines()]
            for s in ("train", "heldout")}
    assert (len(rows["train"]), len(rows["heldout"])) == (200, 40)
    assert not {r["title"] for r in rows["train"]} & {r["title"] for r in rows["heldout"]}
    every = rows["train"] + rows["heldout"]
    assert len({r["prompt"] for r in every}) == len({r["id"] for r in every}) == 240
