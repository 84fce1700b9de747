"""Gold scorers on hand-checked examples, weighted sums, and every load-time error."""

import math
import sys

import pytest

from common.errors import InputError
from preferences.scorers import (
    KeywordsScorer,
    LengthScorer,
    RegexScorer,
    VaderScorer,
    WeightedSum,
    build_scorer,
)


def vader_compound(total_valence: float) -> float:
    """VADER's normalisation of the summed word valences, x / sqrt(x^2 + alpha) with alpha = 15
    (vaderSentiment.normalize; Hutto & Gilbert 2014), rounded to 4 places as polarity_scores does."""
    return round(total_valence / math.sqrt(total_valence**2 + 15), 4)


# --- vader ---------------------------------------------------------------------------------------------

def test_vader_obvious_cases():
    s = build_scorer({"scorer": "vader"})
    assert isinstance(s, VaderScorer)
    pos, neg, neutral = s.score(["p"] * 3, ["This movie is wonderful and great", "terrible awful",
                                            "The film is ninety minutes long."])
    assert pos > 0.5
    assert neg < -0.5
    assert neutral == 0.0


@pytest.mark.parametrize(("text", "valences"), [
    # Valences from vaderSentiment's vader_lexicon.txt (checked once by hand): good 1.9, wonderful 2.7,
    # great 3.1, terrible -2.1, awful -2.0. No negation, booster, "but" or "!" rule applies to these
    # sentences, so the compound is the normalised plain sum.
    ("The film is good.", [1.9]),                          # 1.9 / sqrt(18.61) = 0.4404
    ("This movie is wonderful and great", [2.7, 3.1]),     # 5.8 / sqrt(48.64) = 0.8316
    ("terrible awful", [-2.1, -2.0]),                      # -4.1 / sqrt(31.81) = -0.7269
])
def test_vader_exact_values(text, valences):
    assert build_scorer("vader")("any prompt", text) == pytest.approx(vader_compound(sum(valences)), abs=1e-9)


def test_vader_scores_the_completion_only_and_empty_is_zero():
    s = build_scorer("vader")
    assert s("I hate everything, awful awful", "The film is good.") == pytest.approx(0.4404, abs=1e-9)
    assert s("p", "") == 0.0


# --- length, regex, keywords ---------------------------------------------------------------------------

def test_length_chars_and_words():
    chars = build_scorer({"scorer": "length"})
    words = build_scorer({"scorer": "length", "unit": "words"})
    assert isinstance(chars, LengthScorer)
    assert chars.score(["p", "p"], ["abc de", ""]) == [6.0, 0.0]
    assert words.score(["p", "p", "p"], ["abc de", "  one\ttwo\nthree  ", "   "]) == [2.0, 3.0, 0.0]


def test_regex_count_cap_and_normalisation():
    text = "Wow! Great!!"  # three "!" in two words, 12 characters
    assert build_scorer({"scorer": "regex", "pattern": "!"})("p", text) == 3.0
    assert build_scorer({"scorer": "regex", "pattern": "!", "cap": 2})("p", text) == 2.0
    assert build_scorer({"scorer": "regex", "pattern": "!", "cap": 4, "normalize": "cap"})("p", text) == 0.75
    assert build_scorer({"scorer": "regex", "pattern": "!", "normalize": "words"})("p", text) == 1.5
    assert build_scorer({"scorer": "regex", "pattern": "!", "normalize": "chars"})("p", text) == 0.25
    # Empty completion: no division by zero.
    assert build_scorer({"scorer": "regex", "pattern": "!", "normalize": "words"})("p", "") == 0.0
    assert build_scorer({"scorer": "regex", "pattern": "!", "normalize": "chars"})("p", "") == 0.0
    # Non-overlapping matches, as re.findall counts them: "aaaa" holds two "aa".
    assert build_scorer({"scorer": "regex", "pattern": "aa"})("p", "aaaa") == 2.0
    # Case.
    assert build_scorer({"scorer": "regex", "pattern": "wow"})("p", text) == 0.0
    assert build_scorer({"scorer": "regex", "pattern": "wow", "ignore_case": True})("p", text) == 1.0
    assert isinstance(build_scorer({"scorer": "regex", "pattern": "x"}), RegexScorer)


def test_keywords_whole_words_case_insensitive_summed():
    s = build_scorer({"scorer": "keywords", "words": ["great", "moving"]})
    assert isinstance(s, KeywordsScorer)
    # great x2 (Great, GREAT), not "greatest"; moving x1, not "movingly".
    assert s("p", "Great film. GREAT cast, the greatest score, moving and movingly shot") == 3.0
    assert s("p", "") == 0.0
    # Keywords with non-word characters and phrases still match as whole words only.
    s = build_scorer({"scorer": "keywords", "words": ["c++", "special effects"]})
    assert s("p", "C++ and c++x, Special  effects, special effects!") == 2.0
    capped = build_scorer({"scorer": "keywords", "words": ["good"], "cap": 2, "normalize": "cap"})
    assert capped.score(["p"] * 3, ["good", "good good good", "bad"]) == [0.5, 1.0, 0.0]


