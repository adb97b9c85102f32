"""`iqray preferences`: preference / reward-model / regression datasets from score runs.
Glue only: pairing lives in :mod:`iqray.pipeline.tables.preferences`."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from iqray.jobs.config import JobConfig
from iqray.jobs.console import log
from iqray.pipeline.io.shards import ReadConfig
from iqray.pipeline.io.storage import StorageConfig, join_url, write_atomic
from iqray.pipeline.tables.preferences import (
    FORMATS,
    MIX,
    VALIDATION,
    PairRules,
    make_pairs,
    pair_table,
    pointwise_table,
    prompt_split,
    ranking_score,
    resolve_rank_by,
)

SPLITS = ("train", VALIDATION)


class PreferencesConfig(JobConfig, PairRules, StorageConfig):
    """`iqray preferences`: pair images of the same prompt into preference data."""

    input: str = Field(description="`iqray score` output (directory, glob or file; local/S3)")
    output: str = Field(description="dataset directory (one Parquet dataset per format)")
    formats: list[str] = Field(default=["dpo", "reward", "pointwise"],
                               description=f"what to write: {', '.join(FORMATS)}")
    source: str | None = Field(default=None, description="the scored dataset, to read images "
                               "back from (default: the score run's recorded input)")
    read: ReadConfig = Field(default_factory=ReadConfig,
                             description="how to read --source (as for `iqray score`)")
    rows_per_file: int = Field(default=1000, gt=0, description="rows per Parquet file")

    def rules(self) -> PairRules:
        return PairRules.model_validate(self.model_dump(include=set(PairRules.model_fields)))


def run_preferences(config: PreferencesConfig, log=log) -> dict:
    from iqray.pipeline.tables.runs import (
        fetch_images,
        read_scores,
        score_metadata,
        table_outputs,
    )

    started = time.perf_counter()
    unknown = sorted(set(config.formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown format(s) {unknown}; choose from {', '.join(FORMATS)}")
    storage, rules = config.storage_config(), config.rules()
    metadata = score_metadata(config.input, storage)
    table = read_scores(config.input, storage)
    outputs = table_outputs(table, metadata)
    ranked_by = "+".join(resolve_rank_by(rules, outputs))
    score = ranking_score(table, rules, outputs)
    pairs = make_pairs(table, rules, outputs)
    prompts = table["prompt"].to_pylist()
    pointwise = [i for i, p in enumerate(prompts) if p and np.isfinite(score[i])]
    needed = sorted({i for p in pairs for i in (p.chosen, p.rejected)}
                    | (set(pointwise) if "pointwise" in config.formats else set()))
    source = config.source or metadata.get("input")
    if source is None and "image" not in table.column_names:
        raise ValueError("the score run records no input and kept no image bytes: give "
                         "--source")
    images = fetch_images(table, needed, source, config.read, storage)
    fs, _ = storage.filesystem(config.output)
    counts: dict[str, dict[str, int]] = {}
    for fmt in config.formats:
        counts[fmt] = {}
        for split in SPLITS:
            if fmt == "pointwise":
                rows = [i for i in pointwise if prompt_split(prompts[i], rules) == split]
                part = pointwise_table(rows, table, score, images)
            else:
                chosen = [p for p in pairs if prompt_split(p.prompt, rules) == split]
                part = pair_table(fmt, chosen, table, score, images,
                                  rules.seed + (split == VALIDATION))
            counts[fmt][split] = part.num_rows
            _write_split(part, join_url(config.output, fmt), split, config.rows_per_file,
                         fs, storage)
    card = dataset_card(config, metadata, counts, len(table), len(pairs), ranked_by)
    write_atomic(fs, storage.filesystem(join_url(config.output, "README.md"))[1], card.encode())
    summary = {"input": config.input, "model": metadata.get("model"), "pairs": len(pairs),
               "counts": counts, "rules": rules.model_dump(),
               "seconds": round(time.perf_counter() - started, 2)}
    write_atomic(fs, storage.filesystem(join_url(config.output, "summary.json"))[1],
                 (json.dumps(summary, indent=2) + "\n").encode())
    log(f"{len(pairs)} pairs from {len(table)} scored rows ({rules.strategy}, by "
        f"{ranked_by}, margin {rules.margin:g}, max uses {rules.max_uses})")
    for fmt, by_split in counts.items():
        log(f"  {fmt}: train {by_split['train']}, validation {by_split[VALIDATION]} rows -> "
            f"{join_url(config.output, fmt)}")
    return summary


def _write_split(table: pa.Table, directory: str, split: str, rows_per_file: int, fs,
                 storage: StorageConfig) -> None:
    # Old parts of this split go first, so a rerun with fewer files leaves no stale rows.
    _, base = storage.filesystem(directory)
    if fs.exists(base):
        for old in fs.glob(f"{base}/{split}-*.parquet"):
            fs.rm(old)
    total = max(1, -(-table.num_rows // rows_per_file))
    for n in range(total):
        part = table.slice(n * rows_per_file, rows_per_file)
        sink = io.BytesIO()
        pq.write_table(part, sink)
        name = f"{split}-{n:05d}-of-{total:05d}.parquet"
        write_atomic(fs, storage.filesystem(join_url(directory, name))[1], sink.getvalue())


def dataset_card(config: PreferencesConfig, metadata: dict, counts: dict, rows: int,
                 pairs: int, ranked_by: str) -> str:
    """README.md with a `datasets` configs header, so `load_dataset(OUTPUT, FORMAT)` works."""
    header = ["---", "configs:"]
    for fmt in counts:
        header += [f"- config_name: {fmt}", "  data_files:"]
        header += [f"  - split: {s}\n    path: {fmt}/{s}-*.parquet" for s in SPLITS]
    header.append("---")
    rules = config.rules()
    lines = [
        "# Preference data scored by iqray", "",
        f"Built by `iqray preferences` from the score run `{config.input}` "
        f"({rows} rows), model `{metadata.get('model')}` "
        f"(identity `{str(metadata.get('model_identity'))[:16]}`).", "",
        "| format | train | validation | layout |", "|---|---|---|---|",
    ]
    layouts = {"dpo": "`caption, jpg_0, jpg_1, label_0, label_1` (Pick-a-Pic v2, as the "
               "Diffusion-DPO training scripts read it; image bytes)",
               "reward": "`prompt, image_chosen, image_rejected, score_chosen, "
               "score_rejected` (+ keys)", "pointwise": "`prompt, image, score` (+ key)"}
    lines += [f"| {fmt} | {c['train']} | {c[VALIDATION]} | {layouts[fmt]} |"
              for fmt, c in counts.items()]
    lines += [
        "", "## How it was built", "",
        f"- {pairs} pairs, strategy `{rules.strategy}`, ranked by `{ranked_by}`"
        + (f" (weight {rules.quality_weight:g} on the first's dataset percentile)"
           if rules.rank_by == MIX else "") + ".",
        f"- Pairs whose score gap is below {rules.margin:g} are dropped (ties carry no "
        f"preference); no image is in more than {rules.max_uses} pairs; strongest gaps first.",
        f"- Train/validation split by prompt ({rules.val_fraction:.0%} of prompts in "
        f"validation, seed "
        f"{rules.seed}): no prompt is in both.",
        "- This is AI feedback: iqray's scores stand in for human preference.", "",
        "## Loading", "", "```python", "from datasets import load_dataset, Image",
        f"ds = load_dataset(\"{config.output}\", \"reward\")  # images decode as PIL",
        f"dpo = load_dataset(\"{config.output}\", \"dpo\")  # jpg_0/jpg_1 are JPEG/PNG bytes",
        "dpo = dpo.cast_column(\"jpg_0\", Image())  # to see them as images", "```", ""]
    return "\n".join(header + lines)
