"""What the two-process tests share: a launch under the shipped 2-process CPU config, and what a data-parallel
trainer must end with (the same adapter on both processes, and per-process RNG states in its checkpoints)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from common.tracking import read_metrics

REPO = Path(__file__).resolve().parents[2]


def launch_two_cpu_processes(port: int, *module_and_args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`accelerate launch` of `python -m MODULE ARGS...` on two CPU processes (one thread each); asserts it
    succeeded. Each test takes a port of its own so that tests can run side by side."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "recipes/accelerate/cpu-2proc.yaml"), "--main_process_port", str(port), "-m", *module_and_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_both_ranks_trained_alike(out: Path) -> None:
    """rank0/rank1.safetensors (each process's trainable weights after training) are identical, and moved away from
    start.safetensors."""
    ranks = [load_file(out / f"rank{r}.safetensors") for r in (0, 1)]
    start = load_file(out / "start.safetensors")
    assert ranks[0].keys() == start.keys() and all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    assert any(not torch.equal(ranks[0][k], start[k]) for k in start if "lora_B" in k)


def assert_stage_done_with_per_rank_rng(stage: Path) -> None:
    """A 2-step trainer stage run by the recipe runner under the launch: one metrics row a step, its adapter, and
    both processes' RNG states in the checkpoint."""
    assert [r["step"] for r in read_metrics(stage / "metrics.jsonl")] == [1, 2]
    assert (stage / "done.json").is_file() and (stage / "adapter" / "adapter_model.safetensors").is_file()
    assert {p.name for p in (stage / "checkpoints" / "checkpoint-2").glob("rng-*")} == {"rng-rank0.pt",
                                                                                      "rng-rank1.pt"}
