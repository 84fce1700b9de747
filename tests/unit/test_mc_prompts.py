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


# --- more than four options: the mmlu template with one "\nX. choice" line per option, letters A-J -------------

def test_letter_prompts_with_two_five_and_ten_options():
    two = build_prompt(MCQuestion("Is it?", ("yes", "no"), 0, "logic"), (), "letter")
    assert two.context == ("The following are multiple choice questions (with answers) about logic.\n\n"
                           "Is it?\nA. yes\nB. no\nAnswer:")
    assert two.continuations == (" A", " B")
    five = build_prompt(MCQuestion("Pick one", ("1", "2", "3", "4", "5"), 4, ""), (), "letter")
    assert five.context == ("The following are multiple choice questions (with answers).\n\n"
                            "Pick one\nA. 1\nB. 2\nC. 3\nD. 4\nE. 5\nAnswer:")
    assert five.continuations == (" A", " B", " C", " D", " E")
    ten_q = MCQuestion("Which is prime?", tuple(str(n) for n in range(20, 30)), 9, "number_theory")
    ten = build_prompt(ten_q, (MCQuestion("Even?", tuple(str(n) for n in range(1, 11)), 1, "number_theory"),),
                       "letter")
    assert ten.context == (
        "The following are multiple choice questions (with answers) about number theory.\n\n"
        "Even?\nA. 1\nB. 2\nC. 3\nD. 4\nE. 5\nF. 6\nG. 7\nH. 8\nI. 9\nJ. 10\nAnswer: B\n\n"
        "Which is prime?\nA. 20\nB. 21\nC. 22\nD. 23\nE. 24\nF. 25\nG. 26\nH. 27\nI. 28\nJ. 29\nAnswer:")
    assert ten.continuations == tuple(f" {letter}" for letter in "ABCDEFGHIJ")
    cloze = build_prompt(ten_q, (), "cloze")
    assert cloze.context.endswith("Question: Which is prime?\nAnswer:") and cloze.continuations[9] == " 29"


def test_the_parity_benchmarks_lm_eval_task_renders_our_prompts_for_2_4_5_and_10_options():
    """benchmarks/mc_vs_lm_eval.py gives lm-eval a looped mmlu template; rendered the way lm-eval renders task
    templates (lm_eval/utils.py apply_template: jinja2, StrictUndefined, keep_trailing_newline; a string
    doc_to_choice read back with ast.literal_eval), it must give our context and continuations byte for byte."""
    import ast
    import importlib.util
    from pathlib import Path

    import jinja2

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "mc_vs_lm_eval.py"
    spec = importlib.util.spec_from_file_location("mc_vs_lm_eval", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    env = jinja2.Environment(loader=jinja2.BaseLoader(), undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    template = bench.LETTER_TEMPLATE
    for n in (2, 4, 5, 10):
        q = MCQuestion(f" Question with {n} options? ", tuple(f"option {i}" for i in range(n)), n - 1, "some_subject")
        doc = {"question": q.question, "choices": list(q.choices), "answer": q.answer}
        text = env.from_string(template["doc_to_text"]).render(**doc)
        choices = ast.literal_eval(env.from_string(template["doc_to_choice"]).render(**doc))
        ours = build_prompt(q, (), "letter")
        assert ours.context == description(q.subject, "letter") + text
        assert ours.continuations == tuple(" " + c for c in choices)  # lm-eval's target_delimiter " "
