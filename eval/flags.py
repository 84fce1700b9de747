"""What a careful reader would notice in a run, said by the report itself: flags beside the numbers.

Each flag is a rule over what the runs wrote (the eval stage's results.json entries, a training stage's
metrics.jsonl and done.json), and every threshold is in `RULES`, here and nowhere else. The rules, and why:

- `length_shift`, `distinct_shift`: a model whose mean completion length (tokens) or distinct-2 moved far from the
  eval's reference model (`generation.reference`, the one KL is measured against). A gold gain that comes with a
  policy that learned to say little ("Lovely performance.") or to repeat itself is a change of style as much as of
  quality; the flag gives both numbers and the relative change.
- `judge_position_bias`: a judge whose verdicts flip when the two answers swap places (position consistency near
  0) picks by position, and the lab scores an inconsistent pair as a tie: its win rates sit at 0.5 with an interval
  of zero width, which is no evidence either way (Zheng et al. 2023, sec. 3.3).
- `mc_one_letter`: an MC accuracy within z standard errors of chance while one letter takes nearly every answer:
  the score measures the letter the model likes, not what it knows.
- `gold_past_peak`: a policy's gold score of its own rollouts (objective/gold_scores, logged beside the learned
  reward) peaked before the last step and fell back: over-optimisation of the learned reward (Gao et al. 2022).
  The curve is smoothed by a trailing mean of `window` steps (one step's rollouts are a small batch); the flag
  fires when the last smoothed value is below the peak by more than `min_drop` of the rise from the first value to
  the peak (any drop when the peak is the first value).
- `kept_not_last`: with keep_best: gold, the stage saved an earlier step's policy than the last (done.json).
- `rm_near_chance`: a reward model whose held-out gold accuracy (done.json: `eval/gold_accuracy` over
  `eval/gold_pairs`) is less than z binomial standard errors above chance (0.5): PPO, GRPO or Best-of-N optimising
  it chase noise, whatever their learned reward says. A prompt's pairs are not independent, so the real uncertainty
  is wider than the flag's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rule:
    name: str
    thresholds: Mapping[str, float]
    says: str  # what a flag of this rule tells the reader, with {threshold} fields (the report's legend)

    @property
    def legend(self) -> str:
        return self.says.format(**self.thresholds)


RULES: dict[str, Rule] = {rule.name: rule for rule in (
    Rule("length_shift", {"relative_change": 0.5},
         "mean completion length moved by {relative_change:.0%} or more of the reference's"),
    Rule("distinct_shift", {"relative_change": 0.3},
         "distinct-2 moved by {relative_change:.0%} or more of the reference's"),
    Rule("judge_position_bias", {"min_consistency": 0.2},
         "the judge gives the same verdict in both answer orders on fewer than {min_consistency:.0%} of pairs"),
    Rule("mc_one_letter", {"z": 1.96, "min_share": 0.9},
         "MC accuracy within {z} standard errors of chance, with one letter picked for {min_share:.0%} of the "
         "answers or more"),
    Rule("gold_past_peak", {"window": 3, "min_drop": 0.1},
         "the gold score of the rollouts (mean of {window} steps) ended {min_drop:.0%} of its rise or more below its "
         "peak"),
    Rule("kept_not_last", {}, "keep_best: gold kept an earlier step's policy than the last"),
    Rule("rm_near_chance", {"z": 1.96},
         "a reward model's held-out gold accuracy is less than {z} standard errors above chance"),
)}


@dataclass(frozen=True)
class Flag:
    rule: str
    subject: str  # the model (or training stage) it is about
    text: str  # one sentence with the numbers


def relative_change(value: float, reference: float) -> float | None:
    """(value - reference) / |reference|; None when the reference is 0."""
    return None if reference == 0 else (value - reference) / abs(reference)


def shift_flags(models: Mapping[str, dict], reference: str | None) -> list[Flag]:
    """length_shift and distinct_shift: every model's mean length (tokens) and distinct-2 against the reference's."""
    ref = models.get(reference or "") or {}
    ref_gen = ref.get("gen") or {}
    flags = []
    for name, entry in models.items():
        gen = (entry or {}).get("gen") or {}
        if name == reference or not gen:
            continue
        for rule, key, what, fmt, unit in (("length_shift", "length_tokens", "mean length", "{:.1f}", " tokens"),
                                           ("distinct_shift", "distinct_2", "distinct-2", "{:.3f}", "")):
            value, base = mean_of(gen.get(key)), mean_of(ref_gen.get(key))
            change = None if value is None or base is None else relative_change(value, base)
            if change is not None and abs(change) >= RULES[rule].thresholds["relative_change"]:
                flags.append(Flag(rule, name, f"{name}: {what} {fmt.format(value)}{unit} vs {fmt.format(base)} for "
                                              f"{reference} ({change:+.0%})"))
    return flags


def judge_flags(models: Mapping[str, dict]) -> list[Flag]:
    """judge_position_bias: a judge entry whose position consistency is below the threshold."""
    limit = RULES["judge_position_bias"].thresholds["min_consistency"]
    flags = []
    for name, entry in models.items():
        judge = (entry or {}).get("judge") or {}
        consistency = judge.get("position_consistency")
        if consistency is not None and consistency < limit:
            rate = judge.get("win_rate")
            shown = "none" if rate is None else f"{rate:.3f}"
            flags.append(Flag("judge_position_bias", name,
                              f"{name} vs {judge.get('vs')}: the judge's position consistency is {consistency:.2f} "
                              f"(below {limit}): it picks by position, so its win rate ({shown}) is not evidence"))
    return flags


def mc_flags(models: Mapping[str, dict]) -> list[Flag]:
    """mc_one_letter: accuracy at chance (within z standard errors) and one letter picked nearly throughout."""
    z, min_share = (RULES["mc_one_letter"].thresholds[k] for k in ("z", "min_share"))
    flags = []
    for name, entry in models.items():
        mc = (entry or {}).get("mc") or {}
        acc, letters = mc.get("acc") or {}, mc.get("letters") or {}
        chance, shares = letters.get("chance"), letters.get("predicted_share")
        if "accuracy" not in acc or chance is None or not shares:
            continue
        letter, share = max(shares.items(), key=lambda kv: kv[1])
        accuracy, stderr = acc["accuracy"], acc.get("stderr") or 0.0
        if abs(accuracy - chance) <= z * stderr and share >= min_share:
            flags.append(Flag("mc_one_letter", name,
                              f"{name}: MC accuracy {accuracy:.3f} is chance ({chance:.3f}) and {share:.0%} of the "
                              f"answers are {letter}: the score measures the letter, not knowledge"))
    return flags


def trailing_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of each value and the (up to) window - 1 before it."""
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


