"""Prompt text byte-for-byte against strings written by hand from lm-eval's mmlu templates."""

import pytest

from common.errors import InputError
from common.tiny import build_tiny_tokenizer
from eval.mc.data import MCQuestion
from eval.mc.prompts import build_prompt, description, subject_words

Q = MCQuestion("  What is 2 + 2? ", ("3", "4", "5", "6"), 1, "elementary_mathematics")
DEV = [
    MCQuestion("What is 1 + 1?", ("2", "3", "4", "5"), 0, "elementary_mathematics"),
    MCQuestion("What is 3 - 1?\n", ("1", "2", "3", "4"), 1, "elementary_mathematics"),
]


def test_letter_zero_shot():
    p = build_prompt(Q, (), "letter")
    assert p.context == (
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
        "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
    )
    assert p.continuations == (" A", " B", " C", " D")


def test_letter_two_shot():
    p = build_prompt(Q, DEV, "letter")
    assert p.context == (
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
        "What is 1 + 1?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer: A\n\n"
        "What is 3 - 1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
    )
    assert p.continuations == (" A", " B", " C", " D")


def test_cloze_zero_and_two_shot():
    p0 = build_prompt(Q, (), "cloze")
    assert p0.context == ("The following are questions (with answers) about elementary mathematics.\n\n"
                          "Question: What is 2 + 2?\nAnswer:")
    assert p0.continuations == (" 3", " 4", " 5", " 6")
    p2 = build_prompt(Q, DEV, "cloze")
    assert p2.context == (
        "The following are questions (with answers) about elementary mathematics.\n\n"
        "Question: What is 1 + 1?\nAnswer: 2\n\n"
        "Question: What is 3 - 1?\nAnswer: 2\n\n"
        "Question: What is 2 + 2?\nAnswer:"
    )


def test_chat_template_zero_and_two_shot():
    tok = build_tiny_tokenizer()  # ChatML
    p = build_prompt(Q, (), "letter", chat_template=True, tokenizer=tok)
    assert p.context == (
        "<|im_start|>system\nThe following are multiple choice questions (with answers) about elementary "
        "mathematics.\n\n<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # lm-eval drops the target delimiter under a chat template.
    assert p.continuations == ("A", "B", "C", "D")
    # lm-eval 0.4.13 turns on fewshot_as_multiturn with a chat template: one user/assistant pair per example.
    p2 = build_prompt(Q, DEV, "letter", chat_template=True, tokenizer=tok)
    assert p2.context == (
        "<|im_start|>system\nThe following are multiple choice questions (with answers) about elementary "
        "mathematics.\n\n<|im_end|>\n"
        "<|im_start|>user\nWhat is 1 + 1?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer:<|im_end|>\n"
        "<|im_start|>assistant\nA<|im_end|>\n"
        "<|im_start|>user\nWhat is 3 - 1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:<|im_end|>\n"
        "<|im_start|>assistant\nB<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # fewshot_as_multiturn=False: lm-eval's multiturn_to_singleturn, examples and question in one user turn.
    p3 = build_prompt(Q, DEV[:1], "cloze", chat_template=True, tokenizer=tok, fewshot_as_multiturn=False)
    assert p3.context == (
        "<|im_start|>system\nThe following are questions (with answers) about elementary mathematics.\n\n<|im_end|>\n"
        "<|im_start|>user\nQuestion: What is 1 + 1?\nAnswer: 2\n\nQuestion: What is 2 + 2?\nAnswer:<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert p3.continuations == ("3", "4", "5", "6")


def test_any_number_of_choices_and_no_subject():
    q = MCQuestion("Yes or no?", ("yes", "no"), 0, "")
    p = build_prompt(q, (), "letter")
    assert p.context == ("The following are multiple choice questions (with answers).\n\n"
                         "Yes or no?\nA. yes\nB. no\nAnswer:")
    assert p.continuations == (" A", " B")
    five = MCQuestion("Pick", ("a", "b", "c", "d", "e"), 4, "x")
    assert build_prompt(five, (), "letter").context.endswith("D. d\nE. e\nAnswer:")


def test_subject_words_and_description():
    assert subject_words("high_school_us_history") == "high school us history"
    expected = "The following are multiple choice questions (with answers) about anatomy.\n\n"
    assert description("anatomy", "letter") == expected


def test_bad_mode_and_too_many_letters():
    with pytest.raises(InputError, match="mode"):
        build_prompt(Q, (), "essay")
    many = MCQuestion("?", tuple(str(i) for i in range(27)), 0, "x")
    with pytest.raises(InputError, match="27 choices"):
        build_prompt(many, (), "letter")
    assert len(build_prompt(many, (), "cloze").continuations) == 27


def test_chat_template_needs_a_template():
    tok = build_tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(InputError, match="chat template"):
        build_prompt(Q, (), "letter", chat_template=True, tokenizer=tok)
