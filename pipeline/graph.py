"""The stages on Ray Data: one adapter (:func:`on_ray`) puts any
:class:`~iqray.pipeline.stages.Stage` on a dataset, as tasks or as an actor pool, and the
graph of `iqray score` is

    ray.data.from_arrow(shard records)                        # one block per shard
      .map_batches(ReadShards)   tasks, 0.25 CPU              # raw bytes
      .map_batches(Decode)       tasks, 0.5 CPU + memory      # uint8 crops, error rows
      .map_batches(Scorer)       ActorPoolStrategy(size=N), num_gpus=g

Between stages batches travel as Arrow blocks whose contract columns have their
:mod:`~iqray.pipeline.rows` types (:func:`to_block`), so a column that is None throughout a
block stays None in the next stage instead of becoming Ray's NaN.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pyarrow as pa

from iqray.pipeline import rows as R
from iqray.pipeline.execution import drive, finish
from iqray.pipeline.io.shards import Shard, wants_references
from iqray.pipeline.options import PipelineJob, StageConfig
from iqray.pipeline.planning import (
    DECODE_TASK_CPUS,
    DECODE_TASK_MEMORY,
    READ_TASK_CPUS,
    _actor_device,
    configure_context,
    decode_task_options,
    plan_resources,
)
from iqray.pipeline.runtime import _disable_ray_progress_bars
from iqray.pipeline.stages import Decode, ReadShards, Resources, Stage, shard_table


def to_block(batch: dict[str, np.ndarray] | pa.Table, from_dataset: bool = False
             ) -> pa.Table:
    """A stage's numpy output as the Arrow block Ray Data carries on: the contract's scalar
    columns with their types (:func:`rows.arrow_type`), tensors as Ray's tensor columns, a
    user's own columns as Ray Data would convert them."""
    if isinstance(batch, pa.Table):
        return batch
    from ray.data.block import BlockAccessor

    owned = R.owned_columns(from_dataset)
    untyped = [name for name, values in batch.items()
               if name not in owned or R.arrow_type(name) is None or values.ndim > 1]
    converted = BlockAccessor.batch_to_block({n: batch[n] for n in untyped}) if untyped \
        else None
    columns = []
    for name, values in batch.items():
        if name in untyped:
            columns.append(converted.column(name))
        else:
            kind = R.arrow_type(name)
            columns.append(pa.chunked_array(
                [pa.array(values.tolist() if values.dtype == object else values, kind)],
                kind))
    return pa.table(columns, names=list(batch))


def from_block(table: pa.Table) -> dict[str, np.ndarray]:
    """An Arrow block as a stage's numpy batch; a column with no value anywhere in the block
    (Arrow's null type) is None, as it was when the previous stage wrote it."""
    from ray.data.block import BlockAccessor

    batch = BlockAccessor.for_block(table).to_batch_format("numpy")
    for field in table.schema:
        if pa.types.is_null(field.type):
            batch[field.name] = np.full(table.num_rows, None, dtype=object)
    return batch


def _blocks(stage: Stage, table: pa.Table):
    batch = table if stage.batch_format == "pyarrow" else from_block(table)
    for out in stage.run(batch):
        yield to_block(out, stage.from_dataset)


class StageActor:
    """An actor of a stage's pool: ``setup()`` once, then every batch Ray Data sends."""

    def __init__(self, stage: Stage):
        self.stage = stage
        stage.setup()
        stage._ready = True

    def __call__(self, table: pa.Table):
        yield from _blocks(self.stage, table)


