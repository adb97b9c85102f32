"""`iqray clean`: the nightly job. Score what is new in each source, apply the filter rules to
everything scored so far, write kept/rejected manifests and a run record.

Layout under ``output``::

    scores/<source-slug>/...     one `iqray score` output per source (resumable)
    manifests/kept.parquet       rows that pass the rules (+ source, relative columns)
    manifests/rejected.parquet   rows that do not, each with the rule that dropped it
    manifests/state.json         what the manifests were built from (written last)
    runs/<UTC time>.json         one record per run: scored, skipped, kept, dropped, errors

Safe to rerun: scoring resumes per shard (committed shards are skipped, a crashed shard is
scored again from scratch) and manifests are rebuilt whole from the score files and
replaced atomically, so no row is ever written twice. When nothing was scored and the
score files, rules and model match ``state.json``, the manifests are left untouched. When a
source's run left shards unfinished, the manifests are not rebuilt from it (they would miss
those rows): the run record names the shards and the job exits 4, and a rerun finishes them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import re
import time

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from iqray.jobs.console import log
from iqray.pipeline.io.shards import InputColumns
from iqray.pipeline.io.storage import StorageConfig, join_url, write_atomic
from iqray.pipeline.options import (
    ClusterOptions,
    ModeChoice,
    ModelChoice,
    PipelineJob,
    PrecisionOptions,
    RunOptions,
    StageConfig,
)
from iqray.pipeline.tables.filtering import FilterRules


class CleanConfig(PipelineJob, InputColumns, ModelChoice, ModeChoice, PrecisionOptions,
                  StageConfig, ClusterOptions, StorageConfig, RunOptions):
    """`iqray clean`: score new shards of every source, filter, write manifests + run record."""

    sources: list[str] = Field(description="dataset URLs/globs to score (each like `iqray "
                               "score` input)")
    output: str = Field(description="root directory for scores, manifests and run records")
    rules: FilterRules = Field(default_factory=FilterRules, description="filter rules")
    keep_prompt: bool = Field(default=True, description="write the prompt column")

    @field_validator("sources")
    @classmethod
    def _some(cls, sources: list[str]) -> list[str]:
        if not sources:
            raise ValueError("give at least one source")
        slugs = [source_slug(s) for s in sources]
        if len(set(slugs)) != len(slugs):
            raise ValueError(f"two sources map to the same output folder: {slugs}")
        return sources


def source_slug(url: str) -> str:
    """A folder name for a source URL: readable, unique enough, stable across runs."""
    bare = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[-1]).strip("_.")
    digest = hashlib.sha256(url.encode()).hexdigest()[:8]
    return f"{bare[-60:]}-{digest}"


def run_clean(config: CleanConfig, log=log) -> dict:
    from iqray.jobs.score import ScoreConfig, run_score
    from iqray.pipeline.exit_codes import EXIT_OK, EXIT_UNFINISHED
    from iqray.pipeline.io.storage import check_separate
    from iqray.pipeline.tables.filtering import add_relative_columns, apply_rules, cache_embeddings
    from iqray.pipeline.tables.runs import (
        read_scores,
        score_files,
        score_metadata,
        table_outputs,
    )

    storage = config.storage_config()
    for source in config.sources:  # before anything is read or written
        check_separate(source, config.output)
    storage.check_output(config.output)
    started = time.perf_counter()
    when = dt.datetime.now(dt.timezone.utc)
    fs, _ = storage.filesystem(config.output)
    record: dict = {"started": when.isoformat(timespec="seconds"), "model": config.model,
                    "sources": {}, "rules": config.rules.model_dump(exclude_defaults=True)}
    scored_any = False
    for source in config.sources:
        output = join_url(config.output, "scores", source_slug(source))
        summary = run_score(ScoreConfig(**config.fields_of(ScoreConfig, input=source,
                                                           output=output)), log=log)
        scored_any |= summary.shards_scored > 0
        record["sources"][source] = {"output": output, "shards": summary.shards_total,
                                     "scored": summary.shards_scored,
                                     "skipped": summary.shards_skipped, "rows_scored": summary.rows,
                                     "errors": summary.errors,
                                     "unfinished": summary.unfinished}
    unfinished = {s: r["unfinished"] for s, r in record["sources"].items() if r["unfinished"]}
    if unfinished:
        record["manifests"] = ("not rebuilt: shards unfinished in "
                               + ", ".join(unfinished) + "; rerun to finish them")
        record["exit_code"] = EXIT_UNFINISHED
        log(f"iqray clean: {sum(map(len, unfinished.values()))} shards unfinished; manifests "
            "not rebuilt")
        return _write_record(fs, storage, config, when, started, record, log)

    files = {s: score_files(record["sources"][s]["output"], storage) for s in config.sources}
    state = _state(files, config, storage)
    state_url = join_url(config.output, "manifests", "state.json")
    previous = _read_json(fs, storage.filesystem(state_url)[1])
    if not scored_any and previous is not None and previous.get("state") == state:
        record["manifests"] = "unchanged: nothing new was scored"
        record.update({k: previous[k] for k in ("kept", "dropped", "dropped_by_rule")})
        log("iqray clean: nothing new; manifests unchanged")
    else:
        tables = []
        for source in config.sources:
            table = read_scores(record["sources"][source]["output"], storage)
            tables.append(table.append_column("source", pa.array([source] * table.num_rows,
                                                                 pa.string())))
        table = pa.concat_tables(tables, promote_options="default")
        metadata = score_metadata(record["sources"][config.sources[0]]["output"], storage)
        outputs = table_outputs(table, metadata)
        table = add_relative_columns(table, metadata.get("score_reference"), outputs)
        result, counts = apply_rules(table, config.rules,
                                     cache_embeddings(config.rules, storage), outputs)
        for name, rows in (("kept", result.filter(result["keep"])),
                           ("rejected", result.filter(pa.compute.invert(result["keep"])))):
            sink = io.BytesIO()
            pq.write_table(rows, sink)
            url = join_url(config.output, "manifests", f"{name}.parquet")
            write_atomic(fs, storage.filesystem(url)[1], sink.getvalue())
        record.update({k: counts[k] for k in ("kept", "dropped", "dropped_by_rule")})
        record["groups"] = counts["groups"]
        record["manifests"] = "rebuilt"
        write_atomic(fs, storage.filesystem(state_url)[1], (json.dumps(
            {"state": state, **{k: counts[k] for k in ("kept", "dropped", "dropped_by_rule")},
             "built": when.isoformat(timespec="seconds")}, indent=2) + "\n").encode())
        log(f"iqray clean: kept {counts['kept']} of {counts['rows']} rows"
            + "".join(f"; {rule}: -{n}" for rule, n in counts["dropped_by_rule"].items()))
    record["exit_code"] = EXIT_OK
    return _write_record(fs, storage, config, when, started, record, log)


def _write_record(fs, storage, config: CleanConfig, when: dt.datetime, started: float,
                  record: dict, log) -> dict:
    record["seconds"] = round(time.perf_counter() - started, 2)
    run_url = join_url(config.output, "runs", f"{when:%Y%m%dT%H%M%S.%fZ}.json")
    write_atomic(fs, storage.filesystem(run_url)[1],
                 (json.dumps(record, indent=2) + "\n").encode())
    log(f"run record: {run_url}")
    return record


def _state(files: dict[str, list[str]], config: CleanConfig, storage) -> str:
    """What the manifests depend on: every score file's footer, the rules, the model."""
    from iqray.pipeline.io.resume import footer_scoring_hash, read_output_metadata

    digest = hashlib.sha256(json.dumps(
        {"rules": config.rules.model_dump(), "model": config.model}, sort_keys=True).encode())
    for source, urls in sorted(files.items()):
        for url in urls:
            fs, path = storage.filesystem(url)
            meta = read_output_metadata(fs, path) or {}
            digest.update(f"{source}\n{url}\n{meta.get('written')}\n{meta.get('rows')}\n"
                          f"{footer_scoring_hash(meta)}\n".encode())
    return digest.hexdigest()


def _read_json(fs, path: str) -> dict | None:
    try:
        with fs.open(path, "rb") as handle:
            return json.loads(handle.read())
    except FileNotFoundError:
        return None

