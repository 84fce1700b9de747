"""Benchmark: the default experiment end to end (what `make demo` runs) and what PPO and DPO did to the model.

    nice -n 10 .venv/bin/python benchmarks/default_chain.py [--seeds 42 43 44] [--output-dir DIR] [--set K=V ...]
    .venv/bin/python benchmarks/default_chain.py --run runs/sentiment/ID [runs/sentiment/ID2 ...]

Without --run, runs recipes/configs/smollm2-135m/sentiment.yaml into a fresh run first (one replica per seed with
--seeds). --run takes finished runs: single runs, multi-seed runs (RUN/seed-<seed>/, each read as a replica), or
both, all of the default recipe. The figures come from the run directories alone; per replica:
- wall time of each stage and of the chain (target: `make demo` within 30 minutes on 2 CPU cores);
- per evaluated model, on the held-out prompts: mean gold reward (VADER), its paired difference to the eval's
  reference (SFT) with a 95% bootstrap interval over prompts (target for PPO and for each DPO beta: >= +0.25 with
  the interval above 0), KL to SFT (nats per completion, from the model's own samples) and the reward model's
  score: the points of the reward-KL frontier;
- PPO's time split: the share of its step time spent generating, scoring, in the rollout's other forward passes
  (old and reference log-probs, values) and training;
- PPO's learned reward (objective/scores) beside the gold reward of its sample table at the same steps: the learned
  reward rising while the gold falls would be over-optimisation of the reward model.
Then, over the replicas: one row per seed (the reward model's held-out gold accuracy, each model's gold gain over SFT
with its interval over prompts, KL, the chain's wall time) and the aggregate (mean and 95% t-interval over seeds, as
in the report), with every gain whose seeds disagree in sign named.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.runs import expand_replicas  # noqa: E402
from common.tracking import read_metrics  # noqa: E402
from eval.report import RunData, aggregate, read_run, results_table, sign_disagreements, stages_table  # noqa: E402
from preferences.scorers import build_scorer  # noqa: E402
from recipes.runner import RunOptions, run_recipe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes/configs/smollm2-135m/sentiment.yaml"
TIME_PARTS = ("time/generate", "time/score", "time/forward", "time/train")


def stage_times(run: Path) -> None:
    done = {p.parent.name: json.loads(p.read_text()) for p in run.glob("*/done.json")}
    order = sorted(done, key=lambda name: done[name]["finished"])
    print("stage          seconds")
    for name in order:
        print(f"{name:<14} {done[name]['seconds']:>7.0f}")
    print(f"{'total':<14} {sum(d['seconds'] for d in done.values()):>7.0f}  (stages only; start-up not counted)\n")


def interval(stat: dict | None, fmt: str = "{:+.3f}") -> str:
    if stat is None:
        return "–"
    low, high = stat["ci"]
    return f"{fmt.format(stat['mean'])} [{fmt.format(low)}, {fmt.format(high)}]"


def eval_table(run: Path) -> None:
    results = json.loads((run / "eval/results.json").read_text())
    reference = results["config"]["generation"]["reference"]
    print(f"model          gold reward (VADER)        gold - {reference} (paired)     KL to {reference}      RM reward")
    for name, entry in results["models"].items():
        gen = entry["gen"]
        target = ""
        if gen["gold_reward_vs_ref"] is not None:
            d = gen["gold_reward_vs_ref"]
            target = "  target met" if d["mean"] >= 0.25 and d["ci"][0] > 0 else "  target NOT met"
        print(f"{name:<14} {interval(gen['gold_reward']):<26} {interval(gen['gold_reward_vs_ref']):<26} "
              f"{gen['kl_to_ref']['mean']:>8.2f}  {interval(gen['rm_reward'])}{target}")
    print(f"({gen['gold_reward']['n']} completions per model; intervals resample prompts)\n")


def ppo_time_split(run: Path) -> None:
    rows = [r for r in read_metrics(run / "ppo/metrics.jsonl") if "time/train" in r]
    totals = {part: sum(r[part] for r in rows) for part in TIME_PARTS}
    whole = sum(totals.values())
    shares = ", ".join(f"{part.split('/')[1]} {seconds / whole:.0%}" for part, seconds in totals.items())
    print(f"PPO time split over {len(rows)} steps ({whole / len(rows):.1f} s a step): {shares}\n")


def ppo_learned_vs_gold(run: Path) -> None:
    metrics = {r["step"]: r for r in read_metrics(run / "ppo/metrics.jsonl") if "objective/scores" in r}
    table: dict[int, list[str]] = {}
    for line in (run / "ppo/samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        table.setdefault(row["step"], []).append(row["completion"])
    vader = build_scorer("vader")
    print("PPO step  learned reward (objective/scores)  gold of its sample table (VADER)  objective/kl")
    for step, completions in sorted(table.items()):
        if step in metrics:
            gold = statistics.mean(vader.score([""] * len(completions), completions))
            print(f"{step:>8}  {metrics[step]['objective/scores']:>33.3f}  {gold:>32.3f}  "
                  f"{metrics[step]['objective/kl']:>12.2f}")


def wall_seconds(run: RunData) -> float:
    """The chain's time: its stages' own seconds (start-up and model loading between stages not counted)."""
    return sum(done.get("seconds", 0.0) for done in run.stages.values())


def seed_table(runs: list[RunData]) -> None:
    """One row per replica: RM gold accuracy, each model's gold gain over the reference [interval over prompts] and
    KL, and the chain's wall time."""
    models = [m for m in dict.fromkeys(m for run in runs for m in run.results)
              if any((run.results.get(m) or {}).get("gen", {}).get("gold_reward_vs_ref") for run in runs)]
    print("seed   RM gold acc  " + "".join(f"{m + ' gain [CI]':<28}{m + ' KL':>10}  " for m in models) + "wall s")
    for run in runs:
        rm = next((done["metrics"]["eval/gold_accuracy"] for done in run.stages.values()
                   if "eval/gold_accuracy" in done.get("metrics", {})), None)
        cells = []
        for m in models:
            gen = (run.results.get(m) or {}).get("gen") or {}
            kl = gen.get("kl_to_ref")
            cells.append(f"{interval(gen.get('gold_reward_vs_ref')):<28}{kl['mean'] if kl else float('nan'):>10.2f}  ")
        rm_cell = f"{rm:.3f}" if rm is not None else "–"
        print(f"{run.manifest.get('seed')!s:<6} {rm_cell:>11}  {''.join(cells)}{wall_seconds(run):>6.0f}")
    print()


