"""Prompt text for multiple-choice scoring, byte-for-byte the prompts of lm-evaluation-harness.

Letter mode is lm-eval's default `mmlu` task (lm_eval/tasks/mmlu/default/_default_template_yaml and the
per-subject yaml files, lm-eval 0.4.13):

    description: "The following are multiple choice questions (with answers) about {subject}.\\n\\n"
    doc_to_text: "{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\n...\\nAnswer:"
    doc_to_choice: ["A", "B", ...]; target_delimiter " "; fewshot_delimiter "\\n\\n"; sampler first_n

so a k-shot context is the description, then k dev examples each followed by " <letter>\\n\\n", then the
question; the continuations are " A", " B", ... (the subject's "_" become spaces, as lm-eval's task
generator writes them).

Cloze mode is lm-eval's `mmlu_continuation` task: description "The following are questions (with answers)
about {subject}.\\n\\n", doc_to_text "Question: {{question.strip()}}\\nAnswer:", the continuations are
" " + each choice's text.

With `chat_template=True` we do what lm-eval's `--apply_chat_template` does (api/task.py
`fewshot_context`, `build_qa_turn`; api/utils.py `multiturn_to_singleturn`): the description is the system
message; each few-shot example is a user turn (its question) and an assistant turn (its answer), as lm-eval
0.4.13 does by default (fewshot_as_multiturn, auto-enabled with a chat template), or with
`fewshot_as_multiturn=False` the examples and the question are one user message; the template's generation
prompt is added, and the target delimiter becomes "" (the continuations are "A", "B", ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from common.errors import InputError
from eval.mc.data import LETTERS, MCQuestion

MODES = ("letter", "cloze")
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


@dataclass(frozen=True)
class MCPrompt:
    """The text before the answer and the text of each choice's continuation."""

    context: str
    continuations: tuple[str, ...]


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise InputError(f"mc mode: expected one of {', '.join(MODES)}, got {mode!r}; set mode to 'letter' or 'cloze'")


def letters(n: int) -> tuple[str, ...]:
    if n > len(LETTERS):
        raise InputError(f"a question has {n} choices; letter mode labels at most {len(LETTERS)} (A-Z); "
                         "use mode 'cloze' or fewer choices")
    return tuple(LETTERS[:n])


def subject_words(subject: str) -> str:
    """"high_school_biology" -> "high school biology" (lm-eval: `" ".join(subject.split("_"))`)."""
    return " ".join(subject.split("_"))


def description(subject: str, mode: str) -> str:
    """The header line lm-eval calls the task description. With no subject the "about ..." is left out."""
    what = "multiple choice questions" if mode == "letter" else "questions"
    about = f" about {subject_words(subject)}" if subject else ""
    return f"The following are {what} (with answers){about}.{FEWSHOT_DELIMITER}"


def question_text(q: MCQuestion, mode: str) -> str:
    """lm-eval's doc_to_text: the question (stripped), then in letter mode the options and "Answer:"."""
    if mode == "letter":
        options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(letters(len(q.choices)), q.choices,
                                                                           strict=True))
        return f"{q.question.strip()}{options}\nAnswer:"
    return f"Question: {q.question.strip()}\nAnswer:"


def choice_texts(q: MCQuestion, mode: str) -> tuple[str, ...]:
    """lm-eval's doc_to_choice: the letters in letter mode, the answer texts in cloze mode."""
    return letters(len(q.choices)) if mode == "letter" else q.choices


def example_text(q: MCQuestion, mode: str) -> str:
    """One few-shot example with its answer and the few-shot delimiter."""
    return question_text(q, mode) + TARGET_DELIMITER + choice_texts(q, mode)[q.answer] + FEWSHOT_DELIMITER


def build_prompt(q: MCQuestion, shots: Sequence[MCQuestion] = (), mode: str = "letter",
                 chat_template: bool = False, tokenizer=None, fewshot_as_multiturn: bool = True) -> MCPrompt:
    """The context and continuations for one question, after `shots` worked examples from the dev split."""
    check_mode(mode)
    header = description(q.subject, mode)
    options = choice_texts(q, mode)
    if not chat_template:
        body = "".join(example_text(s, mode) for s in shots) + question_text(q, mode)
        return MCPrompt(header + body, tuple(TARGET_DELIMITER + o for o in options))
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise InputError("mc chat_template: the tokenizer has no chat template; set chat_template to false "
                         "for base models")
    if fewshot_as_multiturn:
        turns = []
        for s in shots:
            turns += [{"role": "user", "content": question_text(s, mode)},
                      {"role": "assistant", "content": choice_texts(s, mode)[s.answer]}]
        turns.append({"role": "user", "content": question_text(q, mode)})
    else:
        body = "".join(example_text(s, mode) for s in shots) + question_text(q, mode)
        turns = [{"role": "user", "content": body}]
    return MCPrompt(apply_chat(tokenizer, header, turns), tuple(options))


def apply_chat(tokenizer, system: str, turns: list[dict[str, str]]) -> str:
    """Render the system message and turns with the generation prompt, as lm-eval's
    HFLM.apply_chat_template does."""
    import jinja2

    messages = [{"role": "system", "content": system}, *turns]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except jinja2.exceptions.TemplateError:
        # Templates without a system role (Gemma's) raise. lm-eval then drops the system message and with it
        # the subject line; we keep the subject by moving the description into the first user message.
        first = {"role": "user", "content": system + turns[0]["content"]}
        return tokenizer.apply_chat_template([first, *turns[1:]], tokenize=False, add_generation_prompt=True)
