"""common.allocator: after a fixed mmap threshold, freed tensors leave the resident set (glibc's default keeps them)."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Free a 16 MiB tensor (glibc then raises its mmap threshold to 16 MiB), then allocate 20 tensors of 4 MiB, each
# followed by one of 1 MiB that stays (as a step's longer-lived tensors do: the heap cannot shrink past them), free
# the 4 MiB ones and print how many MiB more than the kept tensors stay resident. Appended to what a subprocess
# ran before (here: set the threshold or not; tests/stages/test_ppo_training.py: a PPO stage).
RETAINED_MIB = """
import psutil, torch
rss = lambda: psutil.Process().memory_info().rss / 2**20
big = torch.ones(16 * 2**20 // 4)
del big
before = rss()
blocks, kept = [], []
for _ in range(20):
    blocks.append(torch.ones(4 * 2**20 // 4))
    kept.append(torch.ones(2**20 // 4))
del blocks
print(rss() - before - 20)
"""
PROBE = """
import sys
from common.allocator import return_freed_memory_to_os
if sys.argv[1] == "fixed":
    assert return_freed_memory_to_os()
""" + RETAINED_MIB


def retained_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting exists in glibc only")
def test_fixed_threshold_returns_freed_tensors_to_the_os():
    assert retained_mib("default") > 60  # the effect being fixed: freed heap blocks stay resident
    assert retained_mib("fixed") < 4