# --- python --------------------------------------------------------------------------------------------

USER_MODULE = '''
def exclaim(prompt, completion, bonus=0.0):
    return completion.count("!") + bonus

def batch_len(prompts, completions):
    return [len(p) + len(c) for p, c in zip(prompts, completions)]

def bad_batch(prompts, completions):
    return [1.0]

def returns_text(prompt, completion):
    return "high"

def returns_nan(prompt, completion):
    return float("nan")

def returns_bool(prompt, completion):
    return "good" in completion

class Holder:
    @staticmethod
    def score(prompt, completion):
        return 2.5

NOT_CALLABLE = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "alignlab_user_scorers.py").write_text(USER_MODULE)
    (tmp_path / "alignlab_broken_scorers.py").write_text("raise RuntimeError('no API key')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "alignlab_user_scorers"
    sys.modules.pop("alignlab_user_scorers", None)
    sys.modules.pop("alignlab_broken_scorers", None)


def test_python_per_example_batched_kwargs_and_dotted(user_module):
    m = user_module
    assert build_scorer({"scorer": "python", "function": f"{m}:exclaim"}).score(["p", "q"], ["a!", "!!"]) == [1, 2]
    with_kwargs = build_scorer({"scorer": "python", "function": f"{m}:exclaim", "kwargs": {"bonus": 0.5}})
    assert with_kwargs("p", "a!") == 1.5
    batched = build_scorer({"scorer": "python", "function": f"{m}:batch_len", "batched": True})
    assert batched.score(["ab", "c"], ["d", ""]) == [3.0, 1.0]
    assert build_scorer({"scorer": "python", "function": f"{m}:Holder.score"})("p", "c") == 2.5
    assert build_scorer({"scorer": "python", "function": f"{m}:returns_bool"}).score(["p"] * 2, ["good", "x"]) \
        == [1.0, 0.0]


@pytest.mark.parametrize(("spec", "message"), [
    ({"function": "{m}:returns_text"}, r"returned 'high' \(str\) for example 0; a scorer must return a finite"),
    ({"function": "{m}:returns_nan"}, r"returned nan .* finite number"),
    ({"function": "{m}:bad_batch", "batched": True}, r"returned 1 values for 2 examples"),
])
def test_python_bad_return_values(user_module, spec, message):
    spec = {"scorer": "python", **{k: v.format(m=user_module) if isinstance(v, str) else v for k, v in spec.items()}}
    scorer = build_scorer(spec, where="stages.prefs.scorer")
    with pytest.raises(InputError, match=r"^recipe: stages\.prefs\.scorer\.function: .*" + message):
        scorer.score(["p", "q"], ["a", "b"])


# --- weighted sums -------------------------------------------------------------------------------------

def test_weighted_sum_of_vader_and_length():
    s = build_scorer({"sum": [{"scorer": "vader", "weight": 1.0},
                              {"scorer": "length", "unit": "words", "weight": -0.01}]})
    assert isinstance(s, WeightedSum)
    # 0.8316 (vader, worked above) - 0.01 * 6 words; -0.7269 - 0.01 * 2 words.
    assert s.score(["p", "p"], ["This movie is wonderful and great", "terrible awful"]) == pytest.approx(
        [0.8316 - 0.06, -0.7269 - 0.02], abs=1e-9)


def test_weights_nest_and_scale_and_spec_round_trips():
    spec = {"weight": 2, "sum": [{"scorer": "regex", "pattern": "!", "weight": 0.5},
                                 {"sum": ["length"], "weight": "1e-1"}]}  # YAML reads 1e-1 as a string
    s = build_scorer(spec)
    # 2 * (0.5 * 2 + 0.1 * 3) = 2.6 for "a!!"
    assert s("p", "a!!") == pytest.approx(2.6, abs=1e-12)
    again = build_scorer(s.spec)
    assert again.spec == s.spec
    assert again("p", "a!!") == pytest.approx(2.6, abs=1e-12)
    # weight 1 at the top level is the scorer itself.
    assert isinstance(build_scorer({"scorer": "vader", "weight": 1}), VaderScorer)


def test_score_rejects_mismatched_batch():
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        build_scorer("vader").score(["a", "b"], ["c"])


# --- load-time errors ----------------------------------------------------------------------------------

W = r"^recipe: stages\.prefs\.scorer"


@pytest.mark.parametrize(("spec", "message"), [
    ({"scorer": "vadr"}, W + r"\.scorer: unknown scorer 'vadr'; did you mean 'vader'\? expected one of keywords, "
                             r"length, python, regex, vader$"),
    ({"scorer": "sentiment"}, W + r"\.scorer: unknown scorer 'sentiment'; expected one of"),
    ({"scorer": "regex", "patern": "!"}, r"unknown key 'patern' at stages\.prefs\.scorer; did you mean 'pattern'\?"),
    ({"scorer": "vader", "unit": "words"}, r"unknown key 'unit' at stages\.prefs\.scorer; valid keys: scorer, weight"),
    ({"sum": ["vader"], "sums": 1}, r"unknown key 'sums' at stages\.prefs\.scorer; did you mean 'sum'\? valid "
                                 r"keys: sum, weight$"),
    ({"scorer": "regex"}, W + r": scorer 'regex' needs a 'pattern' key; add it"),
    ({"scorer": "keywords"}, W + r": scorer 'keywords' needs a 'words' key"),
    ({"scorer": "python"}, W + r": scorer 'python' needs a 'function' key"),
    ({"scorer": "regex", "pattern": "(unclosed"}, W + r"\.pattern: '\(unclosed' is not a valid regular expression "
                                                      r"\(missing \), unterminated subpattern"),
    ({"scorer": "regex", "pattern": ""}, W + r"\.pattern: is empty"),
    ({"scorer": "regex", "pattern": "!", "cap": 0}, W + r"\.cap: must be a positive number, got 0"),
    ({"scorer": "regex", "pattern": "!", "normalize": "cap"}, W + r"\.normalize: 'cap' divides by cap, but no cap"),
    ({"scorer": "regex", "pattern": "!", "normalize": "sentences"}, W + r"\.normalize must be 'none' \| 'cap'"),
    ({"scorer": "length", "unit": "lines"}, W + r"\.unit must be 'chars' \| 'words', got 'lines'"),
    ({"scorer": "keywords", "words": "great"}, W + r"\.words must be list\[str\], got 'great'"),
    ({"scorer": "keywords", "words": []}, W + r"\.words: is empty; list at least one word"),
    ({"scorer": "keywords", "words": ["good", " "]}, W + r"\.words\[1\]: is blank"),
    ({"scorer": "keywords", "words": ["Good", "good"]}, W + r"\.words\[1\]: 'good' repeats words\[0\]"),
    ({"scorer": "vader", "weight": "heavy"}, W + r"\.weight must be float, got 'heavy'"),
    ({"scorer": "vader", "weight": float("inf")}, W + r"\.weight: must be a finite number"),
    ({"sum": []}, W + r"\.sum: expected a non-empty list of scorer specs"),
    ({"sum": "vader"}, W + r"\.sum: expected a non-empty list"),
    ({"sum": ["vader", {"scorer": "lenght"}]}, W + r"\.sum\[1\]\.scorer: unknown scorer 'lenght'; did you mean "
                                                   r"'length'\?"),
    ({"scorer": "vader", "sum": ["vader"]}, W + r": has both 'scorer' and 'sum'"),
    ({"weight": 2}, W + r": expected a 'scorer' key \(one of .*\) or a 'sum' list, got keys: weight$"),
    (3, W + r": expected a scorer name or a mapping like \{scorer: vader\} or \{sum: \[\.\.\.\]\}, got int 3"),
    ({"scorer": "python", "function": "no_colon"}, W + r"\.function: expected 'module:function'"),
    ({"scorer": "python", "function": ":f"}, W + r"\.function: expected 'module:function'"),
    ({"scorer": "python", "function": "alignlab_no_such_module:f"},
     W + r"\.function: cannot import module 'alignlab_no_such_module' \(ModuleNotFoundError: No module named "
         r"'alignlab_no_such_module'\); install it or put its folder on PYTHONPATH"),
    ({"scorer": "python", "function": "alignlab_broken_scorers:f"},
     W + r"\.function: cannot import module 'alignlab_broken_scorers' \(RuntimeError: no API key\)"),
    ({"scorer": "python", "function": "alignlab_user_scorers:missing"},
     W + r"\.function: module 'alignlab_user_scorers' has no attribute 'missing'"),
    ({"scorer": "python", "function": "alignlab_user_scorers:NOT_CALLABLE"},
     W + r"\.function: 'alignlab_user_scorers:NOT_CALLABLE' is not callable \(it is int 3\)"),
    ({"scorer": "python", "function": "alignlab_user_scorers:exclaim", "kwargs": {"bouns": 1}},
     W + r"\.function: 'alignlab_user_scorers:exclaim' cannot be called as fn\(prompt, completion, bouns=\.\.\.\)"),
    ({"scorer": "python", "function": "math:sqrt"}, W + r"\.function: 'math:sqrt' cannot be called as "
                                                        r"fn\(prompt, completion\)"),
    ({"scorer": "python", "function": "alignlab_user_scorers:exclaim", "batched": "yes"},
     W + r"\.batched must be bool, got 'yes'"),
])
def test_load_time_errors(user_module, spec, message):
    with pytest.raises(InputError, match=message) as e:
        build_scorer(spec)
    assert "\n" not in str(e.value)


def test_error_messages_name_the_given_source_and_path():
    with pytest.raises(InputError, match=r"^recipes/x\.yaml: stages\.rm\.gold\.scorer: unknown scorer 'vadr'"):
        build_scorer({"scorer": "vadr"}, where="stages.rm.gold", source="recipes/x.yaml")
