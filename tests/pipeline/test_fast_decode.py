"""--decode fast: JPEGs decoded at a reduced DCT scale where every view allows it, gated on
the input's first images against full decode, recorded in the footer and resume identity."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pipeline_data import TEST_MODEL, write_parquet

from iqray.model.images import CropViews, open_image


def encoded(image: Image.Image, side: int, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").resize((side, side), Image.Resampling.LANCZOS).save(
        buffer, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def upscaled(sample) -> list[bytes]:
    """The sample's 32 images as 1024 px JPEGs (Lanczos-upscaled: honest for speed)."""
    return [encoded(Image.open(io.BytesIO(data)), 1024) for data in sample[1]]


def test_only_jpegs_twice_the_view_decode_reduced_and_crops_stay_close(upscaled, sample):
    image = Image.open(io.BytesIO(sample[1][0]))
    assert open_image(upscaled[0], min_short_side=224).size == (256, 256)  # 1/4, >= 224
    assert open_image(upscaled[0], min_short_side=512).size == (512, 512)  # 1/2
    assert open_image(upscaled[0], min_short_side=600).size == (1024, 1024)  # < 2x: full
    assert open_image(encoded(image, 1024, "PNG"), min_short_side=224).size == (1024, 1024)
    views = CropViews(224)
    full = views(open_image(upscaled[0])).astype(int)
    fast = views(open_image(upscaled[0], min_short_side=224)).astype(int)
    assert full.shape == fast.shape and 0 < np.abs(full - fast).mean() < 1.0


def test_the_gate_passes_where_the_ranking_holds_and_refuses_where_it_moves(tmp_path,
                                                                          upscaled, sample):
    from iqray.model import DEFAULT_MODEL
    from iqray.pipeline.io.discovery import discover_shards
    from iqray.pipeline.io.shards import ReadConfig
    from iqray.pipeline.io.storage import StorageConfig
    from iqray.pipeline.scoring import check_decode
    from iqray.pipeline.staging import stage_model

    write_parquet(None, str(tmp_path / "in" / "0.parquet"), pa.table(
        {"key": [f"{i}" for i in range(32)], "jpg": pa.array(upscaled, pa.binary()),
         "caption": sample[2]}))
    storage, read = StorageConfig(), ReadConfig()
    shards = discover_shards(str(tmp_path / "in"), read, storage)
    report = check_decode(stage_model(TEST_MODEL, storage), shards, read, storage)
    assert report["passes"] and report["images"] == report["reduced"] == 32
    # The shipped model's fine view wants native detail (512 px short side): decoding the
    # 1024 px images at 1/2 moves its ranking of these 32 (Spearman 0.997), and the run is
    # refused.
    with pytest.raises(ValueError, match="--decode fast changes this model's ranking"):
        check_decode(stage_model(DEFAULT_MODEL, storage), shards, read, storage)


def test_a_fast_run_records_its_check_and_is_not_a_full_decode_run(ray_local, tmp_path,
                                                                  upscaled, sample):
    from iqray.jobs.score import ScoreConfig, run_score

    write_parquet(None, str(tmp_path / "in" / "0.parquet"), pa.table(
        {"key": [f"{i}" for i in range(8)], "jpg": pa.array(upscaled[:8], pa.binary()),
         "caption": sample[2][:8]}))
    options = dict(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=TEST_MODEL,
                   progress=False)
    fast = run_score(ScoreConfig(decode="fast", **options), log=lambda *_: None)
    assert fast.exit_code == 0 and fast.rows == 8
    footer = json.loads(pq.read_schema(fast.outputs[0]).metadata[b"iqray"])
    assert footer["decode"] == "fast" and footer["decode_check"]["reduced"] == 8
    assert footer["decode_check"]["passes"]
    assert ScoreConfig(decode="fast", **options).scoring_hash("m") != \
        ScoreConfig(**options).scoring_hash("m")
    full = run_score(ScoreConfig(**options), log=lambda *_: None)
    assert full.shards_skipped == 0 and full.shards_scored == 1  # rescored, not reused
