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
from common.runs import Run, StageContext, resumable
from recipes.stages import STAGE_KINDS, config_classes

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
    return load_recipe(recipe_path, overrides, config_classes())


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

    run = _create_run(recipe, raw_text, opts, state)
    targets = [opts.stage] if opts.stage else order
    if opts.stage:
        missing = [r for r in recipe.inputs(opts.stage) if not run.is_done(r)]
        if missing:
            raise InputError(f"--stage {opts.stage} needs stage(s) {', '.join(missing)} done in {run.root}; "
                             f"run them first, e.g. alignlab run {recipe_path} --stage {missing[0]} "
                             f"--resume --run-id {run.root.name}")

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
            result = STAGE_KINDS[cfg.kind].train(cfg, StageContext(run, name, state.is_main_process, opts.resume))
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


def resume_command(recipe_path: str | Path, opts: RunOptions, run_id: str) -> str:
    """The command that continues this run: the same recipe, overrides (they enter the stages' config hashes),
    stage and output directory."""
    args = ["alignlab", "run", str(recipe_path), *(a for o in opts.overrides for a in ("--set", o))]
    args += ["--stage", opts.stage] if opts.stage else []
    args += ["--output-dir", str(opts.output_dir)] if opts.output_dir else []
    return shlex.join([*args, "--resume", "--run-id", run_id])


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
