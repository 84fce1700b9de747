"""Run a recipe: validate everything, create the run directory, run stages in dependency order.

Works the same in one process and under `accelerate launch` (every process runs every stage; only the main
process writes run files). A done stage whose config hash is unchanged is skipped on `--resume`.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from rich.console import Console
from rich.table import Table
from transformers import set_seed

from common.config import Recipe, load_recipe
from common.errors import InputError
from common.runs import Run, StageContext, latest_run_id, resumable
from recipes.stages import STAGE_KINDS, check_data_references, config_classes

log = logging.getLogger(__name__)
console = Console(stderr=True)

# At the end of a stage the other processes wait for the main one, which alone evaluates (the eval stage) and labels
# preference pairs: on a real model far longer than a process group's default timeout (NCCL's is 10 minutes, then
# the waiting process is aborted). They wait on a gloo group of their own with this timeout, so that a collective
# in training still fails fast on a real hang.
STAGE_WAIT = timedelta(hours=24)


@dataclass
class RunOptions:
    overrides: list[str]
    stage: str | None = None
    resume: bool = False
    run_id: str | None = None
    overwrite: bool = False
    output_dir: Path | None = None


def load(recipe_path: str | Path, overrides: list[str]) -> tuple[Recipe, dict]:
    recipe, raw = load_recipe(recipe_path, overrides, config_classes())
    check_data_references(recipe)
    return recipe, raw


def process_state() -> PartialState:
    """This process's place in a distributed launch.

    On a machine without a GPU, accelerate joins the (gloo) process group only when told `cpu=True`; every
    TrainingArguments rebuilds the shared state and reads that from ACCELERATE_USE_CPU, so set both.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    return PartialState(cpu=not torch.cuda.is_available())


def stage_barrier(state: PartialState) -> Callable[[], None]:
    """A barrier for the ends of stages, with a timeout long enough for the main process's work alone."""
    if state.num_processes == 1:
        return lambda: None
    group = torch.distributed.new_group(backend="gloo", timeout=STAGE_WAIT)
    return lambda: torch.distributed.barrier(group=group)


def run_recipe(recipe_path: str | Path, opts: RunOptions) -> Run:
    state = process_state()
    wait_for_everyone = stage_barrier(state)
    recipe, _ = load(recipe_path, opts.overrides)
    raw_text = Path(recipe_path).read_text()
    order = recipe.order()
    if opts.stage is not None and opts.stage not in recipe.stages:
        raise InputError(f"--stage {opts.stage}: no such stage; the recipe has {', '.join(order)}")

    if opts.stage:
        check_stage_inputs(recipe, recipe_path, opts)  # before a run directory is created (or replaced)
    run = _create_run(recipe, raw_text, opts, state)
    targets = [opts.stage] if opts.stage else order

    summary = []
    for i, name in enumerate(targets, 1):
        cfg = recipe.stages[name]
        if opts.resume and run.is_done(name):
            console.rule(f"[dim]stage {i}/{len(targets)}: {name} ({cfg.kind}) — done, skipped")
            summary.append((name, cfg.kind, "skipped", run.done_record(name)))
            continue
        console.rule(f"[bold]stage {i}/{len(targets)}: {name} ({cfg.kind})")
        set_seed(recipe.seed)
        started = time.time()
        with resumable(run, name, resume_command(recipe_path, opts, run.root.name)):
            ctx = StageContext(run, name, state.is_main_process, opts.resume)
            result = STAGE_KINDS[cfg.kind].train(cfg, ctx)
            result.metrics = ctx.metrics | result.metrics
            wait_for_everyone()
            if state.is_main_process:
                run.mark_done(name, result, time.time() - started)
            wait_for_everyone()  # the next stage reads this one's done.json (its outputs) on every process
        summary.append((name, cfg.kind, f"{time.time() - started:.0f} s", run.done_record(name)))
    if state.is_main_process:
        print_summary(run, summary)
        if opts.stage is None and any(recipe.stages[n].kind == "eval" for n in order):
            print_results(run)
    return run


