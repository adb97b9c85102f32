"""Option groups: the small pieces every job config is composed of, each job taking only the
groups it uses (flags stay flat: ``--batch-size``, not ``--resources.batch-size``).

Each group names its ``--help`` section (``group_title``). The reading options are
:class:`~iqray.pipeline.io.shards.InputColumns` and ``Sampling``; storage is
:class:`~iqray.pipeline.io.storage.StorageConfig`; the rest are here. :class:`PipelineJob`
gives a config composed of them what the pipeline needs from it: the reading options as
plain data for Ray tasks (storage: ``StorageConfig.storage_config``), and the hash that
tells resume which outputs match.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

import iqray.model
from iqray.model.config import DEFAULT_MAX_PIXELS
from iqray.pipeline.io.shards import ReadConfig

# --help shows the groups in this order, then the job's own options.
GROUP_ORDER = ("input", "preview", "output", "resume", "labels", "model", "training",
               "resources", "cluster", "storage", "run")


class OptionGroup(BaseModel):
    model_config = ConfigDict(extra="forbid")
    group_title: ClassVar[str] = ""


class InputURL(OptionGroup):
    group_title: ClassVar[str] = "input"

    input: str = Field(description="input URL: file, directory or glob (local, s3://, gs://)")


class ModelChoice(OptionGroup):
    group_title: ClassVar[str] = "model"

    model: str = Field(default=iqray.model.DEFAULT_MODEL,
                       description="shipped model, preset name or checkpoint dir/URL")


class ModeChoice(OptionGroup):
    group_title: ClassVar[str] = "model"

    mode: Literal["nr", "fr"] | None = Field(
        default=None, description="bpclip: no-reference or full-reference (needs "
        "--reference-column or --reference-template); default: the model's own")


class PrecisionOptions(OptionGroup):
    group_title: ClassVar[str] = "model"

    precision: Literal["fp32", "int8"] = Field(
        default="fp32", description="CPU actors: int8 = dynamic quantisation of the image "
        "towers' Linear layers, gated by --precision-check")
    precision_check: bool = Field(
        default=True, description="before a --precision int8 run, score the first 32 images "
        "both ways and refuse if the ranking moves (Spearman < 0.999)")
    decode_check: bool = Field(
        default=True, description="before a --decode fast run, score the first 32 images "
        "decoded both ways and refuse if the ranking moves (Spearman < 0.999)")


class StageConfig(OptionGroup):
    """How the decode tasks and the model actor pool run: what `iqray score`, `iqray embed` and
    :func:`~iqray.pipeline.score_dataset` share."""

    group_title: ClassVar[str] = "resources"

    device: str = Field(default="auto", description="actor device: auto, cpu, cuda")
    batch_size: int = Field(default=32, gt=0, description="images per model call")
    decode_batch_size: int = Field(default=32, gt=0, description="images per decode task call")
    num_actors: int | None = Field(default=None, gt=0,
                                   description="model actors (default: from cluster resources)")
    actor_num_cpus: float | None = Field(default=None, gt=0,
                                         description="logical CPUs reserved per model actor")
    gpus_per_actor: float = Field(default=1.0, gt=0, description="GPUs per actor (fractional ok)")
    model_threads: int | None = Field(default=None, gt=0,
                                      description="torch threads per CPU actor")
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, gt=0,
                            description="refuse images with more pixels than this")
    decode_timeout_s: float = Field(
        default=10.0, gt=0, description="seconds one image may take to decode and crop; past "
        "it the decoder process is killed and the row is a timeout error row")
    prompt_cache_size: int = Field(default=4096, gt=0, description="prompts cached per actor")
    actor_start_timeout_s: float = Field(
        default=600.0, ge=0, description="wait until every model actor has loaded its model "
        "before feeding any (else the first ready actor takes the first batches and a short "
        "run never spreads); a pool that cannot start in time is an error; 0 = do not wait")
    compile: bool = Field(
        default=False, description="torch.compile the image towers in every actor (CUDA "
        "graphs on GPUs); MST-CLIPIQA, fp32 only")
    decode: Literal["cpu", "fast", "device"] = Field(
        default="cpu", description="cpu: decode tasks decode every image (PIL); fast: JPEGs "
        "at least twice the size every view needs decode at a reduced DCT scale (PIL draft; "
        "gated by --decode-check), the rest in full; device: JPEGs "
        "are decoded in the model actor on its device (torchvision decode_jpeg: nvJPEG on a "
        "GPU), so CPU cores only read and check headers; other formats and full-reference "
        "references still decode in tasks. Crops differ from PIL's by rounding (bench "
        "reports the fidelity)")
    max_in_flight_bytes: int | None = Field(
        default=None, gt=0, description="object-store bytes this job's blocks may hold in "
        "flight (read, decoded, scored); default: 8 model batches of decoded crops per actor, "
        "at least 256 MiB. Bounds memory whatever the input size; Ray Data's own default "
        "is a share of the whole object store")


class ClusterOptions(OptionGroup):
    group_title: ClassVar[str] = "cluster"

    executor: Literal["auto", "local", "ray"] = Field(
        default="auto", description="where the stages run: ray (Ray Data tasks and an actor "
        "pool), local (this process: threads read and decode, the model runs here; no Ray "
        "start-up), auto (local for up to 2000 input rows on this machine unless a Ray "
        "option or --commit actors is given, else ray)")
    ray_address: str | None = Field(default=None,
                                    description="'auto' to join a cluster; default: local Ray")
    ray_num_cpus: int | None = Field(default=None, gt=0, description="CPUs for local Ray")
    object_store_memory: int | None = Field(default=None, gt=0,
                                            description="object store bytes for local Ray")


class RunOptions(OptionGroup):
    group_title: ClassVar[str] = "run"

    max_error_fraction: float = Field(default=0.05, ge=0, le=1,
                                      description="abort when more rows than this fail")
    progress: bool = Field(default=True, description="show progress: a bar on a terminal, a "
                           "log line every 30 s where stderr is a file")


class PreviewOptions(OptionGroup):
    group_title: ClassVar[str] = "preview"

    limit: int | None = Field(default=None, gt=0, description="score only the first N rows")


class PipelineJob:
    """What the pipeline needs from a job config composed of the groups above (a mixin of
    methods: the fields are the groups')."""

    # Options that change which rows are read and how: outputs made under other values are
    # not interchangeable, so resume must not reuse them.
    READ_OPTIONS: ClassVar[frozenset[str]] = frozenset({
        "format", "image_column", "image_path_column", "prompt_column", "key_columns",
        "folder_chunk_size", "max_pixels", "reference_column", "reference_template",
        "image_root", "sidecar"})
    # Added to READ_OPTIONS after outputs were committed: hashed only when set, so those
    # outputs keep the hash they were written with.
    LATER_READ_OPTIONS: ClassVar[tuple[str, ...]] = ("reference_column", "reference_template",
                                                     "image_root", "sidecar")
    # Every option that changes what a committed row holds; each enters the resume identity
    # (options_hash; the model and --mode through the model's identity), so a rerun after
    # changing one rescores the shards it affects.
    ROW_OPTIONS: ClassVar[frozenset[str]] = READ_OPTIONS | {
        "precision", "decode", "compile", "keep_prompt", "keep_image_bytes", "dtype",
        "model", "mode"}
    # Every other option of every option group, and why it changes no output row
    # (tests/pipeline/test_options.py fails on a field in neither list).
    NOT_ROW_OPTIONS: ClassVar[dict[str, str]] = {
        "input": "each shard's URL and fingerprint (size + ETag/mtime) are its identity",
        "output": "where rows go, not what they hold",
        "read_batch_rows": "how many rows a reader hands on at once",
        "sample": "previews are committed incomplete and never taken as done",
        "seed": "previews are committed incomplete and never taken as done",
        "limit": "previews are committed incomplete and never taken as done",
        "dry_run": "a dry run commits nothing",
        "dry_run_rows": "a dry run commits nothing",
        "retry_failed": "which rows are scored again, under the same identity",
        "cache": "where cached tower embeddings live; scores from them are the model's own",
        "device": "CPU and GPU run the same fp32 model (they differ by float rounding, as "
                  "batch sizes do)",
        "batch_size": "rows are scored independently of their batch",
        "decode_batch_size": "rows are decoded independently of their batch",
        "num_actors": "scheduling", "actor_num_cpus": "scheduling",
        "gpus_per_actor": "scheduling", "model_threads": "scheduling",
        "actor_start_timeout_s": "scheduling", "max_in_flight_bytes": "scheduling",
        "prompt_cache_size": "a cache of the prompts' embeddings, recomputed when evicted",
        "decode_timeout_s": "a row that ran out of time is an error row of kind timeout; "
                            "--retry-failed scores it again",
        "precision_check": "a gate that refuses a run, never changes one",
        "decode_check": "a gate that refuses a run, never changes one",
        "commit": "who writes the files: the same rows either way",
        "ray_address": "where the work runs", "ray_num_cpus": "where the work runs",
        "executor": "where the work runs: the same stages either way",
        "object_store_memory": "where the work runs",
        "s3_endpoint": "how storage is reached", "s3_anonymous": "how storage is reached",
        "s3_max_attempts": "how storage is reached",
        "storage_attempts": "how storage is reached",
        "storage_backoff_s": "how storage is reached",
        "max_error_fraction": "when a run aborts, not what a row holds",
        "progress": "what the console shows",
        "quality_column": "labels for train and eval, which commit no scored rows",
        "alignment_column": "labels for train and eval, which commit no scored rows",
        "group_column": "labels for train and eval, which commit no scored rows",
        "group_pattern": "labels for train and eval, which commit no scored rows",
    }

    def options_hash(self, identity: str, extra: set[str] = frozenset()) -> str:
        """Short hash of the reading options (plus ``extra`` fields) and an identity."""
        relevant = self.model_dump(include=set(self.READ_OPTIONS) | set(extra))
        for later in self.LATER_READ_OPTIONS:  # unset: older hashes hold
            if later not in extra and relevant.get(later) is None:
                relevant.pop(later, None)
        relevant["identity"] = identity
        precision = getattr(self, "precision", "fp32")
        if precision != "fp32":  # other scores; fp32 keeps the hashes it always had
            relevant["precision"] = precision
        if self.decode != "cpu":  # other crops (rounding), so slightly other scores
            relevant["decode"] = self.decode
        if self.compile:  # other kernels: the same scores up to float rounding
            relevant["compile"] = True
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]

    def read_config(self) -> ReadConfig:
        """The reading options as plain data (fields this job has no group for: defaults)."""
        return ReadConfig.model_validate(self.model_dump(
            include=set(ReadConfig.model_fields) & set(type(self).model_fields)))

    def fields_of(self, config_cls: type[BaseModel], **updates: Any) -> dict[str, Any]:
        """This config's values for the fields ``config_cls`` has (to hand one job's options
        to another: clean -> score, train -> embed), with ``updates`` on top."""
        shared = set(config_cls.model_fields) & set(type(self).model_fields)
        return {**self.model_dump(include=shared), **updates}
