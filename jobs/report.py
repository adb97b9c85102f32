"""`iqray report`: one self-contained HTML page about a score run. Glue only: the page is
built by :mod:`iqray.pipeline.tables.report`."""

from __future__ import annotations

from pydantic import Field, model_validator

from iqray.jobs.config import JobConfig
from iqray.jobs.console import log
from iqray.pipeline.io.shards import ReadConfig
from iqray.pipeline.io.storage import StorageConfig, write_atomic


class ReportConfig(JobConfig, StorageConfig):
    """`iqray report`: histograms, scatter, best/worst grids and errors of a score run."""

    input: str = Field(description="`iqray score` output (directory, glob or file; local/S3)")
    output: str = Field(description="HTML file to write (local or object storage)")
    per: str | None = Field(default=None, description="group column (e.g. a key column)")
    per_pattern: str | None = Field(default=None, description="regex on the key whose first "
                                    "group is the group, e.g. '^images/([^_]+)_'")
    grid_size: int = Field(default=6, gt=0, description="best and worst images per group")
    max_groups: int = Field(default=12, gt=0, description="groups shown in the image grids")
    title: str | None = Field(default=None, description="page title")
    source: str | None = Field(default=None, description="the scored dataset, to read images "
                               "back from (default: the score run's recorded input)")
    read: ReadConfig = Field(default_factory=ReadConfig,
                             description="how to read --source (as for `iqray score`)")

    @model_validator(mode="after")
    def _one_grouping(self) -> ReportConfig:
        if self.per and self.per_pattern:
            raise ValueError("give --per or --per-pattern, not both")
        return self


def run_report(config: ReportConfig, log=log) -> dict:
    from iqray.pipeline.tables.filtering import FilterRules, group_labels
    from iqray.pipeline.tables.report import build_report, grid_choice
    from iqray.pipeline.tables.runs import fetch_images, read_scores, score_metadata

    storage = config.storage_config()
    metadata = score_metadata(config.input, storage)
    table = read_scores(config.input, storage)
    if config.per and config.per not in table.column_names:
        raise ValueError(f"--per {config.per!r}: no such column; columns: "
                         f"{', '.join(table.column_names)}")
    groups = group_labels(table, FilterRules(per=config.per, per_pattern=config.per_pattern))
    chosen = grid_choice(table, groups, config.grid_size, config.max_groups, metadata)
    needed = sorted({i for sides in chosen.values() for rows in sides.values() for i in rows})
    images = fetch_images(table, needed, config.source or metadata.get("input"), config.read,
                          storage)
    page = build_report(table, groups, images, chosen, metadata,
                        config.title or f"iqray report: {config.input}")
    fs, path = storage.filesystem(config.output)
    write_atomic(fs, path, page.encode())
    log(f"wrote {config.output} ({len(page) / 1e6:.1f} MB, {table.num_rows} rows, "
        f"{len(set(groups))} group(s), {len(images)} thumbnails)")
    return {"output": config.output, "rows": table.num_rows, "groups": sorted(set(groups)),
            "thumbnails": len(images)}
