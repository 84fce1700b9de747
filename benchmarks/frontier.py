"""Benchmark: the methods on one task, from finished runs (the frontier recipe's, or any run with an eval stage).

    .venv/bin/python benchmarks/frontier.py --run runs/frontier/ID [runs/frontier/ID2 ...]

Per evaluated model, from the run directory alone: the method (the kind of the stage that trained it; best-of-N and
the base model by name), the held-out gold reward gain over the eval's reference (SFT) with its 95% bootstrap
interval over prompts, KL to the reference (nats per completion, from the model's own samples; for best-of-N its
sampled estimate beside the analytic bound log N - (N-1)/N), mean length in tokens, and the wall time of the stage
that trained it. Then
the reward-KL Pareto front (no other model has a larger gain at a smaller KL) and, for DPO against PPO, whether each
family's points are dominated by the other's, the DPO paper's Fig. 2 question. Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.report import RunData, read_run  # noqa: E402


def method_of(run: RunData, model: str) -> str:
    entry = run.results[model]
    if "best_of" in entry.get("gen", {}):
        return f"best-of-{entry['gen']['best_of']['n']}"
    return run.stages.get(model, {}).get("kind", model)  # the base model and the reference keep their names


def rows_of(run: RunData) -> list[dict]:
    rows = []
    for model, entry in run.results.items():
        gen = entry.get("gen") or {}
        gain, kl, length = gen.get("gold_reward_vs_ref"), gen.get("kl_to_ref"), gen.get("length_tokens")
        if model == run.eval_reference:  # the origin of the frontier
            gain = {"mean": 0.0, "ci": [0.0, 0.0]}
        best_of = gen.get("best_of") or {}
        rows.append({"model": model, "method": method_of(run, model), "gain": gain,
                     "kl": kl["mean"] if kl else best_of.get("kl_estimate"), "kl_bound": best_of.get("kl_bound"),
                     "length": length["mean"] if length else None,
                     "seconds": run.stages.get(model, {}).get("seconds")})
    return rows


def on_front(rows: list[dict]) -> set[str]:
    """Models no other model beats on both axes (a larger gain at no more KL, or the same gain at less KL)."""
    points = [(r["model"], r["gain"]["mean"], r["kl"]) for r in rows if r["gain"] and r["kl"] is not None]
    return {m for m, g, k in points
            if not any((g2 > g and k2 <= k) or (g2 >= g and k2 < k) for m2, g2, k2 in points if m2 != m)}


def dominated(these: list[dict], by: list[dict]) -> list[str]:
    """Those of `these` for which some point of `by` has at least the gain at no more KL."""
    return [a["model"] for a in these
            if any(b["gain"]["mean"] >= a["gain"]["mean"] and b["kl"] <= a["kl"] for b in by)]


def cell(value, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def print_table(run: RunData) -> None:
    rows = rows_of(run)
    front = on_front(rows)
    print(f"{run.label}: gold gain over {run.eval_reference} on held-out prompts [95% interval over prompts]")
    print(f"{'model':<28}{'method':<14}{'gold gain [CI]':<30}{'KL':>7}{'KL bound':>10}{'length':>8}{'stage s':>9}"
          "  front")
    for r in rows:
        gain = r["gain"]
        gain_cell = "–" if gain is None else f"{gain['mean']:+.3f} [{gain['ci'][0]:+.3f}, {gain['ci'][1]:+.3f}]"
        print(f"{r['model']:<28}{r['method']:<14}{gain_cell:<30}{cell(r['kl'], '{:.2f}'):>7}"
              f"{cell(r['kl_bound'], '{:.2f}'):>10}{cell(r['length'], '{:.1f}'):>8}{cell(r['seconds'], '{:.0f}'):>9}"
              f"  {'*' if r['model'] in front else ''}")
    families = {m: [r for r in rows if r["method"] == m and r["gain"] and r["kl"] is not None] for m in ("dpo", "ppo")}
    if families["dpo"] and families["ppo"]:
        print(f"PPO points dominated by a DPO point: {dominated(families['ppo'], families['dpo']) or 'none'}")
        print(f"DPO points dominated by a PPO point: {dominated(families['dpo'], families['ppo']) or 'none'}")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, nargs="+", required=True, help="finished run directories")
    for root in parser.parse_args().run:
        print_table(read_run(root))


if __name__ == "__main__":
    main()
