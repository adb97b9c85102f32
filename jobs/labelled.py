"""Labelled data for `iqray train` and `iqray eval`: a table of images with human scores (MOS),
its embeddings from the cache (embedded first if missing), its groups, and the rows as the
model's training code takes them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from pydantic import Field

from iqray.jobs.embed import CacheOptions, EmbedConfig, run_embed
from iqray.model.training import HeadData, model_heads
from iqray.pipeline.io.discovery import discover_shards
from iqray.pipeline.io.embed_cache import EmbeddingCache, shard_index
from iqray.pipeline.io.shards import InputColumns
from iqray.pipeline.io.storage import StorageConfig
from iqray.pipeline.io.tables import read_table
from iqray.pipeline.options import (
    ClusterOptions,
    InputURL,
    ModeChoice,
    ModelChoice,
    OptionGroup,
    PipelineJob,
    RunOptions,
    StageConfig,
)
from iqray.pipeline.tables.filtering import pattern_labels


class LabelColumns(OptionGroup):
    group_title: ClassVar[str] = "labels"

    quality_column: str | None = Field(default="mos_quality", description="quality MOS column")
    alignment_column: str | None = Field(default="mos_align",
                                         description="alignment MOS column")
    group_column: str | None = Field(default=None, description="column naming each row's group")
    group_pattern: str | None = Field(
        default=None, description="regex on the image name whose first group is the group "
        "(e.g. '^([^_]+)_' for AGIQA-3K's generator); eval breaks results down by it, train "
        "uses it for the auxiliary loss (--group-weight)")

    def label_columns(self, heads: tuple[str, ...]) -> dict[str, str | None]:
        """The rating column of each head the model learns, by position: the first head
        (quality) is rated in --quality-column, the second (alignment) in
        --alignment-column; a model with one head ignores the second column."""
        return dict(zip(heads, (self.quality_column, self.alignment_column), strict=False))


class LabelledDataConfig(PipelineJob, InputURL, InputColumns, LabelColumns, CacheOptions,
                         ModelChoice, ModeChoice, StageConfig, ClusterOptions, StorageConfig,
                         RunOptions):
    """A table of images with human scores (CSV or Parquet), read like `iqray score` input;
    embedded into the cache with `iqray embed`'s options."""


@dataclass
class Labelled:
    """One split: rows that embedded fine, with MOS."""

    shas: list[str]
    prompts: list[str | None]
    mos: dict[str, np.ndarray]
    rows: list[int]  # source rows of the table, in the order above
    dropped: int
    pixels: torch.Tensor | None = None  # end-to-end training only
    fine_areas: torch.Tensor | None = None  # end-to-end training of two-view models


def groups_for(config: LabelledDataConfig, url: str, rows: list[int],
               table: pa.Table | None = None) -> list[str]:
    """Each row's group (column, or a regex on the image name); 'all' when neither is set.
    ``table`` is the table at ``url`` when the caller has read it already."""
    if config.group_column is None and config.group_pattern is None:
        return ["all"] * len(rows)
    if table is None:
        table = read_table(url, config.storage_config())
    if config.group_column is not None:
        if config.group_column not in table.column_names:
            raise ValueError(f"{url}: no group column {config.group_column!r}")
        values = table[config.group_column]
        return [str(values[r].as_py()) for r in rows]
    column = config.image_path_column or (config.key_columns or [None])[0]
    if column is None or column not in table.column_names:
        raise ValueError("--group-pattern needs --image-path-column or --key-columns to "
                         "name the images")
    names = table[column].to_pylist()
    return pattern_labels([Path(str(names[r])).name for r in rows], config.group_pattern)


def embed_table(config: LabelledDataConfig, url: str, image_root: str | None,
                log) -> EmbeddingCache:
    """The table's images in the embedding cache (only those not there yet are embedded):
    a cache fill on the way to train's or eval's output, not an output of its own."""
    from iqray.pipeline.io.storage import cache_fill

    with cache_fill():
        run_embed(EmbedConfig(**config.fields_of(EmbedConfig, input=url, image_root=image_root,
                                                 format="auto")), log=log)
    return EmbeddingCache(config.cache, config.storage_config())


