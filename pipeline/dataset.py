"""iqray as a Ray Data stage: :func:`score_dataset` adds scores to a user's own dataset.

    ds = ray.data.read_parquet("s3://bucket/gen/")          # rows with image bytes + prompt
    ds = score_dataset(ds, "iqray-small-agiqa3k", image_column="jpg", prompt_column="caption")
    ds.filter(lambda row: row["status"] == "ok").write_parquet("s3://bucket/scored/")

It appends one float32 column per model output (``model.score_range`` names them), then
``prompt_truncated``, ``image_sha256``, ``status``, ``error`` and ``error_kind``.

The same decode tasks and model actor pool as `iqray score` (:func:`graph.model_stages`),
sized the same way from ``ray.cluster_resources()``, with the same in-flight bound, OOM
split and prompt cache; what `iqray score` adds around it (shard discovery, resume, one
committed file per input shard, exit codes) is the CLI's.
"""

from __future__ import annotations

from typing import Any

import iqray.model
from iqray.pipeline import rows as R
from iqray.pipeline.graph import model_stages
from iqray.pipeline.io.storage import StorageConfig
from iqray.pipeline.options import StageConfig
from iqray.pipeline.planning import configure_context, plan_resources


def score_dataset(ds, model: str = iqray.model.DEFAULT_MODEL, *, image_column: str = "image",
                  prompt_column: str | None = None, reference_column: str | None = None,
                  image_root: str | None = None, storage: StorageConfig | None = None,
                  mode: str | None = None, batch_size: int = 32,
                  num_actors: int | None = None, device: str = "auto", **options: Any):
    """``ds`` with the model's score columns, ``image_sha256``, ``status``, ``error`` and
    ``error_kind`` appended, lazily (nothing runs until the dataset is consumed).

    ``image_column`` holds encoded image bytes, a path/URL (absolute, or relative to
    ``image_root``; read through ``storage``), a Hugging Face ``Image`` struct, or decoded
    HxWx3 (or HxW) uint8 arrays, as ``ray.data.read_images`` gives them (scored as
    ``model.score`` scores the same arrays);
    ``prompt_column`` the prompts (None: no prompts, alignment is NaN);
    ``reference_column`` the reference images of a full-reference model (``mode="fr"``).
    Every input row comes out: a row whose image cannot be read or decoded is an error row
    (``status`` ``"error"``, NaN scores, ``error`` says why). ``model`` is a shipped model,
    a preset or a checkpoint dir/URL, resolved here, before anything runs.

    ``options`` are :class:`~iqray.pipeline.options.StageConfig`'s fields (the same as
    `iqray score`'s flags of those names: ``decode_batch_size``, ``gpus_per_actor``,
    ``actor_num_cpus``, ``compile``, ``decode`` (cpu or device), ``max_in_flight_bytes``,
    ...); fp32 only, since the int8 and fast-decode gates read an input's first images.
    Sets the dataset chain's target block size (about one model batch) and, unless it
    already has one, its object-store limit, as `iqray score` does.
    """
    import ray

    from iqray.model.registry import architecture
    from iqray.pipeline.scoring import Scorer
    from iqray.pipeline.staging import stage_model

    config = StageConfig(batch_size=batch_size, num_actors=num_actors, device=device,
                         **options)
    if config.decode == "fast":  # its gate reads the input's first images: iqray score's
        raise ValueError("decode='fast' is checked against full decode on the input's first "
                         "images by iqray score; score_dataset takes 'cpu' or 'device'")
    storage = storage or StorageConfig()
    spec = stage_model(model, storage, mode=mode)
    architecture(spec.config).check_can_score(spec.config)
    references = reference_column is not None
    if spec.config.full_reference and not references:
        raise ValueError(f"{model} is full-reference: it needs reference_column")
    if references and not spec.config.full_reference:
        raise ValueError("reference_column given, but the model is not full-reference "
                         "(mode='fr', bpclip only)")
    for column, what in ((image_column, "image"), (reference_column, "reference")):
        if column is not None:
            check_image_column(ds, column, what)
    if not ray.is_initialized():
        ray.init()  # what Ray Data would do on first use; the pool is sized from it
    spec.put_files(ray.put)
    plan = plan_resources(config, ray.cluster_resources())
    limits = ds.context.execution_options.resource_limits
    already_limited = getattr(limits, "object_store_memory", None) not in (None, float("inf"))
    configure_context(ds.context, config, spec, plan, references,
                      limit_in_flight=config.max_in_flight_bytes is not None
                      or not already_limited)
    added = (*spec.config.output_names, R.PROMPT_TRUNCATED, R.IMAGE_SHA256, R.STATUS,
             R.PUBLIC_ERROR, R.PUBLIC_ERROR_KIND)
    return model_stages(
        ds, config, spec, plan, Scorer, references,
        stage_kwargs={"prompt_column": prompt_column, "public": True},
        user={"image_column": image_column, "reference_column": reference_column,
              "storage": storage, "image_root": image_root, "taken": added})



def check_image_column(ds, column: str, what: str) -> None:
    """Refuse, before anything runs and in one line, an image column that cannot hold
    images: absent, or of a type that is neither bytes, a path, a Hugging Face ``Image``
    struct nor a uint8 tensor. Only where the schema is known without running the
    dataset; otherwise each row is checked where it is decoded."""
    import pyarrow as pa

    schema = ds.schema(fetch_if_missing=False)
    if schema is None:
        return
    names = list(schema.names)
    if column not in names:
        raise ValueError(f"no {what} column {column!r} in the dataset; columns: "
                         f"{', '.join(names)}")
    kind = schema.types[names.index(column)]
    text = str(kind)
    fits = (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
            or pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or (pa.types.is_struct(kind) and {"bytes", "path"} & {f.name for f in kind})
            or ("Tensor" in text and "uint8" in text))
    if not fits:
        raise ValueError(f"the {what} column {column!r} holds {text}; score_dataset takes "
                         "encoded image bytes, paths/URLs, Hugging Face Image structs or "
                         "HxWx3 uint8 arrays (ray.data.read_images)")
