"""`iqray filter`: apply filter rules to `iqray score` output; optionally copy the kept rows
of the source dataset. Glue only: rules live in :mod:`iqray.pipeline.tables.filtering`."""

from __future__ import annotations

import io
import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from iqray.jobs.config import JobConfig
from iqray.jobs.console import log
from iqray.model.outputs import RunOutputs
from iqray.pipeline.io.storage import StorageConfig, join_url, write_atomic
from iqray.pipeline.tables.filtering import (
    FilterRules,
    add_relative_columns,
    apply_rules,
    cache_embeddings,
)

PASS_THROUGH = ("keep", "reason", "duplicate_of")


class FilterConfig(JobConfig, FilterRules, StorageConfig):
    """`iqray filter`: keep the rows of a score run that pass the rules."""

    input: str = Field(description="`iqray score` output (directory, glob or file; local/S3)")
    output: str = Field(description="directory for scores.parquet and summary.json")
    all_rows: bool = Field(default=False, description="write every row with keep/reason "
                           "columns instead of the kept rows only")
    join: str | None = Field(default=None, description="the source dataset the scores came "
                             "from: also write a filtered copy of its shards to OUTPUT/data")
    relative_columns: bool = Field(default=True, description="add per-prompt rank/percentile, "
                                   "dataset percentile and reference z-score columns")

    def rules(self) -> FilterRules:
        return FilterRules.model_validate(self.model_dump(include=set(FilterRules.model_fields)))


def score_columns(table: pa.Table, outputs: RunOutputs) -> list[str]:
    """Columns the filter adds or carries that belong on a joined copy: the run's outputs,
    their relative columns, and the rule columns."""
    return [c for c in table.column_names
            if c.startswith(tuple(outputs.names)) or c in PASS_THROUGH]


def run_filter(config: FilterConfig, log=log) -> dict:
    from iqray.pipeline.tables.runs import read_scores, score_metadata, table_outputs

    started = time.perf_counter()
    storage, rules = config.storage_config(), config.rules()
    metadata = score_metadata(config.input, storage)
    table = read_scores(config.input, storage)
    reference = metadata.get("score_reference")
    outputs = table_outputs(table, metadata)
    if config.relative_columns:
        table = add_relative_columns(table, reference, outputs)
    # apply_rules checks every rule against the columns first: nothing is written before.
    result, counts = apply_rules(table, rules, cache_embeddings(rules, storage), outputs)
    chosen = result if config.all_rows else result.filter(result["keep"])
    fs, _ = storage.filesystem(config.output)
    sink = io.BytesIO()
    pq.write_table(chosen, sink)
    write_atomic(fs, storage.filesystem(join_url(config.output, "scores.parquet"))[1],
                 sink.getvalue())
    joined = []
    if config.join:
        from iqray.pipeline.tables.joining import join_to_source

        kept = result.filter(result["keep"])
        joined = join_to_source(kept, config.join.rstrip("/"), join_url(config.output, "data"),
                                storage, score_columns(kept, outputs))
    summary = {"input": config.input, "model": metadata.get("model"),
               "model_identity": metadata.get("model_identity"),
               "rules": rules.model_dump(exclude_defaults=True), **counts,
               "reference": reference, "joined_files": joined,
               "seconds": round(time.perf_counter() - started, 2)}
    write_atomic(fs, storage.filesystem(join_url(config.output, "summary.json"))[1],
                 (json.dumps(summary, indent=2) + "\n").encode())
    log(f"kept {counts['kept']} of {counts['rows']} rows"
        + "".join(f"; {rule}: -{n}" for rule, n in counts["dropped_by_rule"].items()))
    if len(counts["groups"]) > 1:
        for group, c in counts["groups"].items():
            log(f"  {group}: kept {c['kept']}, dropped {c['dropped']}")
    if reference is None and config.relative_columns:
        log("note: the model carries no reference set, so no z-score columns "
            "(models trained with `iqray train` do)")
    log(f"wrote {join_url(config.output, 'scores.parquet')}"
        + (f" and {len(joined)} joined file(s) under {join_url(config.output, 'data')}"
           if joined else ""))
    return summary
