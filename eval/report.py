"""Comparison reports: `alignlab report RUN [RUN ...] -o report.html` (and a Markdown twin beside it).

Reads run directories only (what the runs wrote: recipe, manifest, each stage's metrics.jsonl and done.json,
the eval stage's results.json and samples), so a report can be made anywhere, any time after the runs.
One self-contained HTML file (plots embedded as PNG data URIs) and a Markdown file with the same tables
whose plots sit in a folder next to it.

Several runs of one recipe (its seeds: the replicas of a multi-seed run, or runs given one by one) are folded
together: each model's numbers become the mean over seeds with a 95% Student-t interval over the seeds' values
(common.stats.t_interval), each seed is a point on the frontier plot, and a gain whose sign changes from seed to
seed is said in words, which is what a reader needs to tell an effect from noise. Runs of different recipes are
kept apart (rows `recipe: model`). A multi-seed run's directory stands for its replicas.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: render to memory
import matplotlib.pyplot as plt  # noqa: E402

from common.errors import DiskFullError, InputError, disk_full  # noqa: E402
from common.runs import atomic_write_text, expand_replicas  # noqa: E402
from common.stats import t_interval  # noqa: E402
from common.tracking import read_metrics  # noqa: E402
from eval.flags import RULES, Flag, gold_peak, result_flags, training_flags  # noqa: E402

# The curves worth a plot per stage kind, in the order shown (lab metric names, see common/tracking.py).
CURVES = {
    "sft": ["loss/train", "loss/eval"],
    "reward_model": ["loss/train", "eval/accuracy", "eval/margin"],
    "dpo": ["loss/train", "rewards/margins", "rewards/accuracies", "eval/rewards/accuracies"],
    "ppo": ["objective/scores", "objective/kl", "objective/rlhf_reward", "policy/clipfrac_avg", "loss/value_avg"],
}
SAMPLES_SHOWN = 4


@dataclass
class RunData:
    root: Path
    recipe_text: str
    manifest: dict
    stages: dict[str, dict]  # stage name -> done.json (or {} when not finished)
    metrics: dict[str, list[dict]]  # stage name -> metrics.jsonl rows
    results: dict[str, dict] = field(default_factory=dict)  # model -> eval entry
    samples: dict[str, list[dict]] = field(default_factory=dict)  # model -> samples.jsonl rows
    arena: dict | None = None  # the eval stage's arena.json (judge.arena.leaderboard)
    eval_reference: str | None = None  # the eval's generation.reference (length and KL are measured against it)

    @property
    def label(self) -> str:
        return f"{self.root.parent.name}/{self.root.name} (seed {self.manifest.get('seed')})"

    @property
    def recipe(self) -> str:
        return self.manifest.get("recipe") or self.root.parent.name


def read_run(root: Path) -> RunData:
    if not (root / "manifest.json").is_file():
        raise InputError(f"{root}: not a run directory (no manifest.json); give runs/<recipe>/<run-id> folders")
    stages, metrics = {}, {}
    for stage_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        done = stage_dir / "done.json"
        stages[stage_dir.name] = json.loads(done.read_text()) if done.is_file() else {}
        metrics[stage_dir.name] = read_metrics(stage_dir / "metrics.jsonl")
    run = RunData(root, (root / "recipe.yaml").read_text(), json.loads((root / "manifest.json").read_text()),
                  stages, metrics)
    for name, done in stages.items():
        results = root / name / "results.json"
        if done.get("kind") == "eval" and results.is_file():
            written = json.loads(results.read_text())
            run.results.update(written["models"])
            run.eval_reference = ((written.get("config") or {}).get("generation") or {}).get("reference")
            if (root / name / "arena.json").is_file():
                run.arena = json.loads((root / name / "arena.json").read_text())
            for model in run.results:
                path = root / name / model / "samples.jsonl"
                if path.is_file():
                    run.samples[model] = [json.loads(line) for line in path.read_text().splitlines() if line]
    return run


# --- numbers -----------------------------------------------------------------------------------------

COLUMNS = [  # (header, path into a model's results entry, format)
    ("gold reward", ("gen", "gold_reward"), "{:.3f}"),
    ("gold reward − ref", ("gen", "gold_reward_vs_ref"), "{:+.3f}"),  # paired by prompt: the effect, with its CI
    ("RM reward", ("gen", "rm_reward"), "{:.3f}"),
    ("KL to ref", ("gen", "kl_to_ref"), "{:.2f}"),
    ("length (tokens)", ("gen", "length_tokens"), "{:.1f}"),
    ("distinct-2", ("gen", "distinct_2"), "{:.3f}"),
    ("MC accuracy", ("mc", "acc"), "{:.3f}"),
    # An MC accuracy means little without the letters the model picks: SmolLM2-135M-Instruct answers "A" to
    # nearly every question, and its accuracy is then the share of A among the gold answers.
    ("MC most-picked letter", ("mc", "letters"), "{:.0%}"),
    ("MC ECE", ("mc", "calibration", "ece"), "{:.3f}"),
    ("judge win rate", ("judge",), "{:.3f}"),
]


# The columns `alignlab run` prints when a run ends (those some model has); the report has every such column.
SHORT_COLUMNS = ("gold reward", "gold reward − ref", "KL to ref", "MC accuracy", "judge win rate")


def lookup(entry: dict, path: tuple[str, ...]):
    """A value (or {"mean", "ci"} interval) from a results entry; None when that eval did not run."""
    node = entry
    for key in path:
        if not isinstance(node, dict) or node.get(key) is None:
            return None
        node = node[key]
    if isinstance(node, dict):
        if "mean" in node:
            return node
        if "accuracy" in node:  # the MC harness's accuracy block: a normal-approximation 95% interval
            acc, se = node["accuracy"], node.get("stderr") or 0.0
            return {"mean": acc, "ci": [max(0.0, acc - 1.96 * se), min(1.0, acc + 1.96 * se)]}  # an accuracy
        if "predicted_share" in node:  # the MC letter histogram: the letter picked most and its share
            letter, share = max(node["predicted_share"].items(), key=lambda kv: kv[1])
            return {"mean": share, "ci": None, "label": f"{letter}: "}
        if "win_rate" in node:  # the judge block: its interval sits beside the rate
            return {"mean": node["win_rate"], "ci": node.get("ci")}
        return None
    return {"mean": node, "ci": None}


# Columns that measure a gain, with the value of no effect: where the seeds fall on both sides of it, the report
# says so (a mean over seeds that disagree in sign is not an effect they agree on).
GAINS = {"gold reward − ref": 0.0, "judge win rate": 0.5}
# Figures of a stage's own (its done.json metrics), aggregated like the columns: (header, stage kind, metric, format).
STAGE_FIGURES = [
    ("RM gold accuracy", "reward_model", "eval/gold_accuracy", "{:.3f}"),  # held-out pairs ordered as the gold scorer
    ("RM accuracy (training labels)", "reward_model", "eval/accuracy", "{:.3f}"),
]


@dataclass
class SeedAggregate:
    """One figure over the seeds of a recipe: its mean, the 95% t-interval over the seeds' values, and whether
    they fall on both sides of `centre` (the value of no effect)."""

    mean: float
    low: float
    high: float
    n: int
    signs_disagree: bool


def aggregate(values: list[float], centre: float = 0.0, confidence: float = 0.95) -> SeedAggregate:
    """Mean over seeds, its t-interval (nan for one seed) and the sign disagreement around `centre`."""
    low, high = t_interval(values, confidence)
    above, below = any(v > centre for v in values), any(v < centre for v in values)
    return SeedAggregate(sum(values) / len(values), low, high, len(values), above and below)


def cell(values: list[dict | None], fmt: str) -> str:
    """One table cell over runs: a single run shows its 95% interval, several seeds their mean and t-interval."""
    present = [v for v in values if v is not None]
    if not present:
        return "–"
    if len(present) == 1:
        v = present[0]
        ci = v.get("ci")
        interval = f" [{fmt.format(ci[0])}, {fmt.format(ci[1])}]" if ci else ""
        return v.get("label", "") + fmt.format(v["mean"]) + interval
    labels = {v.get("label", "") for v in present}  # the MC letter: shown when every seed picks the same one
    agg = aggregate([v["mean"] for v in present])
    return (f"{labels.pop() if len(labels) == 1 else ''}{fmt.format(agg.mean)} [{fmt.format(agg.low)}, "
            f"{fmt.format(agg.high)}] (n={agg.n} seeds)")


def by_recipe(runs: list[RunData]) -> dict[str, list[RunData]]:
    """The runs of each recipe: the seeds that are folded together."""
    groups: dict[str, list[RunData]] = {}
    for run in runs:
        groups.setdefault(run.recipe, []).append(run)
    return groups


def row_label(recipe: str, name: str, groups: dict) -> str:
    return name if len(groups) == 1 else f"{recipe}: {name}"


def results_table(runs: list[RunData]) -> tuple[list[str], list[list[str]]]:
    """One row per model, one column per figure that at least one model has (an eval without MC shows no MC
    columns)."""
    header, rows = ["model", *[c[0] for c in COLUMNS]], []
    groups = by_recipe(runs)
    for recipe, members in groups.items():
        for model in dict.fromkeys(m for run in members for m in run.results):
            rows.append([row_label(recipe, model, groups), *[
                cell([lookup(run.results[model], path) if model in run.results else None for run in members], fmt)
                for _, path, fmt in COLUMNS]])
    kept = [0] + [i for i in range(1, len(header)) if any(row[i] != "–" for row in rows)]
    return [header[i] for i in kept], [[row[i] for i in kept] for row in rows]


def stage_figure(run: RunData, stage: str, metric: str) -> dict | None:
    value = run.stages.get(stage, {}).get("metrics", {}).get(metric)
    return None if value is None else {"mean": value, "ci": None}


def stages_table(runs: list[RunData]) -> tuple[list[str], list[list[str]]]:
    """The stages' own headline figures (the reward model's held-out accuracies), one row per stage, over seeds."""
    kinds = {name: done.get("kind") for run in runs for name, done in run.stages.items() if done}
    figures = [f for f in STAGE_FIGURES if any(done.get("kind") == f[1] and f[2] in done.get("metrics", {})
                                               for run in runs for done in run.stages.values())]
    rows, groups = [], by_recipe(runs)
    for recipe, members in groups.items():
        for stage in dict.fromkeys(n for run in members for n in run.stages if kinds.get(n) in {f[1] for f in figures}):
            rows.append([row_label(recipe, stage, groups), *[
                cell([stage_figure(run, stage, metric) for run in members], fmt) if kinds[stage] == kind else "–"
                for _, kind, metric, fmt in figures]])
    return ["stage", *[f[0] for f in figures]], rows


def sign_disagreements(runs: list[RunData]) -> list[str]:
    """A sentence for every model and gain on which the seeds of its recipe fall on both sides of no effect."""
    notes = []
    groups = by_recipe(runs)
    for recipe, members in groups.items():
        for model in dict.fromkeys(m for run in members for m in run.results):
            for header, path, fmt in COLUMNS:
                if header not in GAINS:
                    continue
                seeds = [(run.manifest.get("seed"), lookup(run.results[model], path)) for run in members
                         if model in run.results]
                seeds = [(seed, v["mean"]) for seed, v in seeds if v is not None]
                if len(seeds) > 1 and aggregate([v for _, v in seeds], GAINS[header]).signs_disagree:
                    each = ", ".join(f"seed {seed} {fmt.format(v)}" for seed, v in seeds)
                    notes.append(f"{row_label(recipe, model, groups)}: the seeds disagree in sign on {header} "
                                 f"({each}; no effect is {GAINS[header]:g}), so its mean is no effect the seeds "
                                 "agree on.")
    return notes


# --- plots -------------------------------------------------------------------------------------------

def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def curves_plot(runs: list[RunData], stage: str, kind: str) -> bytes | None:
    names = [n for n in CURVES.get(kind, []) if any(n in row for run in runs for row in run.metrics.get(stage, []))]
    if not names:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for run in runs:
            points = [(row["step"], row[name]) for row in run.metrics.get(stage, []) if name in row]
            if points:
                ax.plot(*zip(*points, strict=True), marker="." if len(points) < 30 else None,
                        label=run.label if len(runs) > 1 else None)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    if len(runs) > 1:
        axes[0][0].legend(fontsize=6)
    return png(fig)


def frontier_points(runs: list[RunData]) -> dict[str, list[tuple[dict, dict]]]:
    """Row label -> (KL to ref, gold reward) of each seed that evaluated it, as lookup() values (mean, interval)."""
    groups, models = by_recipe(runs), {}
    for recipe, members in groups.items():
        for run in members:
            for model, entry in run.results.items():
                reward, kl = lookup(entry, ("gen", "gold_reward")), lookup(entry, ("gen", "kl_to_ref"))
                if reward is not None and kl is not None:
                    models.setdefault(row_label(recipe, model, groups), []).append((kl, reward))
    return models


def frontier_plot(runs: list[RunData]) -> bytes | None:
    """Gold reward against KL to the reference: the DPO paper's Figure 2 in miniature (Rafailov et al. 2023), where
    PPO and each DPO beta trace a reward–KL frontier. One run: a point per model with its bootstrap interval over
    prompts. Several seeds: each seed's point, faint, and the mean over seeds with its t-interval on both axes."""
    models = frontier_points(runs)
    if not models:
        return None
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    colours = {}
    for label, seeds in models.items():
        family = label.split(": ")[-1].split("-")[0]
        colour = colours.setdefault(family, f"C{len(colours) % 10}")
        if len(seeds) == 1:
            (kl, reward), = seeds
            y, ci = reward["mean"], reward["ci"] or [reward["mean"]] * 2
            ax.errorbar([kl["mean"]], [y], yerr=[[y - ci[0]], [ci[1] - y]], fmt="o", capsize=3, color=colour)
            x = kl["mean"]
        else:
            xs, ys = [kl["mean"] for kl, _ in seeds], [reward["mean"] for _, reward in seeds]
            ax.scatter(xs, ys, s=12, alpha=0.4, color=colour)
            x_agg, y_agg = aggregate(xs), aggregate(ys)
            x, y = x_agg.mean, y_agg.mean
            ax.errorbar([x], [y], xerr=[[x - x_agg.low], [x_agg.high - x]], yerr=[[y - y_agg.low], [y_agg.high - y]],
                        fmt="o", capsize=3, color=colour)
        ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for family, colour in colours.items():
        ax.plot([], [], "o", color=colour, label=family)
    ax.set_xlabel("KL to reference (nats per sequence)")
    several = any(len(seeds) > 1 for seeds in models.values())
    ax.set_ylabel("gold reward (mean, 95% CI)" + (";\nfaint: each seed" if several else ""))
    ax.set_title("reward–KL frontier", fontsize=10)
    ax.legend(fontsize=7)
    return png(fig)


