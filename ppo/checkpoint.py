"""PPO checkpoints: everything a resumed run needs to continue exactly where the interrupted one was.

    checkpoints/checkpoint-<step>/
      trainable.safetensors   policy (and value) adapter weights and the value head
      optimizer.pt            AdamW state          scheduler.pt   learning-rate schedule
      trainer_state.json      step, KL-controller state, guard counters
      rng-rank<r>.pt          python / numpy / torch (/ cuda) RNG states of process r

A checkpoint is written into `checkpoint-<step>.partial` by every process (each adds its RNG file) and renamed by
the main one when complete, so `latest_checkpoint` never returns half a checkpoint. The base model is not in it:
it is the recipe's, loaded the same way on resume.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from common.runs import atomic_write_json

PATTERN = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"checkpoint-{step}"


def latest_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint with the highest step (partial and set-aside ones do not match the pattern)."""
    found = [(int(m.group(1)), p) for p in root.glob("checkpoint-*") if (m := PATTERN.match(p.name)) and p.is_dir()]
    return max(found)[1] if found else None


def rng_state() -> dict[str, Any]:
    # numpy's state holds an array: kept as a tensor so the file loads with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.copy()), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, step: int, trainable: dict[str, torch.Tensor], optimizer, scheduler,
                    trainer_state: dict[str, Any], accelerator, keep: int) -> Path:
    """Write checkpoint-<step> (collective: every process calls it) and keep only the newest `keep`."""
    final = checkpoint_dir(root, step)
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        save_file(trainable, str(partial / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), partial / "optimizer.pt")
        torch.save(scheduler.state_dict(), partial / "scheduler.pt")
        atomic_write_json(partial / "trainer_state.json", trainer_state)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), partial / f"rng-rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        steps = sorted(int(m.group(1)) for p in root.iterdir() if (m := PATTERN.match(p.name)))
        for old in steps[:-keep]:
            shutil.rmtree(checkpoint_dir(root, old))
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, optimizer, scheduler, accelerator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore the optimizer, scheduler and this process's RNG; return (trainable weights, trainer state)."""
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / f"rng-rank{accelerator.process_index}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(f"{path} has no {rng_file.name}: it was written by a run with fewer processes; "
                                "resume with the same number of processes")
    set_rng_state(torch.load(rng_file, weights_only=True))
    state = json.loads((path / "trainer_state.json").read_text())
    return load_file(str(path / "trainable.safetensors")), state


def set_aside(path: Path, reason: str) -> Path:
    """Rename a checkpoint so that resume no longer picks it (it is kept, for inspection)."""
    target = path.with_name(f"{path.name}.{reason}")
    shutil.rmtree(target, ignore_errors=True)
    path.rename(target)
    return target
