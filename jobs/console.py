"""What a job says, and where: its messages go through the standard ``logging`` module
(logger ``iqray``) to stderr, a line at a time and in order whether stderr is a terminal or
a file; stdout carries only what a job prints as its result (``iqray info``'s description).

The CLI calls :func:`setup` once. Library callers keep their own logging: ``run_*``
functions take a ``log`` callable, by default :func:`log`.
"""

from __future__ import annotations

import logging
import sys

LOG = logging.getLogger("iqray")


def log(message: str) -> None:
    """One message of a job, at INFO on the ``iqray`` logger."""
    LOG.info(message)


class CurrentStderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is at each record: the CLI moves it off
    file descriptor 2 once Ray runs (see :func:`iqray.pipeline.runtime.ensure_ray`)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; always sys.stderr
        pass


def setup(verbose: bool = False) -> None:
    """iqray's messages (INFO and up; DEBUG too when ``verbose``) to stderr, one line per
    record. The root logger is left alone: other libraries' warnings reach stderr through
    Python's last-resort handler, and a host application keeps its own configuration."""
    for handler in [h for h in LOG.handlers if isinstance(h, CurrentStderr)]:
        LOG.removeHandler(handler)
    handler = CurrentStderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.DEBUG if verbose else logging.INFO)
    LOG.propagate = False


def bars(progress: bool) -> bool:
    """Whether to draw progress bars: asked for, and stderr is a terminal. In a log file
    (cron, Kubernetes, CI) a bar's carriage returns make one endless line; jobs log a line
    per step there instead."""
    return progress and sys.stderr.isatty()