def overoptimisation_plot(runs: list[RunData], stage: str) -> bytes | None:
    """Gold and learned reward of a stage's own rollouts against sqrt(KL to the reference) along training (Gao et
    al. 2022, Fig. 1): when the policy over-optimises the learned reward, the learned reward keeps climbing while the
    gold peaks and turns down. The star marks the step where the (smoothed) gold peaked (eval.flags.gold_peak)."""
    series = [(run, [r for r in run.metrics.get(stage, []) if "objective/gold_scores" in r and "objective/kl" in r])
              for run in runs]
    series = [(run, rows) for run, rows in series if rows]
    if not series:
        return None
    fig, gold_ax = plt.subplots(figsize=(5.6, 3.8))
    proxy_ax = gold_ax.twinx()
    for i, (run, rows) in enumerate(series):
        color, suffix = f"C{i}", f" ({run.label})" if len(series) > 1 else ""
        # Runs written before objective/sqrt_kl was logged: the same number from objective/kl.
        x = [r.get("objective/sqrt_kl", math.sqrt(max(r["objective/kl"], 0.0))) for r in rows]
        gold = [r["objective/gold_scores"] for r in rows]
        gold_ax.plot(x, gold, color=color, marker=".", label=f"gold{suffix}")
        proxy_ax.plot(x, [r.get("objective/scores") for r in rows], color=color, ls="--", alpha=0.7,
                      label=f"learned reward{suffix}")
        peak = gold_peak(rows)
        if peak is not None:
            j = [r["step"] for r in rows].index(peak.peak_step)
            gold_ax.plot(x[j], gold[j], marker="*", ms=14, color=color, ls="none")
            gold_ax.annotate(f"gold peak: step {peak.peak_step}", (x[j], gold[j]), fontsize=7, xytext=(4, 6),
                             textcoords="offset points")
    gold_ax.set_xlabel("√KL to the reference (√nats per response)")
    gold_ax.set_ylabel("gold score (solid)")
    proxy_ax.set_ylabel("learned reward (dashed)")
    gold_ax.set_title(f"over-optimisation: {stage}", fontsize=10)
    handles = [h for ax in (gold_ax, proxy_ax) for h in ax.get_legend_handles_labels()[0]]
    gold_ax.legend(handles=handles, fontsize=7, loc="best")
    return png(fig)


