"""Run a recipe: validate everything, create the run directory, run stages in dependency order.

Works the same in one process and under `accelerate launch` (every process runs every stage; only the main
process writes run files). A done stage whose config hash is unchanged is skipped on `--resume`.

A recipe with `seeds` (or `--seeds`) runs one replica of the whole chain per seed, one after another, each a complete
run directory `RUN/seed-<seed>/` (common/runs.py); the run's own directory holds the replicas and the report over
them. In one process a replica that fails does not stop the next; the command fails at the end, naming it.
"""

from __future__ import annotations

import dataclasses
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
from common.errors import DiskFullError, InputError, ReplicasFailed
from common.runs import Run, StageContext, latest_run_id, locate_run, replica_name, resumable
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
    seeds: list[int | str] | None = None  # --seeds: one replica per seed, replacing the recipe's seed / seeds


@dataclass
class Replicas:
    """A finished multi-seed run: its directory and one complete run per seed."""

    root: Path
    runs: list[Run]


def load(recipe_path: str | Path, overrides: list[str], seeds: list[int | str] | None = None) -> tuple[Recipe, dict]:
    recipe, raw = load_recipe(recipe_path, overrides, config_classes(), seeds)
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


def run_recipe(recipe_path: str | Path, opts: RunOptions) -> Run | Replicas:
    """Run a recipe: its run for a single seed, its replicas for a recipe with `seeds`."""
    state = process_state()
    wait_for_everyone = stage_barrier(state)
    recipe, _ = load(recipe_path, opts.overrides, opts.seeds)
    raw_text = Path(recipe_path).read_text()
    if opts.stage is not None and opts.stage not in recipe.stages:
        raise InputError(f"--stage {opts.stage}: no such stage; the recipe has {', '.join(recipe.order())}")
    if recipe.seeds is not None:
        return run_replicas(recipe, recipe_path, raw_text, opts, state, wait_for_everyone)
    if opts.stage:
        check_stage_inputs(recipe, recipe_path, opts)  # before a run directory is created (or replaced)
    root = _share(state, lambda: locate_run(recipe, run_id=opts.run_id, resume=opts.resume, overwrite=opts.overwrite,
                                            output_dir=opts.output_dir))
    run = _create_run(recipe, root, raw_text, opts, state)
    run_chain(run, recipe_path, opts, state, wait_for_everyone, root.name)
    if state.is_main_process and opts.stage is None and has_eval(recipe):
        print_results([run.root], run.root / "report.html")
    return run


def run_replicas(recipe: Recipe, recipe_path: str | Path, raw_text: str, opts: RunOptions, state: PartialState,
                 wait_for_everyone: Callable[[], None]) -> Replicas:
    """Every seed's replica of the chain into ROOT/seed-<seed>/, one after another; `--resume` continues each that
    is unfinished (and starts those never begun). In one process a failing replica is logged and the next one runs;
    under a distributed launch the failure ends the launch (the other processes would wait in its collectives)."""
    replicas = recipe.replicas()
    if opts.stage:  # every replica must have the stage's inputs, checked before any directory is created (or replaced)
        for replica in replicas:
            check_stage_inputs(replica, recipe_path, opts, replica_name(replica.seed))
    root = _share(state, lambda: locate_run(recipe, run_id=opts.run_id, resume=opts.resume, overwrite=opts.overwrite,
                                            output_dir=opts.output_dir))
    runs, failed = [], {}
    for i, replica in enumerate(replicas, 1):
        name = replica_name(replica.seed)
        console.rule(f"[bold]replica {i}/{len(replicas)}: {name}")
        # A replica never begun (the run stopped before it) starts afresh, even on --resume.
        replica_opts = dataclasses.replace(opts, resume=opts.resume and (root / name).is_dir(), overwrite=False)
        try:
            run = _create_run(replica, root / name, raw_text, replica_opts, state)
            run_chain(run, recipe_path, replica_opts, state, wait_for_everyone, root.name)
            if state.is_main_process and opts.stage is None and has_eval(recipe):
                from eval.report import write_report

                write_report([run.root], run.root / "report.html")  # a replica is a complete run, report and all
            runs.append(run)
        except Exception as e:
            if state.num_processes > 1:
                raise
            failed[name] = e
            if isinstance(e, InputError | DiskFullError):
                log.error("replica %s failed: %s", name, e)
            else:
                log.exception("replica %s failed", name)
    if state.is_main_process and opts.stage is None and has_eval(recipe) and runs:
        print_results([run.root for run in runs], root / "report.html")
    if failed:
        codes = {getattr(e, "exit_code", 1) for e in failed.values()}
        reasons = "; ".join(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                            for name, e in failed.items())
        raise ReplicasFailed(f"{len(failed)} of {len(replicas)} replicas of {root} failed ({reasons}); the "
                             f"{len(runs)} finished are kept: fix the cause, then continue the failed "
                             f"ones: {run_command(recipe_path, opts, root.name, opts.stage, resume=True)}",
                             codes.pop() if len(codes) == 1 else 1)
    return Replicas(root, runs)


