"""What every pipeline job shares: resource sizing, the Ray Data stages (``model_stages``) and
the driver loop that streams rows into a job's sink.

    ray.data.from_items(shards)
      .map_batches(read_shards)                      # raw bytes, one task per shard
      .map_batches(decode_batch, num_cpus=...)       # uint8 crops, bounded work per image
      .map_batches(ModelStage, compute=ActorPoolStrategy(size=N), num_gpus=...)
    -> driver: sink.add(table) for each block (ShardWriter commits finished shards)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from iqray.pipeline import rows as R
from iqray.pipeline.exit_codes import EXIT_OK, EXIT_UNFINISHED
from iqray.pipeline.failures import StageBug, find_stage_bug
from iqray.pipeline.io.read import read_shard
from iqray.pipeline.io.shards import ReadConfig, Shard, wants_references
from iqray.pipeline.io.storage import StorageConfig, note_written
from iqray.pipeline.options import ClusterOptions, PipelineJob, StageConfig

READ_TASK_CPUS = 0.25
DECODE_TASK_CPUS = 0.5
MIN_IN_FLIGHT_BYTES = 256 * 2**20
# A decode worker holds about 220 MB (no torch) and peaks near 650 MB on images at the
# 50 MP pixel limit (decoded RGB, then converted), so 1 GiB leaves room for the batch.
DECODE_TASK_MEMORY = 2**30
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


class Sink(Protocol):
    def add(self, table: pa.Table) -> Any: ...

    def finish(self) -> None: ...

    def tally(self) -> tuple[int, Counter, int]:
        """(ok rows, error rows by kind, rows of unfinished shards) so far."""
        ...


class ErrorBudgetExceeded(RuntimeError):
    pass


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run, with what it had committed (the CLI's one line says so)."""

    def __init__(self, committed: int, total: int, skipped: int):
        super().__init__(f"{committed} of {total} shards committed by this run"
                         + (f", {skipped} were already" if skipped else ""))
        self.committed, self.total, self.skipped = committed, total, skipped