# --- flags -------------------------------------------------------------------------------------------

def report_flags(runs: list[RunData]) -> list[tuple[str, Flag]]:
    """Every flag (eval.flags) of every run: (the run's label when there are several runs, else "", flag)."""
    out = []
    for run in runs:
        label = run.label if len(runs) > 1 else ""
        flags = result_flags(run.results, run.eval_reference)
        for stage, done in run.stages.items():
            flags += training_flags(stage, done, run.metrics.get(stage, []))
        out += [(label, flag) for flag in flags]
    return out


def judge_cells_without_evidence(table: tuple[list[str], list[list[str]]], runs: list[RunData],
                                 flags: list[tuple[str, Flag]]) -> None:
    """Replace the judge cell of a model whose judge is position-biased in every run that judged it (flag
    judge_position_bias) by what it means: a win rate of 0.500 [0.500, 0.500] from all-tie verdicts is no
    evidence, and a zero-width interval would say the opposite."""
    header, rows = table
    if "judge win rate" not in header:
        return
    column = header.index("judge win rate")
    biased = {(label, f.subject) for label, f in flags if f.rule == "judge_position_bias"}
    for row in rows:
        model = row[0]
        judged = [run for run in runs if ((run.results.get(model) or {}).get("judge"))]
        labels = [run.label if len(runs) > 1 else "" for run in judged]
        if judged and all((label, model) in biased for label in labels):
            consistency = [run.results[model]["judge"]["position_consistency"] for run in judged]
            row[column] = (f"no evidence: position consistency {max(consistency):.2f} "
                           f"(< {RULES['judge_position_bias'].thresholds['min_consistency']})")


