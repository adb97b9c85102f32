"""The stages on Ray Data: shards -> read tasks -> decode tasks -> the model actor pool, as
one lazy dataset whose blocks the driver loop (:mod:`iqray.pipeline.execution`) streams.

    ray.data.from_items(shards)
      .map_batches(read_shards)                      # raw bytes, one task per shard
      .map_batches(decode_batch, num_cpus=...)       # uint8 crops, bounded work per image
      .map_batches(ModelStage, compute=ActorPoolStrategy(size=N), num_gpus=...)
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from iqray.pipeline import rows as R
from iqray.pipeline.execution import drive, finish
from iqray.pipeline.failures import StageBug
from iqray.pipeline.io.read import read_shard
from iqray.pipeline.io.shards import ReadConfig, Shard, wants_references
from iqray.pipeline.io.storage import StorageConfig
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


def read_stage(shard: Shard, read: ReadConfig, storage: StorageConfig,
               key_columns: list[str]) -> Iterator[dict[str, np.ndarray]]:
    """One shard's rows as column batches, whichever executor runs it."""
    try:
        for rows in read_shard(shard, read, storage, key_columns, on_failure="marker"):
            yield {name: R.column(values) for name, values in rows.items()}
    except Exception as exc:  # storage and bad bytes are handled inside: a bug
        raise StageBug.of("read", f"shard {shard.url}", exc) from exc


def read_shards(batch: dict[str, np.ndarray], read: ReadConfig, storage: StorageConfig,
                key_columns: list[str]):
    """The read tasks: shards travel to them as JSON."""
    for raw in batch["shard"]:
        yield from read_stage(Shard(**json.loads(raw)), read, storage, key_columns)


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
