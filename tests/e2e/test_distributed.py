"""Two CPU processes (gloo) through `accelerate launch` with the shipped config: one run directory, written
by the main process, a global batch twice the per-process one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_two_process_cpu_sft(recipe_file, tmp_path):
    path, runs = recipe_file(), tmp_path / "runs"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(REPO / "recipes/accelerate/cpu-2proc.yaml"), "--main_process_port", "29631",
           "-m", "recipes.cli", "run", str(path), "--output-dir", str(runs), "--run-id", "ddp",
           "--set", "stages.sft.args.max_steps=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
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