def flag_lines(report: Report) -> list[str]:
    """The flags as sentences, each with its run when there are several."""
    return [f"{label}: {flag.text}" if label else flag.text for label, flag in report.flags]


def flag_legend(report: Report) -> str:
    """The rules that fired, with their thresholds (eval.flags.RULES)."""
    fired = dict.fromkeys(flag.rule for _, flag in report.flags)
    return "Rules (eval/flags.py): " + "; ".join(f"{name}: {RULES[name].legend}" for name in fired) + "."


def arena_table(board: dict) -> tuple[list[str], list[list[str]]]:
    """The leaderboard: rating [CI] (and style-controlled rating [CI]) and the record, best first."""
    style = any("style_rating" in row for row in board["models"])
    header = ["model", "rating [95% CI]", *(["style-controlled [95% CI]"] if style else []), "wins / ties / losses"]
    rows = []
    for r in board["models"]:
        cells = [f"{r['rating']:.0f} [{r['ci'][0]:.0f}, {r['ci'][1]:.0f}]"]
        if style:
            cells.append(f"{r['style_rating']:.0f} [{r['style_ci'][0]:.0f}, {r['style_ci'][1]:.0f}]")
        rows.append([r["model"], *cells, f"{r['wins']} / {r['ties']} / {r['losses']}"])
    return header, rows