def on_ray(ds, stage: Stage, resources: Resources):
    """``ds.map_batches`` running ``stage`` with ``resources``: an actor pool of
    ``resources.actors`` (each holding two batches: one computing, one queued; more lets the
    first ready actor take every batch of a small input while the others idle), else tasks.
    The operator is named after the stage (``MapBatches(Scorer)``)."""
    import ray

    options: dict[str, Any] = {"batch_size": resources.batch_size, "batch_format": "pyarrow",
                               "num_cpus": resources.num_cpus}
    if resources.memory:
        options["memory"] = resources.memory
    if resources.actors:
        actor = type(stage.name, (StageActor,), {"__qualname__": stage.name})
        return ds.map_batches(
            actor, fn_constructor_kwargs={"stage": stage}, num_gpus=resources.num_gpus,
            compute=ray.data.ActorPoolStrategy(size=resources.actors,
                                               max_tasks_in_flight_per_actor=2), **options)

    def task(table: pa.Table):
        yield from _blocks(stage, table)

    task.__name__ = task.__qualname__ = stage.name
    return ds.map_batches(task, **options)


def model_stage(config: StageConfig, spec, stage_cls: type, device: str,
                threads: int | None, stage_kwargs: dict[str, Any] | None = None) -> Stage:
    """The model stage both executors run (``stage_cls``: Scorer or Embedder)."""
    return stage_cls(spec=spec, device=device, threads=threads,
                     prompt_cache_size=config.prompt_cache_size,
                     precision=getattr(config, "precision", "fp32"), compile=config.compile,
                     **(stage_kwargs or {}))


def model_stages(ds, config: StageConfig, spec, plan: dict[str, Any], stage_cls: type,
                 references: bool, stage_kwargs: dict[str, Any] | None = None,
                 user: dict[str, Any] | None = None, keep_image_bytes: bool = False):
    """``ds`` (rows as the readers make them, see :mod:`iqray.pipeline.rows`; or a user's
    rows, ``user`` saying how to read their image column) through the decode tasks and the
    model actor pool."""
    # Decode must stay its own stage: fused into the actor (Ray Data fuses map stages with
    # identical resource requests), it would run serially in front of the model and starve
    # it. Decode tasks reserve memory for the images they hold, which also keeps them apart.
    decode = Decode(decode_task_options(config, spec, references, keep_image_bytes), user)
    ds = on_ray(ds, decode, Resources(num_cpus=DECODE_TASK_CPUS, memory=DECODE_TASK_MEMORY,
                                      batch_size=config.decode_batch_size))
    stage = model_stage(config, spec, stage_cls, _actor_device(config, plan),
                        None if plan["use_gpu"] else plan["threads"], stage_kwargs)
    return on_ray(ds, stage, Resources(num_cpus=plan["actor_cpus"],
                                       num_gpus=plan["gpus_per_actor"],
                                       actors=plan["actors"], batch_size=config.batch_size))


def run_on_ray(config: PipelineJob, ray, spec, stage_cls: type, todo: list[Shard],
               key_columns: list[str], sink, summary,
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
    shards = shard_table(todo)
    ds = ray.data.from_arrow([shards.slice(i, 1) for i in range(len(todo))])
    ds = on_ray(ds, ReadShards(read, storage, key_columns),
                Resources(num_cpus=READ_TASK_CPUS, batch_size=1))
    limit = getattr(config, "limit", None)  # previews only
    if limit:
        ds = ds.limit(limit)
    ds = model_stages(ds, config, spec, plan, stage_cls, references, stage_kwargs,
                      keep_image_bytes=keep_image_bytes)

    drive(ds.iter_batches(batch_size=None, batch_format="pyarrow"), config, todo, sink,
          summary)
    summary.operators = re.findall(r"Operator \d+ (.+?):", ds.stats())
    summary.spilled_bytes = _spilled_bytes(ds)
    summary.stage_workers = {"read": plan["decode_workers"], "decode": plan["decode_workers"],
                             "model": plan["actors"], "write": 1}
    finish(config, sink, summary)


def _spilled_bytes(ds) -> int | None:
    """Object-store bytes spilled to disk on the cluster while this run executed."""
    try:
        stats = ds._get_stats_summary()  # no public accessor in Ray 2.60
        return int(max(stats.global_bytes_spilled, stats.dataset_bytes_spilled))
    except Exception:  # a Ray upgrade moved it: report unknown rather than fail the job
        return None
