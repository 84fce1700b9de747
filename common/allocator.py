"""Keep glibc's malloc from holding on to the memory of freed tensors (CPU training).

glibc serves a request larger than its mmap threshold (128 KiB at start) with its own mmap and unmaps it on free.
But when such a block is freed, glibc raises the threshold to the block's size (the "dynamic mmap threshold",
up to 32 MiB), so the next blocks of that size come from the heap instead, and freed heap memory goes back to the
OS only when it sits at the top of the heap. A training step allocates and frees activations, logits and
gradients of a few hundred KiB to a few MiB each in a shifting order: the heap fragments, and after a forward pass
hundreds of MiB stay in the process's resident set although no tensor uses them (a PPO micro-batch's forward pass
on the embedded model: ~30 MiB in use, ~190 MiB resident).

Setting the threshold explicitly (`mallopt(M_MMAP_THRESHOLD, ...)`) switches the dynamic adjustment off: every
tensor above 128 KiB gets its own mapping and returns it on free, so the resident set follows the memory in use.
The price is a system call and fresh zeroed pages for every such tensor. PPO steps of the embedded model
(benchmarks/ppo_memory.py): peak RSS x0.76 (1790 -> 1353 MB), step time x1.67. So it is an opt-in for runs that
are short of RAM (PPO's `release_freed_memory`), not a default.

Elsewhere (not glibc: macOS, musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial value, now fixed


def return_freed_memory_to_os() -> bool:
    """Fix glibc's mmap threshold for this process (see the module docstring). True when it was set."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) != 1:
        log.warning("mallopt(M_MMAP_THRESHOLD) failed: freed tensors may stay in the resident set")
        return False
    return True