def arena_plot(board: dict) -> bytes:
    """Ratings with their intervals, one row per model (raw, and style-controlled beside it when fitted)."""
    rows = board["models"][::-1]  # best on top
    fig, ax = plt.subplots(figsize=(5.2, 0.5 * len(rows) + 1.2))
    ys = range(len(rows))
    for key, ci, offset, label in (("rating", "ci", 0.0, "raw"),
                                   ("style_rating", "style_ci", -0.25, "style-controlled")):
        if key not in rows[0]:
            continue
        xs = [r[key] for r in rows]
        err = [[x - r[ci][0] for x, r in zip(xs, rows, strict=True)],
               [r[ci][1] - x for x, r in zip(xs, rows, strict=True)]]
        ax.errorbar(xs, [y + offset for y in ys], xerr=err, fmt="o", capsize=3, label=label)
    ax.set_yticks(list(ys), [r["model"] for r in rows], fontsize=8)
    ax.axvline(board["anchor"], color="#999", lw=0.8, ls="--")
    ax.set_xlabel(f"rating ({board['baseline']} = {board['anchor']:.0f}; 95% bootstrap CI)")
    ax.set_title(f"arena: {board['n_battles']} battles, {board['n_prompts']} prompts", fontsize=10)
    ax.legend(fontsize=7)
    return png(fig)


