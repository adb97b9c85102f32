"""The stage interface (pipeline/stages.py) and its Ray Data adapter (pipeline/graph.py):
contract checks at every boundary, typed blocks between stages, shard records."""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import pytest
from pipeline_data import img2dataset_table, write_parquet

from iqray.pipeline import rows as R
from iqray.pipeline.failures import StageBug
from iqray.pipeline.io.discovery import discover_shards
from iqray.pipeline.io.shards import ReadConfig, Shard
from iqray.pipeline.io.storage import StorageConfig
from iqray.pipeline.stages import Decode, ReadShards, Stage, shard_table

STORAGE = StorageConfig()


class DropsTheHash(Decode):
    """A decode stage with a bug: it forgets a column the model stage reads."""

    def process(self, batch):
        out = super().process(batch)
        del out[R.IMAGE_SHA256]
        return out


def _decode_options() -> dict:
    return {"image_size": 32, "max_pixels": 10**7, "timeout_s": 5,
            "keep_image_bytes": False}


def test_a_stage_whose_output_breaks_the_contract_stops_as_a_bug(tmp_path, sample):
    write_parquet(None, str(tmp_path / "a.parquet"), img2dataset_table(sample, 0, 3))
    shards = discover_shards(str(tmp_path), ReadConfig(), STORAGE)
    batch = next(ReadShards(ReadConfig(), STORAGE, ["key"]).run(shard_table(shards)))
    assert R.check_batch(Decode(_decode_options())(dict(batch)), "decode") == []
    with pytest.raises(StageBug) as bug:
        DropsTheHash(_decode_options())(dict(batch))
    assert bug.value.stage == "decode" and str(tmp_path / "a.parquet") in bug.value.where
    assert "Decode's output breaks the row contract: missing image_sha256" in bug.value.what


def test_shard_records_travel_typed_and_come_back_equal():
    shards = [Shard(3, "s3://b/in/chunk-0", "folder", "chunk-0.parquet", "f1",
                    members=["s3://b/in/a.jpg", "s3://b/in/b.jpg"],
                    prompts={"a.jpg": "a cat", "b.jpg": None}, estimated_rows=2),
              Shard(4, "s3://b/in/x.parquet", "parquet", "x.parquet", "f2",
                    only_rows=[0, 5])]
    table = shard_table(shards)
    assert table.schema == Shard.ARROW_SCHEMA
    assert [Shard.from_record(r) for r in table.to_pylist()] == shards


class Writes(Stage):
    name = "Writes"

    def process(self, batch):
        count = len(batch["id"])
        return {"id": batch["id"], R.ERROR: R.column([None] * count),
                "user_key": R.column([None] * count),
                R.PIXELS: np.zeros((count, 3, 2, 2), np.uint8)}


class Reads(Stage):
    name = "Reads"

    def process(self, batch):
        seen = {name: [type(v).__name__ for v in values[:1]]
                for name, values in batch.items() if name != R.PIXELS}
        return {"id": batch["id"], "seen": R.column([repr(seen)] * len(batch["id"])),
                "pixels_shape": R.column([repr(batch[R.PIXELS].shape)] * len(batch["id"]))}


def test_none_stays_none_between_stages_on_ray(ray_local):
    """Ray Data turns an all-None numpy column into NaN between stages; the adapter's typed
    blocks keep it None, for iqray's columns and the user's alike."""
    import ray
    from ray import cloudpickle

    from iqray.pipeline.graph import on_ray
    from iqray.pipeline.stages import Resources

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests
    ds = ray.data.from_arrow(pa.table({"id": pa.array(range(4), pa.int64())}))
    ds = on_ray(ds, Writes(), Resources(num_cpus=0.25, batch_size=4))
    ds = on_ray(ds, Reads(), Resources(num_cpus=0.25, batch_size=4))
    rows = ds.take_all()
    assert len(rows) == 4
    assert rows[0]["seen"] == repr({"id": ["int64"], R.ERROR: ["NoneType"],
                                    "user_key": ["NoneType"]})
    assert {r["pixels_shape"] for r in rows} == {repr((4, 3, 2, 2))}


def test_typed_blocks_keep_the_contract_types():
    from iqray.pipeline.graph import from_block, to_block

    batch = {R.ERROR: R.column([None, None]), R.SOURCE_ROW: np.array([0, 1]),
             R.IMAGE: R.column([b"x", None]), "quality": np.array([0.5, np.nan], np.float32),
             R.PIXELS: np.zeros((2, 3, 4, 4), np.uint8)}
    table = to_block(batch)
    assert table.schema.field(R.ERROR).type == pa.string()
    assert table.schema.field(R.IMAGE).type == pa.binary()
    assert table.schema.field("quality").type == pa.float32()
    back = from_block(table)
    assert list(back[R.ERROR]) == [None, None] and back[R.PIXELS].shape == (2, 3, 4, 4)
    untyped = from_block(pa.table({"k": pa.nulls(2)}))
    assert list(untyped["k"]) == [None, None]