def has_eval(recipe: Recipe) -> bool:
    return any(stage.kind == "eval" for stage in recipe.stages.values())


def run_chain(run: Run, recipe_path: str | Path, opts: RunOptions, state: PartialState,
              wait_for_everyone: Callable[[], None], run_id: str) -> None:
    """The stages of one run (one replica) in dependency order, each seeded with the run's seed."""
    recipe = run.recipe
    targets = [opts.stage] if opts.stage else recipe.order()
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
        with resumable(run, name, resume_command(recipe_path, opts, run_id)):
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


def check_stage_inputs(recipe: Recipe, recipe_path: str | Path, opts: RunOptions, replica: str = "") -> None:
    """`--stage NAME` reads the outputs of its input stages from the run it continues (its `replica` folder, in a
    multi-seed run): refuse it when they are not done there, naming the command that runs the first of them into that
    run. A new run (no --resume) has none."""
    base = opts.output_dir or Path(recipe.output_dir)
    run_id = opts.run_id or (latest_run_id(base / recipe.name) if opts.resume else None)
    run = Run(base / recipe.name / run_id / replica, recipe) if opts.resume and run_id else None
    missing = [r for r in recipe.inputs(opts.stage) if run is None or not run.is_done(r)]
    if not missing:
        return
    if run is not None and run.root.is_dir():
        first = run_command(recipe_path, opts, run_id, stage=missing[0], resume=True)
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
    args += ["--seeds", *map(str, opts.seeds)] if opts.seeds else []
    args += ["--stage", stage] if stage else []
    args += ["--output-dir", str(opts.output_dir)] if opts.output_dir else []
    return shlex.join([*args, *(["--resume"] if resume else []), "--run-id", run_id])


def resume_command(recipe_path: str | Path, opts: RunOptions, run_id: str) -> str:
    """The command that continues this run, stage for stage."""
    return run_command(recipe_path, opts, run_id, opts.stage, resume=True)


def _share(state: PartialState, decide: Callable[[], Path]) -> Path:
    """What the main process decides (a run directory), learnt by every process; its InputError raised on all."""
    result: list = [None, None]
    if state.is_main_process:
        try:
            result = [str(decide()), None]
        except InputError as e:
            result = [None, str(e)]
    if state.num_processes > 1:
        broadcast_object_list(result)
        state.wait_for_everyone()
    path, error = result
    if error:
        raise InputError(error)
    return Path(path)


def _create_run(recipe: Recipe, root: Path, raw_text: str, opts: RunOptions, state: PartialState) -> Run:
    """The main process writes the run's header (recipe, resolved config, manifest) into `root`, which
    `locate_run` chose (and cleared, for --overwrite); the others wait for it."""
    from common.schema import to_dict

    run = Run(root, recipe)
    if state.is_main_process:
        run.write_header(raw_text, to_dict(recipe), opts.overrides, opts.resume)
    if state.num_processes > 1:
        state.wait_for_everyone()
    return run


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


def print_results(run_dirs: list[Path], report_path: Path) -> None:
    """The report over `run_dirs` (one run, or a multi-seed run's replicas: report.html and its Markdown twin) and, in
    the terminal, the headline columns of its results table: what each model gained over the reference, at what KL,
    and what it cost elsewhere; over several seeds, their mean and 95% t-interval."""
    from eval.report import SHORT_COLUMNS, read_run, results_table, sign_disagreements, write_report

    html_path, _ = write_report(run_dirs, report_path)
    runs = [read_run(d) for d in run_dirs]
    header, rows = results_table(runs)
    keep = [0, *[i for i, h in enumerate(header) if h in SHORT_COLUMNS]]
    title = "results (95% bootstrap intervals)" if len(runs) == 1 else \
        f"results over {len(runs)} seeds (mean, 95% t-interval over seeds)"
    table = Table(title=title)
    for i in keep:
        table.add_column(header[i])
    for row in rows:
        table.add_row(*[row[i] for i in keep])
    Console().print(table)
    for note in sign_disagreements(runs):
        Console().print(note)
    Console().print(f"report: {html_path}")
