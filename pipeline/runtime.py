"""Ray itself: starting or joining it (``ensure_ray``), stopping a local Ray and waiting for
its processes (``stop_local_ray``, a ``/proc`` walk), and keeping Ray's own console output
(C++ log lines, Ray Data's progress bars) off a user's console."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from iqray.pipeline.options import ClusterOptions

RAY_PROGRESS_LOGGER = "ray.data._internal.progress"


class _DropProgressBarsDisabled(logging.Filter):
    """Ray Data warns "Progress bars disabled. To enable, set ..." whenever its bars are off;
    ours are off because the job shows its own bar (counting images), so the advice to turn
    them back on is wrong here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Progress bars disabled")


def _disable_ray_progress_bars(context) -> None:
    context.enable_progress_bars = False  # one bar, ours, counting images
    logger = logging.getLogger(RAY_PROGRESS_LOGGER)
    if not any(isinstance(f, _DropProgressBarsDisabled) for f in logger.filters):
        logger.addFilter(_DropProgressBarsDisabled())


_STARTED_LOCAL_RAY = False  # whether ensure_ray started a local Ray in this process


_NATIVE_STDERR_OFF_CONSOLE = [False]  # set by the CLI: see keep_native_stderr_off_console


def keep_native_stderr_off_console(enabled: bool = True) -> None:
    """Once Ray runs, send what native code writes to file descriptor 2 (Ray's C++ core
    worker: ``core_worker.cc:... Actor ... has constructor arguments ...``) to a file in
    Ray's session log folder, while Python's ``sys.stderr`` (iqray's log lines, the progress
    bar, tracebacks) stays on the console. The CLI's choice: a library caller's file
    descriptors are left alone."""
    _NATIVE_STDERR_OFF_CONSOLE[0] = enabled


def _verbose() -> bool:
    return os.environ.get("IQRAY_VERBOSE", "") not in ("", "0")


def _quiet_ray_console() -> None:
    """Ray's Python loggers keep their session files but leave the console to iqray, unless
    ``--verbose``: iqray reports failures itself, in one line."""
    if _verbose():
        return
    # Ray core's warnings (token authentication, ...) have no file handler: drop them
    logging.getLogger("ray").setLevel(logging.ERROR)
    for name in ("ray", "ray.data", "ray.serve"):
        for handler in logging.getLogger(name).handlers:
            if getattr(handler, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__,
                                                    sys.__stdout__):
                handler.setLevel(logging.CRITICAL + 1)


def _native_stderr_to_session_logs(logs: str | None) -> None:
    import io

    # Not when sys.stderr is already moved, or captured (a test, a host application).
    if not _NATIVE_STDERR_OFF_CONSOLE[0] or sys.stderr is not sys.__stderr__ or logs is None:
        return
    sys.stderr.flush()
    console = os.dup(2)
    stream = io.TextIOWrapper(os.fdopen(console, "wb", buffering=0), encoding=(
        sys.stderr.encoding or "utf-8"), errors="backslashreplace", line_buffering=True,
        write_through=True)
    _REDIRECTED.append((sys.stderr, console))
    sys.stderr = stream
    target = os.open(os.path.join(logs, "iqray-driver-stderr.log"),
                     os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(target, 2)
    os.close(target)


_REDIRECTED: list = []  # (the sys.stderr before, the console's saved descriptor)


def _native_stderr_back() -> None:
    """Undo :func:`_native_stderr_to_session_logs` once Ray is gone."""
    while _REDIRECTED:
        previous, console = _REDIRECTED.pop()
        sys.stderr.flush()
        os.dup2(console, 2)
        sys.stderr = previous


def _session_logs_dir() -> str | None:
    """Where this Ray session keeps its logs (None where Ray does not say)."""
    try:
        import ray

        return ray._private.worker.global_worker.node.get_logs_dir_path()  # no public API
    except Exception:  # noqa: BLE001 - a Ray upgrade moved it: keep the console as it is
        return None


def ensure_ray(config: ClusterOptions):
    global _STARTED_LOCAL_RAY
    import ray
    import ray.data  # configures its loggers on import; adjust them after

    # Ray Data's per-operator INFO lines drown the summary a user reads.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    _quiet_ray_console()
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "configure_logging": False}
        address = config.ray_address or os.environ.get("RAY_ADDRESS")
        if address:
            from iqray.model.registry import PLUGINS_ENV
            from iqray.pipeline.stages import CHECK_ROWS_ENV

            # A local Ray's workers inherit these; a cluster's do not.
            passed = {name: os.environ[name] for name in (PLUGINS_ENV, CHECK_ROWS_ENV)
                      if os.environ.get(name)}
            if passed:
                kwargs["runtime_env"] = {"env_vars": passed}
            ray.init(address=address, **kwargs)
        else:
            # "local" starts a fresh Ray even when another one on this machine left its
            # address behind (Ray would otherwise join that one and refuse num_cpus).
            ray.init(address="local", num_cpus=config.ray_num_cpus,
                     object_store_memory=config.object_store_memory, **kwargs)
            _STARTED_LOCAL_RAY = True
        logs = _session_logs_dir()
        _native_stderr_to_session_logs(logs)
        if logs and _verbose():
            logging.getLogger("iqray").info(f"Ray session logs: {logs}")
    return ray


def stop_local_ray() -> None:
    """Shut down the local Ray that :func:`ensure_ray` started (a joined cluster, or a Ray the
    caller started, is left alone) and wait until its processes have gone: Ray's own exit
    hook returns while workers are still exiting, and one was seen outliving the command."""
    global _STARTED_LOCAL_RAY
    if not _STARTED_LOCAL_RAY:
        return
    import ray

    ray.shutdown()
    _STARTED_LOCAL_RAY = False
    _native_stderr_back()
    deadline = time.monotonic() + 15
    while _descendants() and time.monotonic() < deadline:
        time.sleep(0.1)


def _descendants() -> list[int]:
    """Live processes below this one (from /proc; empty where there is none)."""
    parents: dict[int, int] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat") as handle:
                state, parent = handle.read().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if state != "Z":
            parents[int(entry)] = int(parent)
    found, frontier = [], {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier}
        found += frontier
    return found
