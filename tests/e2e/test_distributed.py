"""Two CPU processes (gloo) through `accelerate launch` with the shipped config: one run directory, written
by the main process, a global batch twice the per-process one; and the default recipe's quick chain the same way.

The launched processes of the chain run this module (`python -m tests.e2e.test_distributed AUDIT RUNS MODULE ARGS`),
which runs MODULE and records the paths each process writes under RUNS.
"""

from __future__ import annotations

import json
import math
import os
import re
import runpy
import shutil
import sys
from pathlib import Path

import pytest

from common.tracking import read_metrics
from tests.e2e.two_process import REPO, launch_two_cpu_processes


def test_two_process_cpu_sft(recipe_file, tmp_path):
    path, runs = recipe_file(), tmp_path / "runs"
    launch_two_cpu_processes(29631, "recipes.cli", "run", str(path), "--output-dir", str(runs), "--run-id", "ddp",
                             "--set", "stages.sft.args.max_steps=2")
    run = runs / "t" / "ddp"
    assert [p.name for p in runs.joinpath("t").iterdir()] == ["ddp"]
    assert json.loads((run / "manifest.json").read_text())["hardware"]["world_size"] == 2
    rows = [json.loads(line) for line in (run / "sft" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss/train" in r]
    assert steps == [1, 2], "one process logs each step once"
    # 18 training rows shared by 2 processes: 9 each, in batches of 4, so an epoch is 3 steps (one process
    # alone would need 5): the data really is split between the processes.
    first = next(r for r in rows if "loss/train" in r)
    assert abs(first["train/epoch"] - 1 / 3) < 1e-6
    assert (run / "sft" / "done.json").is_file() and (run / "sft" / "adapter" / "adapter_model.safetensors").is_file()


QUICK_RUN = ["run", str(REPO / "recipes/configs/smollm2-135m/sentiment.yaml"), "--set", "profile=quick"]
# What a process other than the main one may write in a run directory: its own RNG state in the checkpoints (the
# Trainer's rng_state_1.pth, PPO's rng-rank1.pt) and the checkpoint folders that hold them.
OWN_RNG = re.compile(r"/checkpoints/checkpoint-\d+(/(rng_state_1\.pth|rng-rank1\.pt))?$")


def test_two_process_quick_chain(tmp_path):
    """The default recipe's quick chain under `accelerate launch` with 2 CPU processes: every stage finishes, only
    the main process writes the run, the preference sampling is shared and gathered, DPO trains on both shares."""
    from recipes.runner import RunOptions, load, run_recipe

    runs, audit = tmp_path / "runs", tmp_path / "audit"
    proc = launch_two_cpu_processes(29633, "tests.e2e.test_distributed", str(audit), str(runs), "recipes.cli",
                                    *QUICK_RUN, "--output-dir", str(runs), "--run-id", "q", timeout=600)

    run = (runs / "sentiment" / "q").resolve()  # the audit records real paths
    recipe = load(QUICK_RUN[1], ["profile=quick"])[0]
    stages = list(recipe.stages)
    assert [p.name for p in (runs / "sentiment").iterdir()] == ["q"]
    assert all((run / s / "done.json").is_file() for s in stages)
    assert not list(run.glob("*.resume-*")), "the header (recipe, resolved, manifest) is written once"
    assert json.loads((run / "manifest.json").read_text())["hardware"]["world_size"] == 2

    # One writer. Every file the processes opened for writing, renamed, created or removed under runs/ (Python's
    # audit events): the main process wrote each stage's outputs; the other nothing but its own RNG states.
    writes = [set((audit / f"writes-rank{r}.txt").read_text().splitlines()) for r in (0, 1)]
    assert {f"{run}/{s}/{f}" for s in stages for f in ("done.json", "metrics.jsonl")} <= writes[0]
    assert f"{run}/manifest.json" in writes[0]
    assert {p for p in writes[1] if not OWN_RNG.search(p)} == set(), "process 1 wrote into the run"
    assert writes[1], "the audit sees process 1 (it creates the checkpoint folders for its RNG states)"

    # Preferences: each process sampled half the completions; gathered, they are what one process samples alone
    # (the same stage, re-run in this process on a copy of the run).
    shares = sampled_shares(proc.stderr, "sampling completions")
    prompts = len((run / "prefs" / "samples.jsonl").read_text().splitlines())
    assert set(shares) == {0, 1} and all(n > 0 for n, _ in shares.values()), shares
    assert shares[0][0] + shares[1][0] == shares[0][1] == prompts * recipe.stages["prefs"].samples_per_prompt
    copy = tmp_path / "copy"
    shutil.copytree(runs, copy)
    shutil.rmtree(copy / "sentiment" / "q" / "prefs")
    run_recipe(QUICK_RUN[1], RunOptions(overrides=["profile=quick"], stage="prefs", resume=True, run_id="q",
                                        output_dir=copy))
    for name in ("samples.jsonl", "data/train.jsonl", "data/test.jsonl"):
        assert (copy / "sentiment" / "q" / "prefs" / name).read_bytes() == (run / "prefs" / name).read_bytes()

    # Eval: every process sampled a share of each model's completions (and of the KL passes); the main process
    # scored and wrote what they sampled together, which is what one process writes alone.
    for name in recipe.stages["eval"].model_names(recipe, "stages.eval"):
        shares = sampled_shares(proc.stderr, f"sampling {name}")
        assert set(shares) == {0, 1} and all(n > 0 for n, _ in shares.values()), (name, shares)
        assert shares[0][0] + shares[1][0] == shares[0][1]
    shutil.rmtree(copy / "sentiment" / "q" / "eval")
    run_recipe(QUICK_RUN[1], RunOptions(overrides=["profile=quick"], stage="eval", resume=True, run_id="q",
                                        output_dir=copy))
    alone = copy / "sentiment" / "q" / "eval"
    assert_same_results(json.loads((alone / "results.json").read_text()),
                        json.loads((run / "eval" / "results.json").read_text()))
    for samples in sorted((run / "eval").glob("*/samples.jsonl")):
        texts = [[(r["prompt"], r["completion"]) for r in map(json.loads, f.read_text().splitlines())]
                 for f in (samples, alone / samples.parent.name / "samples.jsonl")]
        assert texts[0] == texts[1], samples

    # DPO: the training pairs are split between the processes, so an epoch takes half the steps of one process:
    # ceil(ceil(pairs / 2) / per-device batch).
    pairs = json.loads((run / "prefs" / "done.json").read_text())["metrics"]["labels/train_pairs"]
    batch = recipe.stages["dpo-beta0p1"].args["per_device_train_batch_size"]
    first = next(r for r in read_metrics(run / "dpo-beta0p1" / "metrics.jsonl") if "loss/train" in r)
    steps_per_epoch = math.ceil(math.ceil(pairs / 2) / batch)
    assert first["train/epoch"] == pytest.approx(first["step"] / steps_per_epoch)
    assert steps_per_epoch < math.ceil(pairs / batch), "one process alone would need more steps per epoch"


def assert_same_results(a, b, path: str = "") -> None:
    """Two results.json trees are the same evaluation: equal but for where the models were loaded from (`source`),
    timings, and float rounding (a KL pass over other batch shapes sums its log-probs in another order: ~1e-7)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            if key != "source" and not any(word in key for word in ("seconds", "time", "perf")):
                assert_same_results(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_results(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, abs=1e-5), path
    else:
        assert a == b, path


def sampled_shares(log: str, desc: str) -> dict[int, tuple[int, int]]:
    """{process: (completions it sampled, completions in all)} from the sampler's log lines for `desc`."""
    return {int(rank): (int(n), int(total)) for n, total, rank in
            re.findall(rf"{re.escape(desc)}: sampled (\d+) of (\d+) completions on process (\d) of 2", log)}


WRITE_EVENTS = {"open", "os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def audited(audit: Path, under: Path, module: str, argv: list[str]) -> None:
    """Run `python -m module argv...`, recording in audit/writes-rankN.txt each path under `under` this process
    opened for writing, renamed (both names), created or removed: Python's audit events, which see the lab's own
    writes, json and tokenizer files, datasets and tracker files (not those written in C++ or Rust, e.g. by
    torch.save or safetensors)."""
    prefix, seen = os.path.realpath(under) + os.sep, set()

    def hook(event: str, args: tuple) -> None:
        if event not in WRITE_EVENTS:
            return
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & WRITE_FLAGS)
            paths = [path] if writing else []
        else:
            paths = args[:2] if event == "os.rename" else args[:1]
        for p in paths:
            if isinstance(p, str | bytes | os.PathLike):
                full = os.path.realpath(os.fsdecode(p))
                if full.startswith(prefix):
                    seen.add(full)

    sys.addaudithook(hook)
    sys.argv = [module, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        audit.mkdir(parents=True, exist_ok=True)
        lines = "".join(p + "\n" for p in sorted(seen))
        (audit / f"writes-rank{os.environ.get('RANK', '0')}.txt").write_text(lines)


if __name__ == "__main__":
    audited(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4:])