def check_validation_ratings(config: LabelledDataConfig, url: str, heads: tuple[str, ...]
                             ) -> None:
    """Before anything is read or trained: validation can choose an epoch only if each
    head's ratings there are at least 3 and not all equal (else SRCC is undefined)."""
    from iqray.model.training import MIN_VALIDATION_ROWS, ValidationUndefined

    source = read_table(url, config.storage_config())
    for column in config.label_columns(heads).values():
        if column is None or column not in source.column_names:
            continue
        values = source[column].to_numpy(zero_copy_only=False).astype(float)
        values = values[np.isfinite(values)]
        if len(values) < MIN_VALIDATION_ROWS:
            raise ValidationUndefined(
                f"{url}: {len(values)} validation rows rated in {column!r}; SRCC needs at "
                f"least {MIN_VALIDATION_ROWS} to choose an epoch, so nothing would be "
                "selected; give more validation rows")
        if np.all(values == values[0]):
            raise ValidationUndefined(
                f"{url}: every validation rating in {column!r} is {values[0]:g}, so "
                "validation SRCC is undefined and cannot choose an epoch; give validation "
                "rows with differing ratings")


def labelled_rows(config: LabelledDataConfig, url: str, cache: EmbeddingCache,
                  heads: tuple[str, ...]) -> Labelled:
    storage = config.storage_config()
    (shard,) = discover_shards(url, config.read_config(), storage)
    index = shard_index(cache, shard)
    source = read_table(url, storage)
    ok = index.filter(pc.equal(index["status"], "ok"))
    rows = ok["source_row"].to_pylist()
    mos = {}
    for head, column in config.label_columns(heads).items():
        if column is None:
            mos[head] = np.full(len(rows), np.nan)
            continue
        if column not in source.column_names:
            raise ValueError(f"{url}: no MOS column {column!r}; columns: "
                             f"{', '.join(source.column_names)}")
        values = source[column].to_numpy(zero_copy_only=False).astype(float)
        mos[head] = values[rows]
    return Labelled(ok["image_sha256"].to_pylist(), ok["prompt"].to_pylist(), mos, rows,
                    dropped=index.num_rows - ok.num_rows)


def image_rows(config: LabelledDataConfig, url: str, image_root: str, model,
               with_fine_areas: bool = False) -> Labelled:
    """Decoded uint8 crops of every readable row (end-to-end training reads images itself);
    ``with_fine_areas`` also keeps the area random fine crops are drawn from (train split)."""
    from iqray.pipeline.decode import iter_crops

    read = config.read_config().model_copy(update={"image_root": image_root,
                                                   "format": "auto"})
    storage = config.storage_config()
    (shard,) = discover_shards(url, read, storage)
    source = read_table(url, storage)
    crops, areas, rows, prompts, shas, dropped = [], [], [], [], [], 0
    two_views = model.transform.fine_resize is not None and with_fine_areas
    for row, image, prompt, decoded, crop in iter_crops(shard, read, storage, model.transform):
        if crop is None:
            dropped += 1
            continue
        crops.append(crop)
        if two_views:
            areas.append(model.transform.fine_area(decoded))
        rows.append(row)
        prompts.append(prompt)
        shas.append(hashlib.sha256(image).hexdigest())
    mos = {}
    for head, column in config.label_columns(model_heads(model)).items():
        values = (source[column].to_numpy(zero_copy_only=False).astype(float)
                  if column else np.full(source.num_rows, np.nan))
        mos[head] = values[rows]
    labelled = Labelled(shas, prompts, mos, rows, dropped)
    labelled.pixels = torch.stack(crops) if crops else None
    labelled.fine_areas = torch.stack(areas) if areas else None
    return labelled


def normalised_targets(rows: Labelled, scales: dict[str, tuple[float, float]]
                       ) -> dict[str, torch.Tensor]:
    """Each head's ratings mapped to [0, 1] by its scale (NaN stays: no rating)."""
    return {head: torch.as_tensor((rows.mos[head] - low) / (high - low), dtype=torch.float32)
            for head, (low, high) in scales.items()}


def head_data(cache: EmbeddingCache, rows: Labelled, scales: dict[str, tuple[float, float]]
              ) -> HeadData:
    """Cached rows for the heads: one embedding per tower role, prompts, targets."""
    embeddings = tuple(torch.from_numpy(v) for v in cache.load_images(rows.shas))
    return HeadData(embeddings, rows.prompts, normalised_targets(rows, scales))
