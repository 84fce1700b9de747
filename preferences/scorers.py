"""Gold scorers: programs that map (prompt, completion) to a float, the "true" reward of a task.

The preference-data stage labels pairs of sampled completions with a gold scorer, the reward model learns
to imitate it, and the eval stage reports it for every model. A scorer scores a batch at once:

    scorer = build_scorer({"sum": [{"scorer": "vader"}, {"scorer": "length", "unit": "words", "weight": -0.01}]})
    scorer.score(prompts, completions)   # -> list[float], one per pair
    scorer(prompt, completion)           # -> float, one pair

Spec format (what a recipe writes under e.g. `stages.prefs.scorer`)
--------------------------------------------------------------------
A spec is a scorer name (`vader`), or a mapping with a `scorer` key and that scorer's keys, or a mapping
with a `sum` list of specs. Any spec may carry `weight` (a number, default 1.0) that multiplies its score,
so a weighted sum is a `sum` whose items carry weights. Sums nest.

    scorer: vader                                  # VADER compound sentiment of the completion, in [-1, 1]
    scorer: {scorer: length, unit: words}          # len(completion.split()); unit: chars (default) = len()
    scorer: {scorer: regex, pattern: "!", cap: 5, normalize: cap}     # min(#matches, 5) / 5
    scorer: {scorer: keywords, words: [superb, moving], normalize: words}
    scorer: {scorer: python, function: "mypkg.rewards:politeness", kwargs: {strict: true}}
    scorer:
      sum:
        - {scorer: vader, weight: 1.0}
        - {scorer: length, unit: words, weight: -0.01}

Keys per scorer (all score the completion only, except `python`, which also sees the prompt):

- `vader`: no keys. The compound score of vaderSentiment's `SentimentIntensityAnalyzer` (Hutto & Gilbert,
  ICWSM 2014): the sum of the valences of the sentiment words, squashed by x / sqrt(x^2 + 15).
- `length`: `unit` = `chars` (the default: `len(completion)`) or `words` (whitespace-separated tokens).
- `regex`: `pattern` (required; Python `re` syntax), `ignore_case` (default false), `cap` (a positive number:
  the count is clipped to it), `normalize` = `none` (default) | `cap` (divide by `cap`, so the score is in
  [0, 1]; needs `cap`) | `words` (matches per word) | `chars` (matches per character). The count is that
  of `re.findall` (non-overlapping matches); empty completions score 0 under `words` / `chars`.
- `keywords`: `words` (required, a list of words or phrases), `cap` and `normalize` as for `regex`. Each
  keyword's occurrences are counted case-insensitively as whole words (not inside a longer word:
  `great` does not match `greatest`) and the counts are summed, so a completion mentioning "great" twice
  and "moving" once scores 3.
- `python`: `function` = "module:function" (required; `module` must be importable - installed or on
  PYTHONPATH - and `function` may be dotted, e.g. "mod:Class.method"), `batched` (default false) and
  `kwargs` (a mapping passed as keyword arguments on every call). With `batched: false` the function is
  called once per example as `fn(prompt, completion, **kwargs) -> float`; with `batched: true` once per batch
  as `fn(prompts: list[str], completions: list[str], **kwargs) -> sequence of floats` of the same length.
  Returned values must be finite numbers (bools count as 0 / 1). Exceptions the function raises propagate
  unchanged, so its own traceback shows.

`build_scorer` checks the whole spec when the recipe loads: unknown scorer names (with the closest match),
unknown keys, wrong types, regexes that do not compile, and python functions that do not import, are not
callable or cannot take the arguments they will get, all raise `InputError` naming the key path.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from common.errors import InputError
from common.schema import check_value, unknown_key_error

Normalize = Literal["none", "cap", "words", "chars"]


class Scorer:
    """Base class. Subclasses implement `score`; `spec` is the normalised spec (defaults filled in), which is
    JSON-ready and deterministic, so it can go into a manifest or a stage hash."""

    spec: dict[str, Any]

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        raise NotImplementedError

    def __call__(self, prompt: str, completion: str) -> float:
        return self.score([prompt], [completion])[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec})"


def _check_batch(prompts: Sequence[str], completions: Sequence[str]) -> None:
    # A programming error rather than user input: the caller pairs prompts with completions.
    if len(prompts) != len(completions):
        raise ValueError(f"score() got {len(prompts)} prompts but {len(completions)} completions")


@functools.cache
def _vader_analyzer():
    # Built once per process: it reads the ~7,500-word lexicon and the emoji table from disk.
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


class VaderScorer(Scorer):
    """VADER compound sentiment of the completion, in [-1, 1]; the default task's gold reward."""

    def __init__(self):
        self.spec = {"scorer": "vader"}

    def score(self, prompts, completions):
        _check_batch(prompts, completions)
        analyzer = _vader_analyzer()
        return [float(analyzer.polarity_scores(c)["compound"]) for c in completions]


