"""Sizing: how many model actors with how many CPUs and GPUs (from
``ray.cluster_resources()``, never starving the read and decode tasks), the Ray Data
context's block size and in-flight bound, and what every decode call is given."""

from __future__ import annotations

import math
from typing import Any

from iqray.pipeline.options import StageConfig

READ_TASK_CPUS = 0.25


DECODE_TASK_CPUS = 0.5


MIN_IN_FLIGHT_BYTES = 256 * 2**20


# A decode worker holds about 220 MB (no torch) and peaks near 650 MB on images at the
# 50 MP pixel limit (decoded RGB, then converted), so 1 GiB leaves room for the batch.
DECODE_TASK_MEMORY = 2**30


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