@dataclass(frozen=True)
class GoldPeak:
    peak_step: int
    peak: float  # smoothed
    last_step: int
    last: float  # smoothed
    first: float  # smoothed

    @property
    def fell(self) -> bool:
        """The gold_past_peak rule."""
        drop = self.peak - self.last
        return drop > 0 and drop >= RULES["gold_past_peak"].thresholds["min_drop"] * (self.peak - self.first)


def gold_peak(rows: Sequence[Mapping[str, Any]], key: str = "objective/gold_scores") -> GoldPeak | None:
    """Where the smoothed gold score of a training stage's metrics rows peaked (the first step of the highest
    value); None without gold scores."""
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
    if not points:
        return None
    steps = [s for s, _ in points]
    smooth = trailing_mean([v for _, v in points], int(RULES["gold_past_peak"].thresholds["window"]))
    i = max(range(len(smooth)), key=lambda j: (smooth[j], -j))
    return GoldPeak(steps[i], smooth[i], steps[-1], smooth[-1], smooth[0])


def training_flags(stage: str, done: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[Flag]:
    """gold_past_peak from a stage's metrics rows; kept_not_last and rm_near_chance from its done.json."""
    flags = []
    peak = gold_peak(rows)
    if peak is not None and peak.fell:
        window = int(RULES["gold_past_peak"].thresholds["window"])
        flags.append(Flag("gold_past_peak", stage,
                          f"{stage}: the gold score of its rollouts peaked at step {peak.peak_step} ({peak.peak:.3f}, "
                          f"mean of {window} steps) and fell to {peak.last:.3f} by the last step ({peak.last_step}): "
                          "over-optimisation of the learned reward; keep_best: gold keeps the best held-out policy"))
    metrics = (done or {}).get("metrics") or {}
    if metrics.get("heldout/last_is_best") == 0.0:
        flags.append(Flag("kept_not_last", stage,
                          f"{stage}: keep_best: gold kept step {metrics['heldout/best_step']:.0f}'s policy (held-out "
                          f"gold {metrics['heldout/best_gold_scores']:.3f}); the last step's scored "
                          f"{metrics['heldout/last_gold_scores']:.3f}"))
    accuracy, pairs = metrics.get("eval/gold_accuracy"), metrics.get("eval/gold_pairs")
    if accuracy is not None and pairs:
        reach = RULES["rm_near_chance"].thresholds["z"] * math.sqrt(0.25 / pairs)  # z binomial SEs at p = 0.5
        if accuracy - 0.5 < reach:
            flags.append(Flag("rm_near_chance", stage,
                              f"{stage}: held-out gold accuracy {accuracy:.3f} over {pairs:.0f} pairs is within "
                              f"{reach:.3f} of chance (0.5): a policy optimising this reward model chases noise"))
    return flags


def mean_of(value: Any) -> float | None:
    """A number, or the mean of an {"mean", "ci"} interval; None when absent."""
    if isinstance(value, Mapping):
        value = value.get("mean")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def result_flags(models: Mapping[str, dict], reference: str | None) -> list[Flag]:
    """Every rule over one eval stage's results (results.json's models), in the order of RULES."""
    return shift_flags(models, reference) + judge_flags(models) + mc_flags(models)