def check_stage_inputs(recipe: Recipe, recipe_path: str | Path, opts: RunOptions) -> None:
    """`--stage NAME` reads the outputs of its input stages from the run it continues: refuse it when they are not
    done there, naming the command that runs the first of them into that run. A new run (no --resume) has none."""
    base = opts.output_dir or Path(recipe.output_dir)
    run_id = opts.run_id or (latest_run_id(base / recipe.name) if opts.resume else None)
    run = Run(base / recipe.name / run_id, recipe) if opts.resume and run_id else None
    missing = [r for r in recipe.inputs(opts.stage) if run is None or not run.is_done(r)]
    if not missing:
        return
    if run is not None and run.root.is_dir():
        first = run_command(recipe_path, opts, run.root.name, stage=missing[0], resume=True)
        raise InputError(f"--stage {opts.stage} needs stage(s) {', '.join(missing)} done in {run.root}; run them "
                         f"first: {first}")
    run_id = opts.run_id or time.strftime("%Y%m%d-%H%M%S")
    first = run_command(recipe_path, opts, run_id, stage=missing[0], resume=False)
    raise InputError(f"--stage {opts.stage} needs stage(s) {', '.join(missing)} done, and a new run has none; run "
                     f"them first: {first}, then this command with --resume --run-id {run_id}")


def run_command(recipe_path: str | Path, opts: RunOptions, run_id: str, stage: str | None, resume: bool) -> str:
    """An `alignlab run` command for this run: the same recipe, overrides (they enter the stages' config hashes)
    and output directory, for `stage` (None: every stage)."""
    args = ["alignlab", "run", str(recipe_path), *(a for o in opts.overrides for a in ("--set", o))]
    args += ["--stage", stage] if stage else []
    args += ["--output-dir", str(opts.output_dir)] if opts.output_dir else []
    return shlex.join([*args, *(["--resume"] if resume else []), "--run-id", run_id])


def resume_command(recipe_path: str | Path, opts: RunOptions, run_id: str) -> str:
    """The command that continues this run, stage for stage."""
    return run_command(recipe_path, opts, run_id, opts.stage, resume=True)


def _create_run(recipe: Recipe, raw_text: str, opts: RunOptions, state: PartialState) -> Run:
    """The main process creates (or reopens) the run directory; the others learn its id from it."""
    from common.schema import to_dict

    resolved = to_dict(recipe)
    result: list = [None, None]
    if state.is_main_process:
        try:
            run = Run.create(recipe, raw_text, resolved, opts.overrides, run_id=opts.run_id, resume=opts.resume,
                             overwrite=opts.overwrite, output_dir=opts.output_dir)
            result = [run.root.name, None]
        except InputError as e:
            result = [None, str(e)]
    if state.num_processes > 1:
        broadcast_object_list(result)
        state.wait_for_everyone()
    run_id, error = result
    if error:
        raise InputError(error)
    base = opts.output_dir or Path(recipe.output_dir)
    return Run(base / recipe.name / run_id, recipe)


def print_summary(run: Run, rows: list) -> None:
    table = Table(title=f"run {run.root}")
    for col in ("stage", "kind", "time", "key metrics"):
        table.add_column(col)
    for name, kind, took, record in rows:
        metrics = (record or {}).get("metrics", {})
        shown = ", ".join(f"{k}={v:.4g}" for k, v in list(metrics.items())[:4])
        table.add_row(name, kind, took, shown)
    Console().print(table)
    Console().print(f"outputs: {run.root}")


def print_results(run: Run) -> None:
    """The run's report (RUN/report.html and its Markdown twin) and, in the terminal, the headline columns of its
    results table: what each model gained over the reference, at what KL, and what it cost elsewhere."""
    from eval.report import SHORT_COLUMNS, read_run, results_table, write_report

    html_path, _ = write_report([run.root], run.root / "report.html")
    header, rows = results_table([read_run(run.root)])
    keep = [0, *[i for i, h in enumerate(header) if h in SHORT_COLUMNS]]
    table = Table(title="results (95% bootstrap intervals)")
    for i in keep:
        table.add_column(header[i])
    for row in rows:
        table.add_row(*[row[i] for i in keep])
    Console().print(table)
    Console().print(f"report: {html_path}")
