"""Reports from run directories written by hand: tables with intervals, spread over seeds, plots, samples."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from eval.report import write_report
from recipes.cli import main


def fake_run(root: Path, seed: int, ppo_reward: float) -> Path:
    root.mkdir(parents=True)
    (root / "recipe.yaml").write_text(f"name: sentiment\nseed: {seed}\n")
    (root / "manifest.json").write_text(json.dumps({"seed": seed, "command": ["alignlab", "run"],
                                                    "git": {"commit": "abc"}}))
    for stage, kind, rows in [
        ("sft", "sft", [{"step": s, "loss/train": 3.0 - s / 10} for s in range(1, 6)]),
        ("ppo", "ppo", [{"step": s, "objective/scores": s / 10, "objective/kl": s / 100} for s in range(1, 6)]),
    ]:
        (root / stage).mkdir()
        (root / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / stage / "done.json").write_text(json.dumps({"kind": kind, "outputs": {}, "metrics": {}}))
    ev = root / "eval"
    models = {
        "sft": {"gen": {"gold_reward": {"mean": 0.1, "ci": [0.0, 0.2], "n": 40},
                        "kl_to_ref": {"mean": 0.0, "ci": [0.0, 0.0], "n": 40}}, "mc": None, "judge": None},
        "ppo": {"gen": {"gold_reward": {"mean": ppo_reward, "ci": [ppo_reward - 0.1, ppo_reward + 0.1], "n": 40},
                        "kl_to_ref": {"mean": 4.0, "ci": [3.0, 5.0], "n": 40}},
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


def test_two_seeds_show_the_spread(tmp_path):
    a = fake_run(tmp_path / "sentiment" / "a", seed=1, ppo_reward=0.6)
    b = fake_run(tmp_path / "sentiment" / "b", seed=2, ppo_reward=0.4)
    html_path, _ = write_report([a, b], tmp_path / "r.html")
    assert "0.500 (runs 0.400–0.600, n=2)" in html_path.read_text()


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
