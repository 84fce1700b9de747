"""`alignlab` command line. Parses arguments and calls the runner; bad input exits with code 2 and one line, a full
disk with code 3 and one line (see EXIT_CODES)."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from pathlib import Path

from common.config import parse_seeds_option
from common.errors import DiskFullError, InputError, ReplicasFailed
from common.noise import quiet_library_noise
from eval import cli as eval_cli

EXIT_CODES = (f"exit codes: 0 done; {InputError.exit_code} bad input, one line on stderr (found mid-run, the run "
              f"stops resumable: fix it, then --resume); {DiskFullError.exit_code} disk full, one line (free space, "
              "then --resume); a multi-seed run whose replicas failed: their shared code (else 1) and one line "
              "naming them")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignlab", description="alignment and post-training lab", epilog=EXIT_CODES)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe (all stages, or one with --stage)", epilog=EXIT_CODES)
    run.add_argument("recipe", type=Path)
    run.add_argument("--stage", help="run only this stage (its inputs must be done in the run)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override a recipe value, e.g. --set stages.sft.args.max_steps=10 (repeatable)")
    run.add_argument("--resume", action="store_true",
                     help="continue the latest (or --run-id) run: skip done stages, resume a half-done one")
    run.add_argument("--run-id", help="name of the run directory (default: a timestamp)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    run.add_argument("--output-dir", type=Path, help="where runs go (default: the recipe's output_dir, runs/)")
    run.add_argument("--seeds", nargs="+", metavar="SEED",
                     help="one replica of the whole chain per seed, in RUN/seed-SEED/ (replaces the recipe's seed "
                          "and seeds); the report aggregates over them")

    report = sub.add_parser("report", help="compare runs: an HTML report and its Markdown twin")
    report.add_argument("runs", type=Path, nargs="+",
                        help="run directories (runs/<recipe>/<run-id>; a multi-seed run stands for its replicas)")
    report.add_argument("-o", "--output", type=Path, default=Path("report.html"))

    eval_cli.add_parsers(sub)  # eval mc | gen | contamination, judge, arena

    validate = sub.add_parser("validate", help="load and check a recipe without running it")
    validate.add_argument("recipe", type=Path)
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    quiet_library_noise()
    # Tokenizers' own thread pool fights torch for the cores and warns after forks; torch does the work.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import datasets

        from recipes import runner

        # Reading a local file takes milliseconds; its progress bars would bury an error line on stderr.
        datasets.disable_progress_bars()

        if args.command == "validate":
            recipe, _ = runner.load(args.recipe, args.overrides)
            print(f"{args.recipe}: ok ({len(recipe.stages)} stages: {' -> '.join(recipe.order())})")
            for swept, members in recipe.sweeps.items():
                print(f"  sweep {swept} -> {', '.join(members)}")
            if recipe.seeds is not None:
                print(f"  seeds {', '.join(map(str, recipe.seeds))}: one replica of the chain each")
        elif args.command == "report":
            from eval.report import write_report

            html_path, md_path = write_report(args.runs, args.output)
            print(f"report: {html_path} (Markdown: {md_path})")
        elif args.command in ("eval", "judge", "arena"):
            eval_cli.run(args)
        elif args.command == "run":
            runner.run_recipe(args.recipe, runner.RunOptions(
                overrides=args.overrides, stage=args.stage, resume=args.resume, run_id=args.run_id,
                overwrite=args.overwrite, output_dir=args.output_dir,
                seeds=parse_seeds_option(args.seeds) if args.seeds else None))
    except (InputError, DiskFullError, ReplicasFailed) as e:
        message, code = f"alignlab: error: {e}", e.exit_code
    else:
        return 0
    # A stage stopped mid-loop leaves its progress bar open, to be closed (and redrawn) when the trainer holding it
    # is collected: collect now, so that the error line comes last.
    gc.collect()
    print(message, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