# --- rendering ---------------------------------------------------------------------------------------

@dataclass
class Report:
    title: str
    runs: list[RunData]
    table: tuple[list[str], list[list[str]]]
    plots: list[tuple[str, bytes]]  # (caption, png)
    samples: list[tuple[str, dict[str, str]]]  # (prompt, model -> completion)
    arena: list[tuple[str, tuple[list[str], list[list[str]]], str]] = field(default_factory=list)  # (run, table, note)
    stages_table: tuple[list[str], list[list[str]]] = ([], [])  # the stages' own figures (stages_table)
    disagreements: list[str] = field(default_factory=list)  # sign_disagreements
    flags: list[tuple[str, Flag]] = field(default_factory=list)  # (run label or "", flag): eval.flags


def build_report(run_dirs: list[Path]) -> Report:
    if not run_dirs:
        raise InputError("report: give at least one run directory (runs/<recipe>/<run-id>)")
    runs = [read_run(Path(d)) for d in expand_replicas([Path(d) for d in run_dirs])]
    plots = []
    stage_kinds = {name: done.get("kind") for run in runs for name, done in run.stages.items() if done}
    for stage, kind in stage_kinds.items():
        image = curves_plot(runs, stage, kind)
        if image:
            plots.append((f"training curves: {stage}", image))
        overoptimisation = overoptimisation_plot(runs, stage)
        if overoptimisation:
            plots.append((f"gold and learned reward against √KL: {stage}", overoptimisation))
    frontier = frontier_plot(runs)
    if frontier:
        plots.insert(0, ("reward–KL frontier", frontier))
    arenas = [(run.label, arena_table(run.arena), run.arena["note"]) for run in runs if run.arena]
    plots += [(f"arena ratings: {run.label}", arena_plot(run.arena)) for run in runs if run.arena]
    first = runs[0]
    prompts = list(dict.fromkeys(s["prompt"] for rows in first.samples.values() for s in rows))[:SAMPLES_SHOWN]
    samples = [(p, {m: next((s["completion"] for s in rows if s["prompt"] == p), "")
                    for m, rows in first.samples.items()}) for p in prompts]
    names = sorted({run.recipe for run in runs})
    table, flags = results_table(runs), report_flags(runs)
    judge_cells_without_evidence(table, runs, flags)
    return Report(title=f"alignlab report: {', '.join(names)}", runs=runs, table=table,
                  plots=plots, samples=samples, arena=arenas, stages_table=stages_table(runs),
                  disagreements=sign_disagreements(runs), flags=flags)


def to_markdown(report: Report, image_dir: Path) -> str:
    header, rows = report.table
    lines = [f"# {report.title}", "", "## Results", ""]
    if rows:
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        lines.append("No eval stage has finished in these runs.")
    lines += ["", INTERVAL_NOTE, ""] if rows else [""]
    lines += [f"- {note}" for note in report.disagreements] + ([""] if report.disagreements else [])
    stage_header, stage_rows = report.stages_table
    if stage_rows:
        lines += ["| " + " | ".join(stage_header) + " |", "|" + "---|" * len(stage_header)]
        lines += ["| " + " | ".join(r) + " |" for r in stage_rows] + [""]
    if report.flags:
        lines += ["### Flags", ""] + [f"- ⚠ {line}" for line in flag_lines(report)] + ["", flag_legend(report), ""]
    for label, (arena_header, arena_rows), note in report.arena:
        lines += [f"## Arena: {label}", "", "| " + " | ".join(arena_header) + " |", "|" + "---|" * len(arena_header)]
        lines += ["| " + " | ".join(r) + " |" for r in arena_rows] + (["", note] if note else []) + [""]
    image_dir.mkdir(parents=True, exist_ok=True)
    for i, (caption, image) in enumerate(report.plots):
        path = image_dir / f"plot-{i}.png"
        path.write_bytes(image)
        lines += [f"![{caption}]({image_dir.name}/{path.name})", ""]
    if report.samples:
        lines += ["## Sample completions", ""]
        for prompt, by_model in report.samples:
            lines += [f"**Prompt:** {prompt}", ""]
            lines += [f"- **{m}:** {c.strip()}" for m, c in by_model.items()] + [""]
    lines += ["## Runs", ""]
    for run in report.runs:
        command = " ".join(run.manifest.get("command", []))
        lines += [f"### {run.label}", "", f"- path: `{run.root}`",
                  f"- git: `{run.manifest.get('git', {}).get('commit')}`", f"- command: `{command}`",
                  "", "```yaml", run.recipe_text.rstrip(), "```", ""]
    return "\n".join(lines)