def aggregate_table(runs: list[RunData]) -> None:
    """The headline figures over the replicas: mean [95% t-interval over seeds], as the report shows them."""
    header, rows = results_table(runs)
    keep = [header.index(h) for h in ("model", "gold reward − ref", "KL to ref", "MC accuracy", "judge win rate")]
    print(f"over {len(runs)} seeds: mean [95% t-interval over seeds]")
    for row in [[header[i] for i in keep], *[[r[i] for i in keep] for r in rows]]:
        print("  ".join(f"{c:<36}" if j else f"{c:<14}" for j, c in enumerate(row)))
    stage_header, stage_rows = stages_table(runs)
    for row in stage_rows:
        print("  ".join(f"{h}: {c}" for h, c in zip(stage_header[1:], row[1:], strict=True)), f"({row[0]})")
    wall = aggregate([wall_seconds(run) for run in runs])
    print(f"wall time: {wall.mean:.0f} s a seed [{wall.low:.0f}, {wall.high:.0f}]")
    for note in sign_disagreements(runs):
        print(note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, nargs="+",
                        help="finished runs of the default recipe, single or multi-seed (else one is run now)")
    parser.add_argument("--seeds", nargs="+", help="a new run: one replica per seed (alignlab run --seeds)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs"), help="where a new run goes")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    cli = parser.parse_args()
    roots = cli.run
    if roots is None:
        started = time.perf_counter()
        roots = [run_recipe(RECIPE, RunOptions(overrides=cli.overrides, output_dir=cli.output_dir,
                                               seeds=cli.seeds)).root]
        print(f"\nthe chain took {time.perf_counter() - started:.0f} s of wall time, start-up excluded\n")
    replicas = expand_replicas(roots)
    for run in replicas:
        print(f"=== {run}\n")
        stage_times(run)
        eval_table(run)
        ppo_time_split(run)
        ppo_learned_vs_gold(run)
        print()
    runs = [read_run(run) for run in replicas]
    seed_table(runs)
    if len(runs) > 1:
        aggregate_table(runs)


if __name__ == "__main__":
    main()
