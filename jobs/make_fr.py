"""`iqray make-fr`: a full-reference training set from clean images, by graded distortion.

No FR-annotated set ships with iqray, so this builds one honestly: each source image becomes
a reference (square, ``--size`` px, PNG) and 25 distorted versions (5 kinds x 5 levels, PNG so
that no extra compression is added), plus the reference itself as level 0. The target is
``quality = 5 - level``. Sources are split into train and val *by source image*, so a val
score is measured on images whose content the model never saw. Glue only: the distortions
are :mod:`iqray.model.distortions`.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import io
import json

from pydantic import Field

from iqray.jobs.console import bars, log
from iqray.model.registry import architecture
from iqray.pipeline import rows as R
from iqray.pipeline.io.shards import ReadConfig
from iqray.pipeline.io.storage import StorageConfig

# The rating column the set is made for: the full-reference model's (first) head.
TARGET = architecture("bpclip").heads[0]


class MakeFRConfig(ReadConfig, StorageConfig):
    """`iqray make-fr`: distorted/reference pairs with graded targets, split by source."""

    input: str = Field(description="clean source images (table, folder or tar shards)")
    output: str = Field(description="output folder (local or object storage)")
    sources: int = Field(default=240, gt=1, description="source images to use (chosen by seed)")
    size: int = Field(default=256, gt=31, description="reference side length in px")
    val_fraction: float = Field(default=0.2, gt=0, lt=1,
                                description="fraction of source images held apart for val")
    kinds: list[str] = Field(default_factory=lambda: ["blur", "noise", "jpeg", "contrast",
                                                      "color"],
                             description="distortion kinds")
    progress: bool = Field(default=True, description="show a progress bar")


def _rank(seed: int, image: bytes) -> int:
    """Seeded rank from the image's content: the same sources wherever the data lives."""
    digest = hashlib.blake2b(f"{seed}:".encode() + hashlib.sha256(image).digest(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "big")


def run_make_fr(config: MakeFRConfig, log=log) -> dict:
    from PIL import Image

    from iqray.model.distortions import KINDS, LEVELS, distort, square
    from iqray.model.preprocess import ImageDecodeError, open_image
    from iqray.pipeline.io.discovery import discover_shards
    from iqray.pipeline.io.read import read_shard

    unknown = sorted(set(config.kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown distortion kinds {unknown}; known: {', '.join(KINDS)}")
    read = ReadConfig.model_validate(config.model_dump(include=set(ReadConfig.model_fields)))
    storage = config.storage_config()
    # Keep the `sources` images of lowest seeded rank: a deterministic sample spread over the
    # whole input (tables are often sorted by generator or date), holding only those bytes.
    chosen: list[tuple[int, int, bytes]] = []
    for shard in discover_shards(config.input, read, storage):
        for batch in read_shard(shard, read, storage, []):
            for row, image in zip(batch[R.SOURCE_ROW], batch[R.IMAGE], strict=True):
                if image is None:
                    continue
                item = (-_rank(config.seed, image), row, image)
                if len(chosen) < config.sources:
                    heapq.heappush(chosen, item)
                elif item[0] > chosen[0][0]:
                    heapq.heapreplace(chosen, item)
    chosen.sort(reverse=True)  # lowest rank first
    if len(chosen) < 2:
        raise ValueError(f"{config.input}: fewer than 2 readable images")
    val_count = max(1, round(len(chosen) * config.val_fraction))
    fs, root = storage.filesystem(config.output)
    for folder in ("", "/refs", "/images"):
        fs.makedirs(root.rstrip("/") + folder, exist_ok=True)

    def put(relative: str, image: Image.Image) -> None:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        fs.pipe_file(root.rstrip("/") + "/" + relative, buffer.getvalue())

    bar = None
    if bars(config.progress):
        from tqdm import tqdm

        bar = tqdm(total=len(chosen), desc="make-fr", unit="source", dynamic_ncols=True)
    rows = {"train": [], "val": []}
    grid_source = None
    for index, (_, _, image_bytes) in enumerate(chosen):
        try:
            clean = square(open_image(image_bytes), config.size)
        except ImageDecodeError as exc:
            log(f"skipped an unreadable source: {exc}")
            continue
        name = hashlib.sha256(image_bytes).hexdigest()[:16]
        split = "val" if index < val_count else "train"
        reference = f"refs/{name}.png"
        put(reference, clean)
        rows[split].append({"image_path": reference, "reference": reference, "source": name,
                            "distortion": "none", "level": 0, TARGET: float(LEVELS)})
        for kind_index, kind in enumerate(config.kinds):
            for level in range(1, LEVELS + 1):
                path = f"images/{name}_{kind}_{level}.png"
                put(path, distort(clean, kind, level, seed=config.seed * 1000 + index * 10
                                  + kind_index))
                rows[split].append({"image_path": path, "reference": reference,
                                    "source": name, "distortion": kind, "level": level,
                                    TARGET: float(LEVELS - level)})
        if grid_source is None:
            grid_source = clean
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    for split, split_rows in rows.items():
        text = io.StringIO()
        writer = csv.DictWriter(text, ["image_path", "reference", "source", "distortion",
                                       "level", TARGET])
        writer.writeheader()
        writer.writerows(split_rows)
        fs.pipe_file(root.rstrip("/") + f"/{split}.csv", text.getvalue().encode())
    grid = distortion_grid(grid_source, config.kinds)
    put("grid.png", grid)
    summary = {"input": config.input, "seed": config.seed, "size": config.size,
               "kinds": config.kinds, "levels": LEVELS, "target": "quality = 5 - level",
               "sources": {s: len({r["source"] for r in v}) for s, v in rows.items()},
               "rows": {s: len(v) for s, v in rows.items()}}
    fs.pipe_file(root.rstrip("/") + "/make_fr.json", (json.dumps(summary, indent=2) + "\n")
                 .encode())
    log(f"wrote {config.output}: train {summary['rows']['train']} rows from "
        f"{summary['sources']['train']} sources, val {summary['rows']['val']} rows from "
        f"{summary['sources']['val']} held-apart sources; grid.png shows every level")
    return summary


def distortion_grid(image, kinds: list[str], thumb: int = 128):
    """One row per kind, levels 0..5 left to right: what the targets mean, at a glance."""
    from PIL import Image, ImageDraw

    from iqray.model.distortions import LEVELS, distort, square

    small = square(image, thumb * 2)
    label_w = 80
    grid = Image.new("RGB", (label_w + thumb * (LEVELS + 1), thumb * len(kinds)), "white")
    draw = ImageDraw.Draw(grid)
    for r, kind in enumerate(kinds):
        draw.text((6, r * thumb + thumb // 2 - 6), kind, fill="black")
        for level in range(LEVELS + 1):
            # Distort at full size, then shrink: the grid shows what the model sees.
            tile = distort(small, kind, level).resize((thumb, thumb), Image.BICUBIC)
            grid.paste(tile, (label_w + level * thumb, r * thumb))
    return grid