class LengthScorer(Scorer):
    """Length of the completion in characters (`len`) or words (`len(str.split())`)."""

    def __init__(self, unit: Literal["chars", "words"] = "chars"):
        self.unit = unit
        self.spec = {"scorer": "length", "unit": unit}

    def score(self, prompts, completions):
        _check_batch(prompts, completions)
        if self.unit == "words":
            return [float(len(c.split())) for c in completions]
        return [float(len(c)) for c in completions]


class _CountScorer(Scorer):
    """Shared by `regex` and `keywords`: a match count, then the optional cap and normalisation."""

    def __init__(self, cap: float | None, normalize: Normalize):
        self.cap = cap
        self.normalize = normalize

    def _count(self, completion: str) -> int:
        raise NotImplementedError

    def _finish(self, count: float, completion: str) -> float:
        if self.cap is not None:
            count = min(count, self.cap)
        if self.normalize == "cap":
            return float(count / self.cap)
        if self.normalize == "words":
            n = len(completion.split())
            return float(count / n) if n else 0.0
        if self.normalize == "chars":
            return float(count / len(completion)) if completion else 0.0
        return float(count)

    def score(self, prompts, completions):
        _check_batch(prompts, completions)
        return [self._finish(self._count(c), c) for c in completions]


class RegexScorer(_CountScorer):
    """Number of non-overlapping matches of `pattern` in the completion."""

    def __init__(self, pattern: str, ignore_case: bool = False, cap: float | None = None,
                 normalize: Normalize = "none"):
        super().__init__(cap, normalize)
        self.regex = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
        self.spec = {"scorer": "regex", "pattern": pattern, "ignore_case": ignore_case, "cap": cap,
                     "normalize": normalize}

    def _count(self, completion):
        return sum(1 for _ in self.regex.finditer(completion))


class KeywordsScorer(_CountScorer):
    """Summed case-insensitive whole-word occurrences of each keyword in the completion."""

    def __init__(self, words: Sequence[str], cap: float | None = None, normalize: Normalize = "none"):
        super().__init__(cap, normalize)
        # Lookarounds rather than \b, so keywords that begin or end with a non-word character ("c++",
        # "5/5") still only match as whole words.
        self.regexes = [re.compile(rf"(?<!\w){re.escape(w)}(?!\w)", re.IGNORECASE) for w in words]
        self.spec = {"scorer": "keywords", "words": list(words), "cap": cap, "normalize": normalize}

    def _count(self, completion):
        return sum(sum(1 for _ in r.finditer(completion)) for r in self.regexes)


class PythonScorer(Scorer):
    """A user's function, per example `fn(prompt, completion, **kwargs)` or batched
    `fn(prompts, completions, **kwargs)`; see the module docstring."""

    def __init__(self, function: str, fn: Callable, batched: bool = False, kwargs: Mapping | None = None,
                 where: str = "scorer", source: str = "recipe"):
        self.function = function
        self.fn = fn
        self.batched = batched
        self.kwargs = dict(kwargs or {})
        self.where, self.source = where, source
        self.spec = {"scorer": "python", "function": function, "batched": batched, "kwargs": self.kwargs}

    def _as_float(self, value: Any, index: int) -> float:
        bad = isinstance(value, str | bytes)
        if not bad:
            try:
                out = float(value)
            except (TypeError, ValueError):
                bad = True
        if bad or not math.isfinite(out):
            raise InputError(f"{self.source}: {self.where}.function: '{self.function}' returned {value!r} "
                             f"({type(value).__name__}) for example {index}; a scorer must return a finite "
                             "number: fix the function")
        return out

    def score(self, prompts, completions):
        _check_batch(prompts, completions)
        if not self.batched:
            return [self._as_float(self.fn(p, c, **self.kwargs), i)
                    for i, (p, c) in enumerate(zip(prompts, completions, strict=True))]
        out = self.fn(list(prompts), list(completions), **self.kwargs)
        try:
            n = len(out)
        except TypeError:
            n = None
        if n != len(prompts):
            got = f"{n} values" if n is not None else f"a {type(out).__name__}"
            raise InputError(f"{self.source}: {self.where}.function: batched '{self.function}' returned {got} "
                             f"for {len(prompts)} examples; it must return one number per example (or set "
                             "batched: false if it scores one example at a time)")
        return [self._as_float(v, i) for i, v in enumerate(out)]


