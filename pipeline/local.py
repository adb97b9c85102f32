"""The in-process executor: the same read, decode and model stage objects as the Ray Data
graph (:mod:`iqray.pipeline.stages`), run in the driver process. Reads happen in
the calling thread, decodes in a few threads ahead of the model (each decodes in its own
PIL-only child process, as a decode task does), and the model stage is built once here.

A small run pays no Ray start-up, actor spawn or object-store traffic: on 2 cores Ray takes
10 s or more before the first row is scored, which is most of a 200-image run. What the job
sees is the same: blocks of scored rows (Arrow tables with the columns of
:mod:`iqray.pipeline.rows`) for its sink, in order, so outputs, footers, resume, error rows
and exit codes are those of a Ray run (``tests/jobs/test_executors.py`` compares the files).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from iqray.pipeline.io.shards import Shard, wants_references
from iqray.pipeline.stages import shard_table

# Up to this many input rows `--executor auto` runs in process (where no cluster is joined).
# Measured on 2 cores (benchmarks/cpu-2core/small_run*.json, fresh processes, start to
# exit): 200 / 1,000 / 2,000 AGIQA-3K images take 9.1 / 25.1 / 35.9 s here against
# 20.8 / 34.6 / 48.9 s on Ray: the same throughput once running, less Ray's ~12 s start.
# Past this size a machine with more cores gains from Ray's parallel decode tasks (this
# process decodes in at most 4 threads), and a run long enough to matter gains from Ray's
# bounded object store and progress across nodes.
LOCAL_MAX_ROWS = 2000


# Options that only mean something to Ray: a run given one is meant for Ray.
RAY_OPTIONS = ("ray_address", "ray_num_cpus", "object_store_memory", "num_actors",
               "actor_num_cpus", "max_in_flight_bytes")


def choose_executor(config, todo: list[Shard]) -> str:
    """``--executor`` as given, or for ``auto``: local for a small input on this machine
    (every shard's row count known, at most :data:`LOCAL_MAX_ROWS` in all, no cluster to
    join, no Ray option or commit actors asked for), else Ray."""
    executor = getattr(config, "executor", "ray")
    if executor == "local" and getattr(config, "commit", "driver") == "actors":
        raise ValueError("--commit actors runs commit actors on Ray: it needs --executor ray")
    if executor != "auto":
        return executor
    if os.environ.get("RAY_ADDRESS") or getattr(config, "commit", "driver") == "actors" or \
            any(getattr(config, name, None) is not None for name in RAY_OPTIONS):
        return "ray"
    sizes = [s.estimated_rows for s in todo]
    return "local" if None not in sizes and sum(sizes) <= LOCAL_MAX_ROWS else "ray"


def decode_threads() -> int:
    """Decode threads beside the model: one core is the model's (torch spreads it over the
    rest when they idle)."""
    return max(1, min(4, (os.cpu_count() or 1) - 1))


def to_table(batch: dict[str, np.ndarray]) -> pa.Table:
    """A stage's numpy batch as the Arrow table Ray Data would hand the driver: object
    columns as their values' type (None stays null), vectors as fixed-size lists."""
    columns = {}
    for name, values in batch.items():
        if values.dtype == object:
            columns[name] = pa.array(values.tolist())
        elif values.ndim > 1:
            flat = pa.array(np.ascontiguousarray(values).reshape(-1))
            columns[name] = pa.FixedSizeListArray.from_arrays(
                flat, int(np.prod(values.shape[1:])))
        else:
            columns[name] = pa.array(values)
    return pa.table(columns)


def _chunks(batch: dict[str, np.ndarray], size: int) -> Iterator[dict[str, np.ndarray]]:
    count = len(next(iter(batch.values()))) if batch else 0
    for start in range(0, count, size):
        yield {name: values[start:start + size] for name, values in batch.items()}


def local_batches(config, spec, stage_cls: type, todo: list[Shard], key_columns: list[str],
                  stage_kwargs: dict[str, Any] | None = None, keep_image_bytes: bool = False,
                  decode_options: dict[str, Any] | None = None) -> Iterator[pa.Table]:
    """Scored blocks of ``todo``'s rows, shard by shard, from the same stage objects the Ray
    graph runs (:mod:`iqray.pipeline.stages`), here in this process."""
    from iqray.pipeline.graph import model_stage
    from iqray.pipeline.planning import decode_task_options
    from iqray.pipeline.stages import Decode, ReadShards

    read, storage = config.read_config(), config.storage_config()
    options = decode_task_options(config, spec, wants_references(read), keep_image_bytes)
    options.update(decode_options or {})
    reader = ReadShards(read, storage, key_columns)
    decode = Decode(options)
    model = model_stage(config, spec, stage_cls, _device(config), config.model_threads,
                        stage_kwargs)
    limit = getattr(config, "limit", None)  # previews only

    def read_batches() -> Iterator[dict[str, np.ndarray]]:
        left = limit
        for shard in todo:
            for batch in reader.run(shard_table([shard])):
                if left is not None:
                    batch = next(_chunks(batch, left), {})
                    left -= len(next(iter(batch.values()), ()))
                yield from _chunks(batch, config.decode_batch_size)
                if left is not None and left <= 0:
                    return

    threads = decode_threads()
    with ThreadPoolExecutor(threads, thread_name_prefix="iqray-decode") as pool:
        ahead: deque = deque()
        try:
            for batch in read_batches():
                ahead.append(pool.submit(decode, batch))
                while len(ahead) > 2 * threads:  # bounded: memory does not grow with input
                    yield from _scored(model, ahead.popleft().result(), config.batch_size)
            while ahead:
                yield from _scored(model, ahead.popleft().result(), config.batch_size)
        finally:
            for future in ahead:  # Ctrl-C or a bug: nothing more is decoded
                future.cancel()


def _scored(model, decoded: dict[str, np.ndarray], batch_size: int) -> Iterator[pa.Table]:
    for batch in _chunks(decoded, batch_size):
        for out in model.run(batch):
            yield out if isinstance(out, pa.Table) else to_table(out)


def _device(config) -> str:
    """The model's device in this process: --device as given; auto takes CUDA if present."""
    if config.device != "auto":
        return config.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
