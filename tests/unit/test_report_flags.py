"""The report says what a careful reader would notice: the flags of eval.flags under the results table (HTML and
Markdown), a position-biased judge's cell replaced by what it means, and the over-optimisation plot of a stage that
logged gold scores, with the gold peak marked."""

from __future__ import annotations

import html
import json
from pathlib import Path

from eval.report import build_report, overoptimisation_plot, read_run, write_report
from tests.unit.test_report import fake_run


def careless_run(root: Path, gold: list[float] | None = None) -> Path:
    """fake_run, with what the default chain showed on seed 42: PPO's length collapsed (29 -> 8 tokens), the judge
    position-inconsistent on every pair, MC at chance with A throughout; and, with `gold`, PPO's gold per step."""
    run = fake_run(root, seed=42, ppo_reward=0.6)
    results = json.loads((run / "eval" / "results.json").read_text())
    models = results["models"]
    models["sft"]["gen"] |= {"length_tokens": {"mean": 29.0, "ci": [27.0, 31.0], "n": 40}, "distinct_2": 0.6}
    models["ppo"]["gen"] |= {"length_tokens": {"mean": 8.0, "ci": [7.0, 9.0], "n": 40}, "distinct_2": 0.6}
    models["ppo"]["judge"] = {"vs": "sft", "win_rate": 0.5, "ci": [0.5, 0.5], "position_consistency": 0.0}
    models["ppo"]["mc"]["letters"] = {"predicted_share": {"A": 1.0, "B": 0.0, "C": 0.0, "D": 0.0}, "chance": 0.25}
    results["config"] = {"generation": {"reference": "sft"}}
    (run / "eval" / "results.json").write_text(json.dumps(results))
    if gold is not None:
        rows = [{"step": s, "objective/scores": s / 10, "objective/kl": (s / 2) ** 2, "objective/sqrt_kl": s / 2,
                 "objective/gold_scores": g} for s, g in enumerate(gold, 1)]
        (run / "ppo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_the_report_flags_length_judge_and_mc_beside_the_numbers(tmp_path):
    run = careless_run(tmp_path / "runs" / "sentiment" / "a")
    html_path, md_path = write_report([run], tmp_path / "out" / "report.html")
    page, md = html_path.read_text(), md_path.read_text()
    expected = [
        "ppo: mean length 8.0 tokens vs 29.0 for sft (-72%)",
        "ppo vs sft: the judge's position consistency is 0.00 (below 0.2): it picks by position, so its win rate "
        "(0.500) is not evidence",
        "ppo: MC accuracy 0.250 is chance (0.250) and 100% of the answers are A: the score measures the letter, not "
        "knowledge",
    ]
    for text in expected:
        assert f"<li>⚠ {html.escape(text)}</li>" in page and f"- ⚠ {text}" in md
    # Right under the results table, before any plot.
    assert page.index("</table>") < page.index("<h3>Flags</h3>") < page.index("<figure>")
    assert "length_shift: mean completion length moved by 50% or more of the reference's" in md
    # The judge cell says what an all-ties win rate is, instead of 0.500 [0.500, 0.500].
    assert "<td>no evidence: position consistency 0.00 (&lt; 0.2)</td>" in page
    assert "0.500 [0.500, 0.500]" not in page and "| no evidence: position consistency 0.00 (< 0.2) |" in md


def test_a_clean_run_has_no_flags_section(tmp_path):
    run = fake_run(tmp_path / "runs" / "sentiment" / "a", seed=1, ppo_reward=0.6)
    report = build_report([run])
    assert report.flags == []
    html_path, md_path = write_report([run], tmp_path / "out" / "report.html")
    assert "Flags" not in html_path.read_text() and "Flags" not in md_path.read_text()


def test_gold_past_its_peak_adds_the_over_optimisation_plot_and_a_flag(tmp_path):
    run = careless_run(tmp_path / "runs" / "sentiment" / "a", gold=[0.1, 0.3, 0.5, 0.6, 0.4, 0.2, 0.1])
    report = build_report([run])
    captions = [caption for caption, _ in report.plots]
    assert "gold and learned reward against √KL: ppo" in captions
    assert captions.index("training curves: ppo") + 1 == captions.index("gold and learned reward against √KL: ppo")
    gold = [f.text for _, f in report.flags if f.rule == "gold_past_peak"]
    # Smoothed over 3 steps: 0.1, 0.2, 0.3, 0.4667, 0.5, 0.4, 0.2333: the peak is step 5.
    assert gold == ["ppo: the gold score of its rollouts peaked at step 5 (0.500, mean of 3 steps) and fell to 0.233 "
                    "by the last step (7): over-optimisation of the learned reward; keep_best: gold keeps the best "
                    "held-out policy"]
    assert overoptimisation_plot([read_run(run)], "ppo")[:8] == b"\x89PNG\r\n\x1a\n"
    assert overoptimisation_plot([read_run(run)], "sft") is None, "no gold logged there"


def test_two_seeds_name_the_run_of_each_flag(tmp_path):
    a = careless_run(tmp_path / "sentiment" / "a")
    b = fake_run(tmp_path / "sentiment" / "b", seed=2, ppo_reward=0.4)
    report = build_report([a, b])
    labels = {label for label, flag in report.flags}
    assert labels == {"sentiment/a (seed 42)"}, "only seed 42's run has them"
    # The judge of run b is a real one (no consistency recorded), so the judge cell keeps its numbers.
    assert not any("no evidence" in c for row in report.table[1] for c in row)