class WeightedSum(Scorer):
    """sum_i weight_i * scorer_i(prompt, completion)."""

    def __init__(self, terms: Sequence[tuple[float, Scorer]]):
        self.terms = list(terms)
        self.spec = {"sum": [{**s.spec, "weight": w} for w, s in self.terms]}

    def score(self, prompts, completions):
        _check_batch(prompts, completions)
        total = [0.0] * len(prompts)
        for weight, scorer in self.terms:
            for i, s in enumerate(scorer.score(prompts, completions)):
                total[i] += weight * s
        return total


# --- building from a spec ---------------------------------------------------------------------------

# name -> {key: annotation}. The annotations are checked with the recipe schema's own `check_value`, so
# scorer keys follow the same typing rules as every other recipe key (e.g. `1e-2` read as a string is a float).
_KEYS: dict[str, dict[str, Any]] = {
    "vader": {},
    "length": {"unit": Literal["chars", "words"]},
    "regex": {"pattern": str, "ignore_case": bool, "cap": float | None, "normalize": Normalize | None},
    "keywords": {"words": list[str], "cap": float | None, "normalize": Normalize | None},
    "python": {"function": str, "batched": bool, "kwargs": dict[str, Any]},
}
_REQUIRED = {"regex": ("pattern",), "keywords": ("words",), "python": ("function",)}
SCORER_NAMES = sorted(_KEYS)


def build_scorer(spec: Any, where: str = "stages.prefs.scorer", source: str = "recipe") -> Scorer:
    """Build a scorer from a spec (see the module docstring), checking all of it now.

    `where` is the spec's key path and `source` the file it came from; both go into error messages.
    """
    weight, scorer = _build(spec, where, source)
    return scorer if weight == 1.0 else WeightedSum([(weight, scorer)])


def _err(source: str, where: str, msg: str) -> InputError:
    return InputError(f"{source}: {where}: {msg}")


