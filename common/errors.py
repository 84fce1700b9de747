"""The errors that end a command with one line on stderr instead of a traceback.

Raise `InputError` for anything the user can fix (a recipe key, a data row, a file, a model name): the CLI
prints its message as one line and exits with code 2, before any training starts when the recipe is checked.
`DiskFullError` (exit code 3) is a write that found no space; the runner raises it naming the stage and the
command that resumes the run.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# Below this many free bytes a bare RuntimeError from a write is taken for a full disk (see disk_full).
LOW_SPACE = 1 << 20


class InputError(Exception):
    """A problem with the user's input: the message names the file / row / key, what was expected and
    what to do."""

    exit_code = 2


class DiskFullError(Exception):
    """A write failed for lack of space (or quota); nothing was marked done, so `--resume` continues."""

    exit_code = 3


class ReplicasFailed(Exception):
    """Replicas of a multi-seed run failed (each logged as it did) while the others ran to the end. The exit code is
    the failures' own when they share one (2: input found wrong mid-run; 3: disk full), else 1."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def causes(error: BaseException | None) -> Iterator[BaseException]:
    """`error`, then the exception it was raised from or while handling, and so on."""
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def disk_full(error: BaseException, directory: Path) -> bool:
    """Whether `error` is a write that found no space on `directory`'s disk.

    Python's writes raise OSError(ENOSPC / EDQUOT), maybe wrapped; safetensors raises its own error with the
    OS message; torch.save raises a bare RuntimeError ("unexpected pos …"), recognised by the disk being full.
    """
    messages = tuple(os.strerror(code) for code in DISK_FULL)
    if any((isinstance(e, OSError) and e.errno in DISK_FULL) or any(m in str(e) for m in messages)
           for e in causes(error)):
        return True
    return isinstance(error, RuntimeError) and shutil.disk_usage(directory).free < LOW_SPACE


def utf8_problem(data: bytes, error: UnicodeDecodeError) -> str:
    """Where `data` stops being UTF-8, as a 1-based line and column, for a message a user can act on."""
    line = data.count(b"\n", 0, error.start) + 1
    column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
    return f"line {line}, column {column}: byte {data[error.start:error.start + 1]!r} is not valid UTF-8"
