"""Judge prompt templates: the project's defaults in `templates/`, or a file the recipe names.

Two syntaxes, chosen by the file name:
- `*.j2`: a jinja2 template (StrictUndefined, so a misspelt variable is an error, not an empty string);
- anything else: plain text where `{prompt}`, `{answer_a}` ... are replaced by the values. Only
  `{identifier}` is a placeholder, so other braces (JSON examples in a rubric) stay as written.

A template renders the judge's *user message*; the backend wraps it in the chat template. The hash of
the template's text is part of every cache key, so editing a template never reuses stale judgements.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from common.errors import InputError

TEMPLATE_DIR = Path(__file__).parent / "templates"

# What each protocol fills in, and what its template must use.
KIND_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # kind: (required placeholders, allowed placeholders)
    "pairwise": (frozenset({"prompt", "answer_a", "answer_b"}), frozenset({"prompt", "answer_a", "answer_b"})),
    "single": (frozenset({"prompt", "answer"}), frozenset({"prompt", "answer"})),
    "single_reference": (
        frozenset({"prompt", "answer", "reference"}),
        frozenset({"prompt", "answer", "reference"}),
    ),
}
DEFAULT_FILES = {kind: TEMPLATE_DIR / f"{kind}.txt" for kind in KIND_FIELDS}

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class JudgeTemplate:
    kind: str
    text: str
    source: str  # the file it came from, for error messages
    is_jinja: bool = False

    @property
    def hash(self) -> str:
        """Stable identity of the template's content (and syntax) for cache keys."""
        h = hashlib.sha256(f"{self.kind}\0{int(self.is_jinja)}\0{self.text}".encode())
        return h.hexdigest()[:16]

    def render(self, **fields: str) -> str:
        if self.is_jinja:
            return _jinja_env().from_string(self.text).render(**fields)
        return _PLACEHOLDER.sub(lambda m: str(fields[m.group(1)]) if m.group(1) in fields else m.group(0),
                                self.text)


def _jinja_env():
    import jinja2

    return jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)


def _placeholders(text: str, is_jinja: bool, source: str) -> set[str]:
    if not is_jinja:
        return set(_PLACEHOLDER.findall(text))
    import jinja2
    from jinja2 import meta

    try:
        ast = _jinja_env().parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise InputError(
            f"{source}: line {exc.lineno}: jinja2 syntax error ({exc.message}); fix the template"
        ) from None
    return set(meta.find_undeclared_variables(ast))


def load_template(kind: str, path: str | Path | None = None) -> JudgeTemplate:
    """The template for `kind` ("pairwise", "single", "single_reference") from `path`, or the default."""
    if kind not in KIND_FIELDS:
        raise ValueError(f"unknown template kind {kind!r}; expected one of {sorted(KIND_FIELDS)}")
    file = Path(path) if path is not None else DEFAULT_FILES[kind]
    if not file.is_file():
        raise InputError(
            f"{file}: judge template for '{kind}' not found; give an existing .txt or .j2 file, "
            f"or leave the key unset to use the default"
        )
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{file}: judge template is not UTF-8 text; save it as UTF-8") from None
    is_jinja = file.suffix == ".j2"
    required, allowed = KIND_FIELDS[kind]
    used = _placeholders(text, is_jinja, str(file))
    unknown = used - allowed
    if unknown:
        raise InputError(
            f"{file}: unknown placeholder(s) {sorted(unknown)} in the '{kind}' judge template; "
            f"allowed are {sorted(allowed)}"
        )
    missing = required - used
    if missing:
        raise InputError(
            f"{file}: the '{kind}' judge template must use {sorted('{' + m + '}' for m in missing)}; "
            f"add them where the values belong"
        )
    return JudgeTemplate(kind=kind, text=text, source=str(file), is_jinja=is_jinja)
