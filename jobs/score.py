"""`iqray score`: read -> decode (CPU tasks) -> score (actor pool) -> Parquet, resumable.

The stages run on Ray (:mod:`iqray.pipeline.graph`) or in this process
(:mod:`iqray.pipeline.local`); here the model stage is :class:`~iqray.pipeline.scoring.Scorer`
and the sink a :class:`ShardWriter` that commits each shard's Parquet when its last row arrives.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from iqray.jobs.console import log
from iqray.model.registry import architecture
from iqray.model.version import iqray_version
from iqray.pipeline.execution import execute
from iqray.pipeline.io.discovery import discover_shards, inspect_input
from iqray.pipeline.io.resume import plan_resume
from iqray.pipeline.io.shards import InputColumns, Sampling, Shard, wants_references
from iqray.pipeline.io.storage import StorageConfig, check_separate
from iqray.pipeline.io.writer import ShardWriter, score_schema
from iqray.pipeline.local import choose_executor
from iqray.pipeline.options import (
    ClusterOptions,
    InputURL,
    ModeChoice,
    ModelChoice,
    OptionGroup,
    PipelineJob,
    PrecisionOptions,
    PreviewOptions,
    RunOptions,
    StageConfig,
)
from iqray.pipeline.runtime import ensure_ray
from iqray.pipeline.summary import RunSummary, warn_to


class ScoreOutput(OptionGroup):
    group_title: ClassVar[str] = "output"

    output: str = Field(description="output directory URL; one Parquet per input shard")
    keep_prompt: bool = Field(default=True, description="write the prompt column")
    keep_image_bytes: bool = Field(default=False, description="write the image bytes too")
    commit: Literal["driver", "actors"] = Field(
        default="driver", description="who writes the shard files: the driver, which gathers "
        "every row (driver), or a pool of commit actors the model actors send rows to, the "
        "driver only counting (actors: one driver no longer limits a large cluster)")


class DryRun(OptionGroup):
    group_title: ClassVar[str] = "preview"

    dry_run: bool = Field(default=False,
                          description="score a small sample and project the full run's time")
    dry_run_rows: int = Field(default=64, gt=0, description="rows a dry run scores")


class ResumeOptions(OptionGroup):
    group_title: ClassVar[str] = "resume"

    retry_failed: bool = Field(default=False,
                               description="rescore only the error rows of an earlier run")
    cache: str | None = Field(
        default=None, description="embedding cache (`iqray embed`): shards it has indexed are "
        "rescored from cached embeddings, heads only, without reading an image")


class ScoreConfig(PipelineJob, InputURL, InputColumns, Sampling, PreviewOptions, DryRun,
                  ScoreOutput, ResumeOptions, ModelChoice, ModeChoice, PrecisionOptions,
                  StageConfig, ClusterOptions, StorageConfig, RunOptions):
    """`iqray score`: score every image of INPUT and write Parquet to OUTPUT."""

    @model_validator(mode="after")
    def _no_preview_retry(self) -> ScoreConfig:
        if self.retry_failed and (self.limit or self.sample):
            raise ValueError("--retry-failed rescores a whole earlier run's errors; it does not "
                             "combine with --limit or --sample")
        return self

    def scoring_hash(self, model_identity: str) -> str:
        """What makes two outputs interchangeable: the scorer and how rows are read."""
        return self.options_hash(model_identity, {"keep_prompt", "keep_image_bytes"})


def run_score(config: ScoreConfig, log=log) -> RunSummary:
    """Everything that can be checked is checked before Ray starts (the output against the
    input, the first shard's columns, the model, resume): a mistake ends here with a
    ValueError and nothing written, and a run with nothing left to do starts no Ray."""
    summary = RunSummary()  # its clock starts here: the timeline is marked as the run goes
    read, storage = config.read_config(), config.storage_config()
    check_separate(config.input, config.output)
    storage.check_output(config.output)
    shards = discover_shards(config.input, read, storage, exclude=config.output,
                             warn=warn_to(log))
    key_columns = inspect_input(shards, read, storage, warn=warn_to(log),
                                check_paths=config.cache is None)
    summary.mark("inputs_listed")
    if config.dry_run:
        return _dry_run(config, shards, log)

    from iqray.pipeline.staging import stage_model  # no torch: a rerun with nothing to do

    spec = stage_model(config.model, storage, mode=config.mode)
    architecture(spec.config).check_can_score(spec.config)
    summary.mark("model_staged")
    fr = spec.config.full_reference
    if fr != wants_references(read):
        raise ValueError("a full-reference model needs --reference-column or "
                         "--reference-template" if fr else "--reference-column/"
                         "--reference-template given, but the model is not full-reference "
                         "(--mode fr, bpclip only)")
    if config.cache:
        architecture(spec.config).require("embedding_cache", "--cache (scoring from cached "
                                          "tower embeddings)")
    precision_check = None
    if config.precision != "fp32" and config.precision_check:
        from iqray.pipeline.scoring import check_precision

        precision_check = check_precision(spec, shards, read, storage, config.precision)
        log(f"--precision {config.precision}: Spearman against fp32 on the first "
            f"{precision_check['images']} images: " + ", ".join(
                f"{k} {v['spearman']:.4f}" for k, v in precision_check.items()
                if isinstance(v, dict)))
    decode_check = None
    if config.decode == "fast" and config.decode_check:
        from iqray.pipeline.scoring import check_decode

        decode_check = check_decode(spec, shards, read, storage)
        log(f"--decode fast: {decode_check['reduced']} of the first {decode_check['images']} "
            "images decode at reduced scale; Spearman against full decode: " + ", ".join(
                f"{k} {v['spearman']:.4f}" for k, v in decode_check.items()
                if isinstance(v, dict)))
    scoring_hash = config.scoring_hash(spec.identity)
    preview = config.limit is not None or config.sample is not None
    if preview:
        todo, done, previous = shards, [], {}
    else:
        todo, done, previous = plan_resume(shards, config.output, storage, scoring_hash,
                                           config.retry_failed)
    summary.shards_total, summary.shards_skipped = len(shards), len(done)
    summary.mark("planned")  # the fast-path gates and resume, after staging
    executor = choose_executor(config, todo)
    ray = ensure_ray(config) if todo and executor == "ray" else None
    if ray is not None:
        spec.put_files(ray.put)
        summary.mark("ray_started")
    metadata = {"model": spec.name, "model_identity": spec.identity,
                "checkpoint_sha256": spec.checkpoint_sha256,
                "score_mode": "trained" if spec.config.trained else "zero-shot",
                "iqray_version": iqray_version(), "scoring_hash": scoring_hash,
                "input": config.input,
                "score_reference": spec.config.score_reference,
                "architecture": spec.config.architecture,
                "precision": config.precision, "precision_check": precision_check,
                "decode": config.decode, "decode_check": decode_check,
                "outputs": spec.config.output_names,
                "score_range": architecture(spec.config).outputs(spec.config),
                "key_columns": key_columns}
    writer = ShardWriter(todo, config.output, storage, metadata, complete=not preview,
                         key_columns=key_columns, keep_prompt=config.keep_prompt,
                         keep_image_bytes=config.keep_image_bytes, previous=previous,
                         schema=score_schema(spec.config.output_names,
                                             spec.config.prompt_aware))
    log(f"iqray score: {len(shards)} shards in {config.input}; {len(done)} already committed, "
        f"{len(todo)} to score; model {spec.name} ({metadata['score_mode']})"
        + ("; in this process (--executor local)" if todo and ray is None else ""))
    if not preview:  # an earlier run's _SUCCESS / _UNFINISHED says nothing of this one
        writer.clear_run_records()
    from_cache = []
    if config.cache and todo and not config.keep_image_bytes and not preview:
        from iqray.pipeline.rescore import cached_shards, rescore_from_cache

        from_cache = cached_shards(todo, config.cache, storage, spec)
        todo = [s for s in todo if s not in from_cache]
        if from_cache:
            rescore_from_cache(from_cache, config.cache, storage, spec, writer, summary)
            log(f"{len(from_cache)} shards rescored from the embedding cache {config.cache}")
    if todo:
        from iqray.pipeline.scoring import Scorer

        sink, stage_kwargs = writer, None
        if config.commit == "actors":
            from iqray.pipeline.commit import CommitPool
            from iqray.pipeline.planning import plan_resources

            sink = CommitPool(writer, todo,
                              plan_resources(config, ray.cluster_resources())["actors"])
            stage_kwargs = sink.stage_kwargs()
        execute(config, ray, spec, Scorer, todo, key_columns, sink, summary,
                stage_kwargs=stage_kwargs, keep_image_bytes=config.keep_image_bytes)
    todo = todo + from_cache
    summary.shards_scored = len(todo)
    summary.account(writer)
    summary.outputs = sorted(writer.committed)  # commit order depends on timing
    summary.wall_s = time.perf_counter() - summary.started_at
    summary.mark("finished")
    if not preview:
        record = writer.write_run_record({"summary": summary.as_dict(), "model": spec.name})
        if writer.unfinished:
            log(f"{len(writer.unfinished)} shards unfinished: listed in "
                f"{config.output.rstrip('/')}/{record}")
    log(summary.render())
    return summary


def _dry_run(config: ScoreConfig, shards: list[Shard], log, show: int = 5) -> RunSummary:
    """Score the first rows into a scratch dir, show a few of their scores, project the time
    for the whole input, and remove the scratch dir."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    scratch = tempfile.mkdtemp(prefix="iqray-dry-run-")
    sample_config = config.model_copy(update={
        "dry_run": False, "limit": config.dry_run_rows, "retry_failed": False,
        "output": scratch})
    try:
        summary = run_score(sample_config, log=lambda *_: None)
        rows = pa.concat_tables([pq.read_table(p) for p in summary.outputs]) \
            if summary.outputs else None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    known = [s.estimated_rows for s in shards if s.estimated_rows is not None]
    per_shard = (sum(known) / len(known)) if known else max(summary.rows, 1)
    estimated = int(round(per_shard * len(shards)))
    rate = summary.steady_rows_per_s or summary.rows_per_s
    summary.estimated_rows = estimated
    summary.projected_s = estimated / rate if rate else None
    summary.outputs = []
    log(f"dry run on {summary.rows} rows (nothing written to {config.output})")
    if rows is not None:
        names = [n for n in ("key", *rows.schema.names) if n in rows.schema.names]
        identity = names[0] if names[0] == "key" else "source_row"
        scores = [n for n in rows.schema.names if rows.schema.field(n).type == pa.float32()]
        for row in rows.slice(0, show).to_pylist():
            values = ", ".join(f"{n} {row[n]:.3f}" for n in scores if row[n] is not None)
            log(f"  {identity} {row[identity]}: {values or row['error']}")
    log(summary.render())
    return summary