@dataclass
class RunSummary:
    rows: int = 0  # rows written this run: ok + error rows
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    shards_total: int = 0
    shards_skipped: int = 0
    shards_scored: int = 0  # shards this run set out to score (committed + unfinished)
    input_rows: int | None = None  # of the shards scored; None: some shard's count unknown
    input_rows_unknown_shards: int = 0
    unfinished: dict[str, str] = field(default_factory=dict)  # shard URL -> why
    unfinished_rows: int = 0  # their rows, where known
    unfinished_unknown_shards: int = 0  # of those, how many have no known row count
    wall_s: float = 0.0
    stage_busy_s: dict[str, float] = field(default_factory=dict)
    stage_workers: dict[str, float] = field(default_factory=dict)
    bottleneck: str = ""
    outputs: list[str] = field(default_factory=list)
    projected_s: float | None = None
    estimated_rows: int | None = None
    steady_rows_per_s: float | None = None  # after the first batch: start-up excluded
    operators: list[str] = field(default_factory=list)  # Ray Data's physical operators
    spilled_bytes: int | None = None  # object-store bytes the operators spilled to disk
    rows_per_node: dict[str, dict[str, int]] = field(default_factory=dict)  # stage -> node
    extra: dict[str, Any] = field(default_factory=dict)  # job-specific counts
    # Seconds from the run's start at which each step ended (inputs_listed, model_staged,
    # planned, ray_started, first_row, last_row, finished): where a small run's time goes.
    timeline: dict[str, float] = field(default_factory=dict)
    driver_cpu_s: dict[str, float] = field(default_factory=dict)  # the driver's CPU by then
    started_at: float = field(default_factory=time.perf_counter, repr=False)
    cpu_at_start: float = field(default_factory=time.process_time, repr=False)

    def mark(self, step: str) -> None:
        self.timeline[step] = round(time.perf_counter() - self.started_at, 3)
        self.driver_cpu_s[step] = round(time.process_time() - self.cpu_at_start, 3)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s if self.wall_s else 0.0

    @property
    def exit_code(self) -> int:
        return EXIT_UNFINISHED if self.unfinished else EXIT_OK

    def account(self, writer) -> None:
        """Counts from what the writer committed and left unfinished (its shards' rows)."""
        self.ok = writer.ok
        self.errors = dict(writer.errors)
        self.rows = self.ok + sum(self.errors.values())
        self.unfinished = writer.unfinished_urls()
        self.unfinished_rows, unknown = writer.unfinished_rows()
        self.unfinished_unknown_shards = unknown
        self.input_rows_unknown_shards = unknown + writer.unknown_size
        self.input_rows = (None if self.input_rows_unknown_shards
                           else self.rows + self.unfinished_rows)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["rows_per_s"] = round(self.rows_per_s, 2)
        out["exit_code"] = self.exit_code
        out.pop("outputs")
        out.pop("started_at")
        out.pop("cpu_at_start")
        return out

    def render(self) -> str:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())) or "none"
        inputs = ("unknown" if self.input_rows is None else str(self.input_rows))
        if self.input_rows_unknown_shards:
            inputs += f" ({self.input_rows_unknown_shards} shards of unknown row count)"
        unfinished = len(self.unfinished)
        lines = [
            f"rows {self.rows} ({self.ok} ok, {self.rows - self.ok} error: {errors}) in "
            f"{self.wall_s:.1f} s = {self.rows_per_s:.1f} rows/s",
            f"input rows of the shards scored: {inputs}",
            f"shards: {self.shards_total} total, {self.shards_scored - unfinished} scored, "
            f"{self.shards_skipped} already committed and skipped, {unfinished} unfinished",
        ]
        for url, why in self.unfinished.items():
            lines.append(f"unfinished: {url}: {why}")
        if self.unfinished:
            sizes = [f"{self.unfinished_rows} rows"] if (
                self.unfinished_rows or not self.unfinished_unknown_shards) else []
            if self.unfinished_unknown_shards:
                sizes.append(f"{self.unfinished_unknown_shards} of unknown size")
            rows = " + ".join(sizes)
            lines.append(f"{unfinished} shards ({rows}) were not committed; rerun the same "
                         "command to finish them")
        if self.stage_busy_s:
            stages = ", ".join(
                f"{name} {busy:.1f} s busy on {self.stage_workers.get(name, 1):g} workers"
                for name, busy in self.stage_busy_s.items())
            lines.append(f"stages: {stages}")
        if self.bottleneck:
            lines.append(f"bottleneck: {self.bottleneck}")
        if self.projected_s is not None:
            took = (f"{self.projected_s:.0f} s" if self.projected_s < 120 else
                    f"{self.projected_s / 60:.1f} min" if self.projected_s < 7200 else
                    f"{self.projected_s / 3600:.1f} h")
            lines.append(f"dry run: about {self.estimated_rows} rows in the whole input; "
                         f"projected {took} at this rate")
        return "\n".join(lines)


def warn_to(log):
    """A ``warn`` callback for the readers that writes to a job's log."""
    return lambda message: log(f"warning: {message}")


