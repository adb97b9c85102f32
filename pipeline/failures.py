"""Bugs, told apart from bad data and storage trouble.

Bad bytes become error rows, storage that keeps failing leaves a shard unfinished for the
next run; any other exception inside a stage is a bug: the stage raises :class:`StageBug`
naming itself, the shard or rows it was working on and what went wrong, carrying the full
traceback, and the run stops at once (exit 1; the CLI writes the traceback to a file and
names it). Never retried, never reported as an outage a rerun could cure. No Ray, no torch.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from pathlib import Path


def describe(exc: BaseException) -> str:
    """An exception in one line: its type and message, whitespace folded, at most 300
    characters of message."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


class StageBug(RuntimeError):
    """An exception no stage expects, with where it happened and its traceback. Plain
    arguments, so it crosses Ray's process boundary intact."""

    def __init__(self, stage: str, where: str, what: str, traceback_text: str = ""):
        self.stage, self.where, self.what, self.traceback_text = (stage, where, what,
                                                                  traceback_text)
        super().__init__(f"{stage} stage, {where}: {what}")

    def __reduce__(self):
        return StageBug, (self.stage, self.where, self.what, self.traceback_text)

    @classmethod
    def of(cls, stage: str, where: str, exc: BaseException) -> StageBug:
        if isinstance(exc, StageBug):
            return exc
        return cls(stage, where, describe(exc), "".join(traceback.format_exception(exc)))


def find_stage_bug(exc: BaseException) -> StageBug | None:
    """The :class:`StageBug` inside what Ray raised on the driver (``RayTaskError.cause``,
    Ray Data's ``UserCodeException`` and their causes), or None."""
    stack, seen, wrapped = [exc], set(), None
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if type(current) is StageBug:
            return current
        if isinstance(current, StageBug):  # RayTaskError(StageBug): Ray's text, the bug inside
            wrapped = wrapped or current
        stack += [getattr(current, "cause", None), current.__cause__, current.__context__]
    return wrapped


def write_traceback(job: str, text: str) -> Path:
    """Keep a bug's full traceback in a file of its own (the console gets one line)."""
    folder = Path(os.environ.get("IQRAY_TRACEBACK_DIR") or
                  Path(tempfile.gettempdir()) / "iqray-tracebacks")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{job}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    path.write_text(text)
    return path
