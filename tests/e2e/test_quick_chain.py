"""The default recipe's `quick` profile end to end on the tiny in-process model: every stage runs, the report
renders, the same seed gives the same metrics, and a run killed mid-stage resumes to the same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.tracking import read_metrics
from eval.report import build_report, read_run, results_table, write_report
from recipes.runner import RunOptions, run_recipe

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes/configs/smollm2-135m/sentiment.yaml"
QUICK = ["profile=quick"]
# Wall-clock and throughput numbers differ between two identical runs; everything else must not.
VOLATILE = ("time", "time/", "perf/", "train/total_flos")


def stable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith(VOLATILE)} for row in rows]


def all_metrics(run_root: Path) -> dict[str, list[dict]]:
    return {p.parent.name: stable(read_metrics(p)) for p in sorted(run_root.glob("*/metrics.jsonl"))}


def final_metrics(run_root: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text())["metrics"] for p in sorted(run_root.glob("*/done.json"))}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    return run_recipe(RECIPE, RunOptions(overrides=QUICK, output_dir=out, run_id="a"))


def test_every_stage_finishes_and_the_report_renders(quick_run, tmp_path):
    assert all(quick_run.is_done(name) for name in quick_run.recipe.stages)
    # The run ends with its own report; its table has a row per evaluated model, each but the reference (sft)
    # with a paired gold difference to it.
    header, rows = results_table([read_run(quick_run.root)])
    assert (quick_run.root / "report.html").is_file()
    delta = header.index("gold reward − ref")
    assert {r[0]: r[delta] != "–" for r in rows} == {"base": True, "sft": False, "dpo-beta0p1": True,
                                                     "dpo-beta0p5": True, "ppo": True}
    html_path, md_path = write_report([quick_run.root], tmp_path / "report.html")
    page = html_path.read_text()
    assert "<h2>Results</h2>" in page and page.count("data:image/png;base64,") >= 1
    assert md_path.read_text().startswith("# alignlab report: sentiment")


def test_same_seed_gives_identical_metrics(quick_run, tmp_path):
    again = run_recipe(RECIPE, RunOptions(overrides=QUICK, output_dir=tmp_path, run_id="b"))
    first, second = all_metrics(quick_run.root), all_metrics(again.root)
    assert first and first == second


def test_sigkill_mid_stage_then_resume_matches_uninterrupted(quick_run, tmp_path):
    cmd = [sys.executable, "-m", "recipes.cli", "run", str(RECIPE), "--set", "profile=quick",
           "--output-dir", str(tmp_path), "--run-id", "k"]
    root = tmp_path / "sentiment" / "k"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    # Kill as soon as the first stage has a checkpoint but is not done: the worst moment.
    deadline = time.time() + 240
    while time.time() < deadline and not list(root.glob("*/checkpoints/checkpoint-*")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(root.glob("*/checkpoints/checkpoint-*")), "the run reached a checkpoint before the kill"
    assert not all((root / name / "done.json").exists() for name in quick_run.recipe.stages), \
        "the killed run must not look finished"

    resumed = subprocess.run([*cmd, "--resume"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, got = final_metrics(quick_run.root), final_metrics(root)
    assert expected.keys() == got.keys()
    for stage, metrics in expected.items():
        for key, value in metrics.items():
            if not key.startswith(VOLATILE):
                assert got[stage][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (stage, key)


def test_ppo_logs_the_preferences_scorer_as_gold_and_the_report_plots_it(quick_run):
    # gold: auto (ppo.config.OnPolicyStage): PPO's reward model learned from prefs, which the quick profile scores by
    # whitespace; PPO scores its own rollouts by that scorer too, beside the reward model's score.
    recipe = quick_run.recipe
    assert recipe.stages["ppo"].gold_spec(recipe) == {"scorer": "regex", "pattern": "\\s"}
    rows = read_metrics(quick_run.stage_dir("ppo") / "metrics.jsonl")
    assert all("objective/gold_scores" in r and "objective/sqrt_kl" in r for r in rows)
    captions = [caption for caption, _ in build_report([quick_run.root]).plots]
    assert "gold and learned reward against √KL: ppo" in captions