def _build(spec: Any, where: str, source: str) -> tuple[float, Scorer]:
    if isinstance(spec, str):
        spec = {"scorer": spec}
    if not isinstance(spec, Mapping):
        raise _err(source, where, f"expected a scorer name or a mapping like {{scorer: vader}} or "
                                  f"{{sum: [...]}}, got {type(spec).__name__} {spec!r}")
    spec = dict(spec)
    given_keys = ", ".join(map(str, spec)) or "none"
    weight = 1.0
    if "weight" in spec:
        weight = check_value(spec.pop("weight"), float, f"{where}.weight", source)
        if not math.isfinite(weight):
            raise _err(source, f"{where}.weight", f"must be a finite number, got {weight}")

    if "sum" in spec:
        if "scorer" in spec:
            raise _err(source, where, "has both 'scorer' and 'sum'; use {scorer: NAME, ...} for one scorer or "
                                      "{sum: [spec, ...]} for a weighted sum, not both")
        for key in spec:
            if key != "sum":
                raise unknown_key_error(str(key), ["sum", "weight"], where, source)
        items = spec["sum"]
        if not isinstance(items, list) or not items:
            raise _err(source, f"{where}.sum", f"expected a non-empty list of scorer specs, got {items!r}")
        terms = [_build(item, f"{where}.sum[{i}]", source) for i, item in enumerate(items)]
        return weight, WeightedSum(terms)

    if "scorer" not in spec:
        raise _err(source, where, f"expected a 'scorer' key (one of {', '.join(SCORER_NAMES)}) or a 'sum' "
                                  f"list, got keys: {given_keys}")
    name = spec.pop("scorer")
    if name not in _KEYS:
        close = difflib.get_close_matches(str(name), SCORER_NAMES, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise _err(source, f"{where}.scorer", f"unknown scorer {name!r}; {hint}expected one of "
                                              f"{', '.join(SCORER_NAMES)}")
    allowed = _KEYS[name]
    for key in spec:
        if key not in allowed:
            raise unknown_key_error(str(key), ["scorer", "weight", *allowed], where, source)
    for key in _REQUIRED.get(name, ()):
        if key not in spec:
            raise _err(source, where, f"scorer '{name}' needs a '{key}' key; add it")
    args = {k: check_value(v, allowed[k], f"{where}.{k}", source) for k, v in spec.items()}
    return weight, _LEAF_BUILDERS[name](args, where, source)


def _count_args(args: dict, where: str, source: str) -> dict:
    cap, normalize = args.get("cap"), args.get("normalize") or "none"
    if cap is not None and not (math.isfinite(cap) and cap > 0):
        raise _err(source, f"{where}.cap", f"must be a positive number, got {cap}")
    if normalize == "cap" and cap is None:
        raise _err(source, f"{where}.normalize", "'cap' divides by cap, but no cap is set; add cap: N or "
                                                 "choose normalize: none | words | chars")
    return {"cap": cap, "normalize": normalize}


def _build_regex(args, where, source):
    pattern = args["pattern"]
    if pattern == "":
        raise _err(source, f"{where}.pattern", "is empty (it would match everywhere); give a pattern")
    try:
        re.compile(pattern)
    except re.error as e:
        raise _err(source, f"{where}.pattern", f"{pattern!r} is not a valid regular expression ({e}); "
                                               "fix it (Python re syntax; quote it in YAML)") from None
    return RegexScorer(pattern, ignore_case=args.get("ignore_case", False), **_count_args(args, where, source))


def _build_keywords(args, where, source):
    words = args["words"]
    if not words:
        raise _err(source, f"{where}.words", "is empty; list at least one word")
    seen: dict[str, int] = {}
    for i, w in enumerate(words):
        if not w.strip():
            raise _err(source, f"{where}.words[{i}]", "is blank; remove it or give a word")
        if w.strip().lower() in seen:
            raise _err(source, f"{where}.words[{i}]", f"{w!r} repeats words[{seen[w.strip().lower()]}] "
                                                      "(keywords are case-insensitive); remove one")
        seen[w.strip().lower()] = i
    return KeywordsScorer([w.strip() for w in words], **_count_args(args, where, source))


def _build_python(args, where, source):
    path, batched, kwargs = args["function"], args.get("batched", False), args.get("kwargs") or {}
    key = f"{where}.function"
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name.strip() or not attr.strip():
        raise _err(source, key, f"expected 'module:function' (e.g. 'mypkg.rewards:politeness'), got {path!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or anything the user's module raises while importing
        raise _err(source, key, f"cannot import module '{module_name}' ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}); install it or put its folder "
                                "on PYTHONPATH") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise _err(source, key, f"module '{module_name}' has no attribute '{attr}'; check the name "
                                    "after the ':'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise _err(source, key, f"'{path}' is not callable (it is {type(obj).__name__} {obj!r:.40}); point "
                                "it at a function")
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # some builtins have no signature: nothing to check
        signature = None
    if signature is not None:
        try:
            signature.bind([] if batched else "", [] if batched else "", **kwargs)
        except TypeError as e:
            shape = "(prompts, completions" if batched else "(prompt, completion"
            extra = ", " + ", ".join(f"{k}=..." for k in kwargs) if kwargs else ""
            raise _err(source, key, f"'{path}' cannot be called as fn{shape}{extra}) ({e}); change its "
                                    "signature, or the kwargs / batched keys") from None
    return PythonScorer(path, obj, batched=batched, kwargs=kwargs, where=where, source=source)


_LEAF_BUILDERS: dict[str, Callable[[dict, str, str], Scorer]] = {
    "vader": lambda args, where, source: VaderScorer(),
    "length": lambda args, where, source: LengthScorer(args.get("unit", "chars")),
    "regex": _build_regex,
    "keywords": _build_keywords,
    "python": _build_python,
}