def to_html(report: Report) -> str:
    esc = html.escape
    header, rows = report.table
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(report.title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{esc(report.title)}</h1><h2>Results</h2>"]
    if rows:
        parts.append("<table class='results'><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows]
        parts.append(f"</table><p class='note'>{esc(INTERVAL_NOTE)}</p>")
    else:
        parts.append("<p>No eval stage has finished in these runs.</p>")
    parts += [f"<p class='disagree'>{esc(note)}</p>" for note in report.disagreements]
    stage_header, stage_rows = report.stages_table
    if stage_rows:
        parts.append("<table class='results'><tr>" + "".join(f"<th>{esc(h)}</th>" for h in stage_header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in stage_rows]
        parts.append("</table>")
    if report.flags:
        parts.append("<h3>Flags</h3><ul class='flags'>" + "".join(f"<li>⚠ {esc(line)}</li>"
                                                                  for line in flag_lines(report))
                     + f"</ul><p class='note'>{esc(flag_legend(report))}</p>")
    for label, (arena_header, arena_rows), note in report.arena:
        parts.append(f"<h2>Arena: {esc(label)}</h2><table class='results'><tr>"
                     + "".join(f"<th>{esc(h)}</th>" for h in arena_header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in arena_rows]
        parts.append("</table>" + (f"<p class='note'>{esc(note)}</p>" if note else ""))
    for caption, image in report.plots:
        data = base64.b64encode(image).decode()
        parts.append(f"<figure><img alt='{esc(caption)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{esc(caption)}</figcaption></figure>")
    if report.samples:
        models = list(report.samples[0][1])
        parts.append("<h2>Sample completions</h2><table class='samples'><tr><th>prompt</th>"
                     + "".join(f"<th>{esc(m)}</th>" for m in models) + "</tr>")
        parts += ["<tr><td>" + esc(p) + "</td>" + "".join(f"<td>{esc(c[m])}</td>" for m in models) + "</tr>"
                  for p, c in report.samples]
        parts.append("</table>")
    parts.append("<h2>Runs</h2>")
    for run in report.runs:
        manifest = json.dumps({k: run.manifest.get(k) for k in ("seed", "overrides", "git", "packages", "hardware",
                                                                  "command", "data")}, indent=1)
        parts.append(f"<details><summary>{esc(run.label)}: <code>{esc(str(run.root))}</code></summary>"
                     f"<h3>recipe</h3><pre>{esc(run.recipe_text)}</pre><h3>manifest</h3><pre>{esc(manifest)}</pre>"
                     "</details>")
    parts.append("</body></html>")
    return "\n".join(parts)


INTERVAL_NOTE = ("Brackets: for one run, the 95% bootstrap interval over prompts; over several seeds of a recipe, "
                 "the mean over seeds and the 95% Student-t interval over the seeds' values (n − 1 degrees of "
                 "freedom: with so few seeds a bootstrap over them is far too narrow).")

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
table.samples td { max-width: 320px; white-space: pre-wrap; }
figure { display: inline-block; margin: 0.5em; } img { max-width: 100%; }
figcaption, .note { font-size: 0.8em; color: #666; }
.disagree { color: #a33; }
ul.flags { background: #fff6e0; border-left: 4px solid #e0a000; padding: 0.6em 0.6em 0.6em 2em; }
pre { background: #f8f8f8; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
"""


def write_report(run_dirs: list[Path], output: Path) -> tuple[Path, Path]:
    """Write `output` (HTML) and its Markdown twin (same name, .md, plots in `<name>_files/`)."""
    report = build_report(run_dirs)
    markdown = output.with_suffix(".md")
    try:  # atomically, like every file of a run: a full disk leaves the old report or none, never half of one
        atomic_write_text(output, to_html(report))
        atomic_write_text(markdown, to_markdown(report, output.parent / f"{output.stem}_files"))
    except OSError as e:
        if disk_full(e, output.parent):
            raise DiskFullError(f"disk full while writing the report {output}: free space, then write it again "
                                "(alignlab report RUN... -o FILE)") from e
        raise
    return output, markdown