def plan_resources(config: StageConfig, resources: dict[str, float]) -> dict[str, Any]:
    """Size the actor pool from what the cluster has, never starving read/decode tasks."""
    cpus = float(resources.get("CPU", 0))
    gpus = float(resources.get("GPU", 0))
    use_gpu = config.device != "cpu" and gpus >= config.gpus_per_actor
    if config.device.startswith("cuda") and not use_gpu:
        raise ValueError(f"--device {config.device} but the cluster has {gpus:g} GPUs")
    if use_gpu:
        actors = config.num_actors or max(1, int(gpus // config.gpus_per_actor))
        actor_cpus = config.actor_num_cpus or (1.0 if cpus >= 8 * actors else 0.5)
    else:
        # torch spreads one CPU actor over several cores; more actors only fight over them.
        actors = config.num_actors or max(1, int(cpus // 8))
        actor_cpus = config.actor_num_cpus or min(1.0, cpus / 4)
    left = cpus - actors * actor_cpus
    if left < READ_TASK_CPUS + DECODE_TASK_CPUS:
        raise ValueError(
            f"{actors} model actors x {actor_cpus:g} CPUs leave {left:g} of {cpus:g} CPUs for "
            "read and decode tasks; the job would hang. Use fewer actors or a smaller "
            "--actor-num-cpus.")
    threads = config.model_threads or max(1, int(math.ceil(cpus / actors)))
    return {"actors": actors, "actor_cpus": actor_cpus, "use_gpu": use_gpu,
            "gpus_per_actor": config.gpus_per_actor if use_gpu else 0, "threads": threads,
            "decode_workers": left / DECODE_TASK_CPUS}


def _actor_device(config: StageConfig, plan: dict[str, Any]) -> str:
    """What an actor loads its model onto. With GPUs reserved and --device auto the actor
    takes CUDA when its process sees a device (Ray sets CUDA_VISIBLE_DEVICES) and says so
    when it falls back; --device cuda insists."""
    if not plan["use_gpu"]:
        return "cpu"
    return config.device if config.device.startswith("cuda") else "auto"


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

            if os.environ.get(PLUGINS_ENV):  # a local Ray's workers inherit it; a cluster's not
                kwargs["runtime_env"] = {"env_vars": {PLUGINS_ENV: os.environ[PLUGINS_ENV]}}
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


def read_shards(batch: dict[str, np.ndarray], read: ReadConfig, storage: StorageConfig,
                 key_columns: list[str]):
    for raw in batch["shard"]:
        shard = Shard(**json.loads(raw))
        try:
            for rows in read_shard(shard, read, storage, key_columns, on_failure="marker"):
                yield {name: R.column(values) for name, values in rows.items()}
        except Exception as exc:  # storage and bad bytes are handled inside: a bug
            raise StageBug.of("read", f"shard {shard.url}", exc) from exc


def configure_context(context, config: StageConfig, spec, plan: dict[str, Any],
                      references: bool, limit_in_flight: bool = True) -> None:
    """Block size and the in-flight bound of a Ray Data context (one dataset chain's)."""
    context.wait_for_min_actors_s = config.actor_start_timeout_s or -1
    from iqray.pipeline.decode import decoded_channels

    # Blocks of about one model batch of decoded crops: Ray Data merges a task's output up
    # to its target block size (128 MiB by default), so a whole shard would arrive at the
    # actor pool as one block, and one actor would score it while the others idle.
    channels = decoded_channels(spec.config.image_size, spec.config.fine_resize, references)
    batch_bytes = config.batch_size * channels * spec.config.image_size ** 2
    context.target_max_block_size = max(1 << 20, batch_bytes)
    if not limit_in_flight:
        return
    # Without a limit Ray Data lets reads and decodes run ahead of the model until a share
    # of the object store is full, so memory grows with the input up to that share.
    in_flight = config.max_in_flight_bytes or max(MIN_IN_FLIGHT_BYTES,
                                                  8 * plan["actors"] * batch_bytes)
    import ray

    context.execution_options.resource_limits = ray.data.ExecutionResources.for_limits(
        object_store_memory=in_flight)


def decode_task_options(config: StageConfig, spec, references: bool,
                        keep_image_bytes: bool) -> dict[str, Any]:
    """What every decode call is given, whichever executor runs it."""
    return {"image_size": spec.config.image_size, "references": references,
            "fine_resize": spec.config.fine_resize, "max_pixels": config.max_pixels,
            "timeout_s": config.decode_timeout_s, "keep_image_bytes": keep_image_bytes,
            "jpeg_on_device": config.decode == "device", "reduced": config.decode == "fast"}


def model_stages(ds, config: StageConfig, spec, plan: dict[str, Any], stage_cls: type,
                 references: bool, stage_kwargs: dict[str, Any] | None = None,
                 decode_fn=None, decode_kwargs: dict[str, Any] | None = None,
                 keep_image_bytes: bool = False):
    """``ds`` (rows as the readers make them, see :mod:`iqray.pipeline.rows`) through the
    decode tasks and the model actor pool."""
    import ray

    from iqray.pipeline.decode import decode_batch

    # Decode must stay its own stage: fused into the actor (Ray Data fuses map stages with
    # identical resource requests), it would run serially in front of the model and starve
    # it. Decode tasks reserve memory for the images they hold, which also keeps them apart.
    ds = ds.map_batches(decode_fn or decode_batch, batch_size=config.decode_batch_size,
                        num_cpus=DECODE_TASK_CPUS, memory=DECODE_TASK_MEMORY,
                        batch_format="numpy",
                        fn_kwargs={**decode_task_options(config, spec, references,
                                                         keep_image_bytes),
                                   **(decode_kwargs or {})})
    return ds.map_batches(
        stage_cls, batch_size=config.batch_size, batch_format="numpy",
        # Two batches in flight per actor: one computing, one queued. More lets the first
        # ready actor take every batch of a small input while the others idle.
        compute=ray.data.ActorPoolStrategy(size=plan["actors"], max_tasks_in_flight_per_actor=2),
        num_cpus=plan["actor_cpus"], num_gpus=plan["gpus_per_actor"],
        fn_constructor_kwargs={"spec": spec, "device": _actor_device(config, plan),
                               "threads": None if plan["use_gpu"] else plan["threads"],
                               "prompt_cache_size": config.prompt_cache_size,
                               "precision": getattr(config, "precision", "fp32"),
                               "compile": config.compile,
                               **(stage_kwargs or {})})


def execute(config: PipelineJob, ray, spec, stage_cls: type, todo: list[Shard],
            key_columns: list[str], sink: Sink, summary: RunSummary,
            stage_kwargs: dict[str, Any] | None = None, keep_image_bytes: bool = False
            ) -> None:
    """Run the stages over ``todo`` and stream every block into ``sink``: on Ray Data, or
    with ``ray`` None in this process (:mod:`iqray.pipeline.local`). Ctrl-C ends it as
    :class:`RunInterrupted`, counting the shards the sink's writer committed."""
    try:
        if ray is None:
            _execute_local(config, spec, stage_cls, todo, key_columns, sink, summary,
                           stage_kwargs, keep_image_bytes)
        else:
            _execute(config, ray, spec, stage_cls, todo, key_columns, sink, summary,
                     stage_kwargs, keep_image_bytes)
    except ErrorBudgetExceeded:
        raise
    except Exception as exc:  # a stage's bug arrives wrapped in Ray's task errors
        if hasattr(sink, "committed_count"):  # commit actors' files count as this run's
            note_written(max(0, sink.committed_count() - len(sink.writer.committed)))
        bug = find_stage_bug(exc)
        if bug is None:
            raise
        raise bug from None
    except KeyboardInterrupt as exc:
        if isinstance(exc, RunInterrupted):
            raise
        writer = getattr(sink, "writer", sink)
        committed = (sink.committed_count() if hasattr(sink, "committed_count")
                     else len(getattr(writer, "committed", ())))
        raise RunInterrupted(committed,
                             summary.shards_total - summary.shards_skipped,
                             summary.shards_skipped) from None


def _execute(config: PipelineJob, ray, spec, stage_cls: type, todo: list[Shard],
             key_columns: list[str], sink: Sink, summary: RunSummary,
             stage_kwargs: dict[str, Any] | None, keep_image_bytes: bool) -> None:
    read, storage = config.read_config(), config.storage_config()
    references = wants_references(read)
    plan = plan_resources(config, ray.cluster_resources())
    context = ray.data.DataContext.get_current()
    _disable_ray_progress_bars(context)
    configure_context(context, config, spec, plan, references)
    # A stage's StageBug reaches the driver as itself (RayTaskError.cause), not behind a
    # UserCodeException whose cause pickling drops.
    context.raise_original_map_exception = True
    items = [{"shard": json.dumps(dataclasses.asdict(s))} for s in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(read_shards, batch_size=1, num_cpus=READ_TASK_CPUS,
                        fn_kwargs={"read": read, "storage": storage,
                                   "key_columns": key_columns}, batch_format="numpy")
    limit = getattr(config, "limit", None)  # previews only
    if limit:
        ds = ds.limit(limit)
    ds = model_stages(ds, config, spec, plan, stage_cls, references, stage_kwargs,
                      keep_image_bytes=keep_image_bytes)

    _drive(ds.iter_batches(batch_size=None, batch_format="pyarrow"), config, todo, sink,
           summary)
    summary.operators = re.findall(r"Operator \d+ (.+?):", ds.stats())
    summary.spilled_bytes = _spilled_bytes(ds)
    summary.stage_workers = {"read": plan["decode_workers"], "decode": plan["decode_workers"],
                             "model": plan["actors"], "write": 1}
    _finish(config, sink, summary)


def _execute_local(config: PipelineJob, spec, stage_cls: type, todo: list[Shard],
                   key_columns: list[str], sink: Sink, summary: RunSummary,
                   stage_kwargs: dict[str, Any] | None, keep_image_bytes: bool) -> None:
    from iqray.pipeline.local import decode_threads, local_batches

    _drive(local_batches(config, spec, stage_cls, todo, key_columns, stage_kwargs,
                         keep_image_bytes), config, todo, sink, summary)
    threads = decode_threads()
    summary.operators = ["in process: read", f"decode ({threads} thread"
                         f"{'' if threads == 1 else 's'})", "model"]
    summary.stage_workers = {"read": 1, "decode": decode_threads(), "model": 1, "write": 1}
    _finish(config, sink, summary)


def _drive(tables, config: PipelineJob, todo: list[Shard], sink: Sink,
           summary: RunSummary) -> None:
    """The driver loop: every block of scored rows into the sink, with progress, per-stage
    busy time, rows per node and the error budget checked as rows arrive."""
    limit = getattr(config, "limit", None)  # previews only
    total = sum(s.estimated_rows or 0 for s in todo) or None
    if limit:
        total = min(total or limit, limit)
    progress = _progress(total, config.progress)
    busy = Counter()
    seen = 0
    nodes: dict[str, Counter] = {"decode": Counter(), "model": Counter()}
    write_s = 0.0
    first_at, first_rows = None, 0
    for table in tables:
        # --commit actors: tally rows, each standing for TALLY_ROWS rows (stage sums)
        weights = (table[R.TALLY_ROWS].to_pylist() if R.TALLY_ROWS in table.column_names
                   else None)
        rows = sum(weights) if weights is not None else table.num_rows
        if first_at is None:
            first_at, first_rows = time.perf_counter(), rows
            summary.mark("first_row")
        for stage, column in R.STAGE_SECONDS.items():
            busy[stage] += pc.sum(table[column]).as_py() or 0.0
        for stage, column in R.STAGE_NODES.items():
            if column in table.column_names:
                names = table[column].to_pylist()
                if weights is None:
                    nodes[stage].update(names)
                else:
                    for name, weight in zip(names, weights, strict=True):
                        nodes[stage][name] += weight
        seen += rows
        tick = time.perf_counter()
        sink.add(table)
        write_s += time.perf_counter() - tick
        progress.update(rows)
        check_error_budget(*sink.tally(), config.max_error_fraction, final=False)
    summary.mark("last_row")
    if first_at is not None and seen > first_rows:
        summary.steady_rows_per_s = (seen - first_rows) / max(
            time.perf_counter() - first_at, 1e-9)
    tick = time.perf_counter()
    sink.finish()
    write_s += time.perf_counter() - tick
    progress.close()
    summary.rows_per_node = {stage: dict(c) for stage, c in nodes.items() if c}
    summary.stage_busy_s = {**{k: round(v, 3) for k, v in busy.items()},
                            "write": round(write_s, 3)}


def _finish(config: PipelineJob, sink: Sink, summary: RunSummary) -> None:
    summary.bottleneck = _bottleneck(summary)
    check_error_budget(*sink.tally(), config.max_error_fraction, final=True)


def _spilled_bytes(ds) -> int | None:
    """Object-store bytes spilled to disk on the cluster while this run executed."""
    try:
        stats = ds._get_stats_summary()  # no public accessor in Ray 2.60
        return int(max(stats.global_bytes_spilled, stats.dataset_bytes_spilled))
    except Exception:  # a Ray upgrade moved it: report unknown rather than fail the job
        return None


def check_error_budget(ok: int, errors: Counter, unfinished_rows: int, limit: float,
                       final: bool) -> None:
    """The budget is over input rows: error rows, plus every row of a shard left unfinished
    (a shard that failed whole counts all its rows, not one)."""
    failed = sum(errors.values()) + unfinished_rows
    total = ok + failed
    # Judge early only once enough rows are in, so a bad first shard does not abort alone.
    if total == 0 or (not final and total < 200):
        return
    if failed / total > limit:
        kinds = [f"{k}: {v}" for k, v in errors.most_common()]
        if unfinished_rows:
            kinds.append(f"rows of unfinished shards: {unfinished_rows}")
        raise ErrorBudgetExceeded(
            f"{failed} of {total} rows failed ({failed / total:.1%}), above "
            f"--max-error-fraction {limit:g} ({', '.join(kinds)}). Committed shards are kept "
            "and unfinished ones were not committed; fix the input (or raise the limit) and "
            "rerun, or use --retry-failed after an outage.")


def _bottleneck(summary: RunSummary) -> str:
    per_worker = {name: busy / max(summary.stage_workers.get(name, 1), 1e-9)
                  for name, busy in summary.stage_busy_s.items()}
    if not per_worker:
        return ""
    name = max(per_worker, key=per_worker.get)
    return (f"{name}-bound ({per_worker[name]:.1f} s busy per {name} worker; "
            + ", ".join(f"{k} {v:.1f} s" for k, v in per_worker.items() if k != name) + ")")


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class LoggedProgress:
    """Progress as a log line every ``every_s`` seconds: what a log file (cron, Kubernetes,
    CI) can show, where a bar's carriage returns make one endless line."""

    def __init__(self, total: int | None, every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.every_s, self.clock = total, every_s, clock
        self.started = self.last = clock()
        self.done = 0

    def update(self, n: int) -> None:
        self.done += n
        now = self.clock()
        if now - self.last < self.every_s:
            return
        self.last = now
        rate = self.done / max(now - self.started, 1e-9)
        line = f"scored {self.done:,}"
        if self.total:
            line += f" of {self.total:,} images ({100 * self.done / self.total:.1f}%)"
        else:
            line += " images"
        line += f", {rate:.1f} img/s"
        if self.total and rate > 0 and self.done < self.total:
            line += f", about {_duration((self.total - self.done) / rate)} to go"
        logging.getLogger("iqray").info(line)

    def close(self) -> None:
        pass  # the run's summary follows


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _progress(total: int | None, enabled: bool):
    """A bar on a terminal; log lines where stderr is a file or a pipe."""
    if not enabled:
        return _NoProgress()
    if not sys.stderr.isatty():
        return LoggedProgress(total)
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="scoring", file=sys.stderr, dynamic_ncols=True)


