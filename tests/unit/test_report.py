"""Reports from run directories written by hand: tables with intervals, spread over seeds, plots, samples."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from common.runs import expand_replicas
from eval.report import (
    aggregate,
    frontier_points,
    read_run,
    results_table,
    sign_disagreements,
    stages_table,
    write_report,
)
from recipes.cli import main


def fake_run(root: Path, seed: int, ppo_reward: float, gain: float | None = None, rm_gold: float | None = None,
             recipe: str | None = None, kl: float = 4.0) -> Path:
    """A finished run written by hand: sft and ppo stages, an eval of both (ppo's paired gold `gain` over sft when
    given), and a reward model stage with its held-out gold accuracy `rm_gold` when given."""
    root.mkdir(parents=True)
    (root / "recipe.yaml").write_text(f"name: sentiment\nseed: {seed}\n")
    (root / "manifest.json").write_text(json.dumps({"seed": seed, "command": ["alignlab", "run"],
                                                    "git": {"commit": "abc"}} | ({"recipe": recipe} if recipe else {})))
    stages = [
        ("sft", "sft", [{"step": s, "loss/train": 3.0 - s / 10} for s in range(1, 6)], {}),
        ("ppo", "ppo", [{"step": s, "objective/scores": s / 10, "objective/kl": s / 100} for s in range(1, 6)], {}),
    ]
    if rm_gold is not None:
        stages.append(("rm", "reward_model", [], {"eval/gold_accuracy": rm_gold}))
    for stage, kind, rows, metrics in stages:
        (root / stage).mkdir()
        (root / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / stage / "done.json").write_text(json.dumps({"kind": kind, "outputs": {}, "metrics": metrics}))
    ev = root / "eval"
    delta = {"gold_reward_vs_ref": {"mean": gain, "ci": [gain - 0.1, gain + 0.1], "n": 40}} if gain is not None else {}
    models = {
        "sft": {"gen": {"gold_reward": {"mean": 0.1, "ci": [0.0, 0.2], "n": 40},
                        "kl_to_ref": {"mean": 0.0, "ci": [0.0, 0.0], "n": 40}}, "mc": None, "judge": None},
        "ppo": {"gen": {"gold_reward": {"mean": ppo_reward, "ci": [ppo_reward - 0.1, ppo_reward + 0.1], "n": 40},
                        "kl_to_ref": {"mean": kl, "ci": [kl - 1, kl + 1], "n": 40}} | delta,
                "mc": {"acc": {"accuracy": 0.25, "stderr": 0.05},
                       "letters": {"predicted_share": {"A": 0.9, "B": 0.1, "C": 0.0, "D": 0.0}},
                       "calibration": {"ece": 0.31}},
                "judge": {"vs": "sft", "win_rate": 0.7, "ci": [0.6, 0.8]}},
    }
    for model in models:
        (ev / model).mkdir(parents=True)
        (ev / model / "samples.jsonl").write_text(json.dumps(
            {"prompt": "Review <Heat>", "completion": f"{model} says <great> & more", "gold_reward": 0.5}) + "\n")
    (ev / "results.json").write_text(json.dumps({"models": models}))
    (ev / "done.json").write_text(json.dumps({"kind": "eval", "outputs": {}, "metrics": {}}))
    return root


def test_one_run_shows_intervals_plots_and_escaped_samples(tmp_path):
    run = fake_run(tmp_path / "runs" / "sentiment" / "a", seed=1, ppo_reward=0.6)
    html_path, md_path = write_report([run], tmp_path / "out" / "report.html")
    page = html_path.read_text()
    assert "<td>0.600 [0.500, 0.700]</td>" in page and "<td>0.700 [0.600, 0.800]</td>" in page
    # MC: accuracy 0.25 +- 1.96 * 0.05, the most-picked letter beside it, and calibration.
    assert "<td>0.250 [0.152, 0.348]</td><td>A: 90%</td><td>0.310</td>" in page
    images = page.count("src='data:image/png;base64,")
    assert images == 3, "frontier + sft curves + ppo curves"
    first = page.split("base64,")[1].split("'")[0]
    assert base64.b64decode(first)[:8] == b"\x89PNG\r\n\x1a\n", "a real embedded PNG"
    assert "ppo says &lt;great&gt; &amp; more" in page, "completions are escaped"
    md = md_path.read_text()
    assert "| ppo | 0.600 [0.500, 0.700] |" in md and len(list((tmp_path / "out" / "report_files").glob("*.png"))) == 3


def test_two_seeds_show_the_mean_and_t_interval(tmp_path):
    a = fake_run(tmp_path / "sentiment" / "a", seed=1, ppo_reward=0.6)
    b = fake_run(tmp_path / "sentiment" / "b", seed=2, ppo_reward=0.4)
    html_path, _ = write_report([a, b], tmp_path / "r.html")
    # Mean 0.5, standard error 0.1414 / sqrt(2) = 0.1, t(0.975, 1) = 12.706: 0.5 +- 1.2706.
    assert "0.500 [-0.771, 1.771] (n=2 seeds)" in html_path.read_text()
    # The MC letter is shown when both seeds pick the same one: 90% A in each.
    assert "A: 90% [90%, 90%] (n=2 seeds)" in html_path.read_text()


def three_seeds(tmp_path, gains=(0.3, 0.1, -0.1)) -> Path:
    """A multi-seed run as the runner lays it out: RUN/seed-<seed>/, each a complete run directory."""
    root = tmp_path / "runs" / "sentiment" / "multi"
    for seed, gain, rm, kl in zip((42, 43, 44), gains, (0.6, 0.7, 0.8), (3.0, 4.0, 8.0), strict=True):
        fake_run(root / f"seed-{seed}", seed=seed, ppo_reward=0.5, gain=gain, rm_gold=rm, recipe="sentiment", kl=kl)
    return root


def test_aggregate_is_the_mean_the_t_interval_and_the_sign_agreement():
    # [0.3, 0.1, -0.1]: mean 0.1, sd 0.2, standard error 0.2 / sqrt(3) = 0.11547; t(0.975, 2) = 4.3027:
    # half-width 0.49683.
    agg = aggregate([0.3, 0.1, -0.1])
    assert (agg.mean, agg.low, agg.high, agg.n) == pytest.approx((0.1, -0.3968275, 0.5968275, 3), abs=1e-6)
    assert agg.signs_disagree
    assert not aggregate([0.3, 0.1, 0.0]).signs_disagree, "zero is no effect, not the other sign"
    assert aggregate([0.6, 0.4], centre=0.5).signs_disagree and not aggregate([0.6, 0.7], centre=0.5).signs_disagree


def test_a_multi_seed_run_is_read_as_its_replicas_and_aggregated(tmp_path):
    root = three_seeds(tmp_path)
    runs = [read_run(d) for d in expand_replicas([root])]
    assert [r.manifest["seed"] for r in runs] == [42, 43, 44]
    header, rows = results_table(runs)
    ppo = dict(zip(header, rows[1], strict=True))
    assert ppo["model"] == "ppo" and ppo["gold reward − ref"] == "+0.100 [-0.397, +0.597] (n=3 seeds)"
    # KL [3, 4, 8]: mean 5, sd sqrt(7) = 2.6458, standard error 1.5275, half-width 4.3027 * 1.5275 = 6.5724.
    assert ppo["KL to ref"] == "5.00 [-1.57, 11.57] (n=3 seeds)"
    # The reward model's held-out gold accuracy [0.6, 0.7, 0.8]: 0.7 +- 4.3027 * 0.1 / sqrt(3) = 0.7 +- 0.2484.
    assert stages_table(runs) == (["stage", "RM gold accuracy"], [["rm", "0.700 [0.452, 0.948] (n=3 seeds)"]])
    assert sign_disagreements(runs) == [
        "ppo: the seeds disagree in sign on gold reward − ref (seed 42 +0.300, seed 43 +0.100, seed 44 -0.100; no "
        "effect is 0), so its mean is no effect the seeds agree on."]
    # Each seed is a point on the frontier.
    assert [(kl["mean"], reward["mean"]) for kl, reward in frontier_points(runs)["ppo"]] == [(3.0, 0.5), (4.0, 0.5),
                                                                                            (8.0, 0.5)]


def test_the_report_of_a_multi_seed_run_says_where_seeds_disagree(tmp_path):
    root = three_seeds(tmp_path)
    assert main(["report", str(root), "-o", str(tmp_path / "r.html")]) == 0
    page, md = (tmp_path / "r.html").read_text(), (tmp_path / "r.md").read_text()
    assert "<td>+0.100 [-0.397, +0.597] (n=3 seeds)</td>" in page
    assert "the seeds disagree in sign on gold reward − ref" in page and "Student-t interval" in page
    assert "| rm | 0.700 [0.452, 0.948] (n=3 seeds) |" in md and "- ppo: the seeds disagree in sign" in md

    agreeing = three_seeds(tmp_path / "b", gains=(0.3, 0.2, 0.1))
    assert not sign_disagreements([read_run(d) for d in expand_replicas([agreeing])])


def test_the_table_leaves_out_the_evals_no_model_ran(tmp_path):
    with_mc = fake_run(tmp_path / "a", seed=1, ppo_reward=0.6)
    header, _ = results_table([read_run(with_mc)])
    assert {"MC accuracy", "MC most-picked letter", "MC ECE", "judge win rate"} <= set(header)
    without = fake_run(tmp_path / "b", seed=1, ppo_reward=0.6)
    results = json.loads((without / "eval" / "results.json").read_text())
    results["models"]["ppo"].update(mc=None, judge=None)
    (without / "eval" / "results.json").write_text(json.dumps(results))
    header, rows = results_table([read_run(without)])
    assert header == ["model", "gold reward", "KL to ref"]
    assert rows == [["sft", "0.100 [0.000, 0.200]", "0.00 [0.00, 0.00]"],
                    ["ppo", "0.600 [0.500, 0.700]", "4.00 [3.00, 5.00]"]]


def test_runs_of_different_recipes_are_not_folded_together(tmp_path):
    a = fake_run(tmp_path / "a" / "r", seed=1, ppo_reward=0.6, recipe="sentiment")
    b = fake_run(tmp_path / "b" / "r", seed=1, ppo_reward=0.2, recipe="frontier")
    _, rows = results_table([read_run(a), read_run(b)])
    assert [(r[0], r[1]) for r in rows] == [("sentiment: sft", "0.100 [0.000, 0.200]"),
                                            ("sentiment: ppo", "0.600 [0.500, 0.700]"),
                                            ("frontier: sft", "0.100 [0.000, 0.200]"),
                                            ("frontier: ppo", "0.200 [0.100, 0.300]")]


def test_cli_report_and_bad_directory(tmp_path, capsys):
    run = fake_run(tmp_path / "sentiment" / "a", seed=1, ppo_reward=0.6)
    assert main(["report", str(run), "-o", str(tmp_path / "x.html")]) == 0
    assert (tmp_path / "x.html").is_file() and (tmp_path / "x.md").is_file()
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "y.html")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_an_arena_adds_its_leaderboard_and_a_ratings_plot(tmp_path):
    from judge.arena import Battle, leaderboard

    run = fake_run(tmp_path / "runs" / "sentiment" / "a", seed=1, ppo_reward=0.6)
    battles = [Battle(f"p{i}", "ppo", "sft", "a" if i % 4 else "b", "long answer", "short") for i in range(12)]
    board = leaderboard(battles, baseline="sft", style_control=True, n_resamples=20)
    (run / "eval" / "arena.json").write_text(json.dumps(board))
    html_path, md_path = write_report([run], tmp_path / "out" / "report.html")
    page = html_path.read_text()
    ppo = board["models"][0]
    assert ppo["model"] == "ppo" and ppo["wins"] == 9 and ppo["losses"] == 3
    cell = f"{ppo['rating']:.0f} [{ppo['ci'][0]:.0f}, {ppo['ci'][1]:.0f}]"
    assert f"<td>ppo</td><td>{cell}</td>" in page and "<th>style-controlled [95% CI]</th>" in page
    assert page.count("src='data:image/png;base64,") == 4, "frontier + two curves + arena ratings"
    assert f"| ppo | {cell} |" in md_path.read_text()
