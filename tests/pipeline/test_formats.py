"""Every input layout, read stage by stage without a Ray cluster: discovery, the first shard's
checks, and each format's reader, locally and from S3. What comes after the read stage does
not depend on the layout (tests/pipeline/test_rows.py runs each layout's rows through decode
and the model; test_score_formats.py keeps the end-to-end runs through Ray)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from pipeline_data import SAMPLE, img2dataset_table, wds_members, write_parquet, write_tar

from iqray.pipeline.io.discovery import discover_shards, inspect_input
from iqray.pipeline.io.read import read_shard
from iqray.pipeline.io.shards import ReadConfig
from iqray.pipeline.io.storage import StorageConfig


def read_all(url: str, storage: StorageConfig | None = None, **read_options
             ) -> tuple[list, list[dict]]:
    """(shards, every row they read: the contract's columns as plain values)."""
    read, storage = ReadConfig(**read_options), storage or StorageConfig()
    shards = discover_shards(url, read, storage)
    keys = inspect_input(shards, read, storage)
    rows = []
    for shard in shards:
        for batch in read_shard(shard, read, storage, keys):
            count = len(batch["source_row"])
            rows += [{name: values[i] for name, values in batch.items()} for i in range(count)]
    return shards, rows


def _where(where, request, tmp_path, folder):
    if where == "local":
        return None, str(tmp_path / folder), str(tmp_path / folder), StorageConfig()
    fs, bucket = request.getfixturevalue("s3_bucket")
    storage = StorageConfig(s3_endpoint=request.getfixturevalue("s3_endpoint"))
    return fs, f"{bucket}/{folder}", f"s3://{bucket}/{folder}", storage


def test_a_folder_with_a_csv_sidecar(sample):
    names, images, prompts = sample
    shards, rows = read_all(str(SAMPLE), read_batch_rows=10)
    assert [s.output_name for s in shards] == ["images-00000.parquet"]
    by_name = dict(zip(names, zip(images, prompts, strict=True), strict=True))
    assert sorted(r["key"].removeprefix("images/") for r in rows) == sorted(names)
    for row in rows:
        image, prompt = by_name[row["key"].removeprefix("images/")]
        assert row["_image"] == image and row["prompt"] == prompt and row["_error"] is None
    # the shard's last batch says how many rows it produced
    assert [r["_shard_end"] for r in rows] == [-1] * 30 + [32] * 2


def test_a_folder_without_prompts_is_cut_into_chunks(tmp_path, sample):
    names, images, _ = sample
    for name, data in zip(names, images, strict=True):
        (tmp_path / name).write_bytes(data)
    shards, rows = read_all(str(tmp_path), folder_chunk_size=10)
    assert [s.estimated_rows for s in shards] == [10, 10, 10, 2]
    assert len(rows) == 32 and {r["prompt"] for r in rows} == {None}
    assert [r["source_row"] for r in rows if r["_shard"] == 3] == [0, 1]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_img2dataset_parquet_shards(where, request, tmp_path, sample):
    fs, root, url, storage = _where(where, request, tmp_path, "in")
    tables = [img2dataset_table(sample, start, 12) for start in (0, 12, 24)]
    for i, table in enumerate(tables):
        write_parquet(fs, f"{root}/{i:05d}.parquet", table)
    shards, rows = read_all(url, storage, read_batch_rows=5)
    assert [s.output_name for s in shards] == ["00000.parquet", "00001.parquet",
                                               "00002.parquet"]
    assert [s.estimated_rows for s in shards] == [12, 12, 12]
    source = pa.concat_tables(tables)
    assert [r["key"] for r in rows] == source["key"].to_pylist()
    assert [r["_image"] for r in rows] == source["jpg"].to_pylist()
    assert [r["prompt"] for r in rows] == source["caption"].to_pylist()
    assert "url" not in rows[0] and "jpg" not in rows[0]  # only the key columns pass


def test_hugging_face_image_structs_and_id_columns(tmp_path, sample):
    names, images, prompts = sample
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "id": list(range(8)),
        "image": pa.array([{"bytes": images[i], "path": names[i]} for i in range(8)],
                          image_type),
        "prompt": prompts[:8],
    })
    write_parquet(None, str(tmp_path / "in" / "train-00000-of-00001.parquet"), table)
    _, rows = read_all(str(tmp_path / "in"))
    assert [r["id"] for r in rows] == list(range(8))
    assert [r["_image"] for r in rows] == images[:8]


def test_an_image_path_column_relative_to_the_shard_on_s3(s3_bucket, s3_endpoint, sample):
    fs, bucket = s3_bucket
    names, images, prompts = sample
    for name, data in zip(names[:6], images[:6], strict=True):
        fs.pipe_file(f"{bucket}/data/images/{name}", data)
    table = pa.table({"image_path": [f"images/{n}" for n in names[:5]] + ["images/gone.jpg"],
                      "text": prompts[:6]})
    write_parquet(fs, f"{bucket}/data/index.parquet", table)
    _, rows = read_all(f"s3://{bucket}/data/index.parquet",
                       StorageConfig(s3_endpoint=s3_endpoint, storage_attempts=1))
    assert [r["_image"] for r in rows[:5]] == images[:5]
    assert [r["prompt"] for r in rows] == prompts[:6]
    assert rows[5]["_error_kind"] == "read" and "gone.jpg" in rows[5]["_error"]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_webdataset_tar_shards(where, request, tmp_path, sample):
    fs, root, url, storage = _where(where, request, tmp_path, "wds")
    names, images, prompts = sample
    write_tar(fs, f"{root}/00000.tar", wds_members(sample, 0, 10, prompt_as="txt"))
    write_tar(fs, f"{root}/00001.tar", wds_members(sample, 10, 10, prompt_as="json"))
    # img2dataset's per-shard metadata parquet beside the tars is not an input.
    write_parquet(fs, f"{root}/00000.parquet", pa.table({"key": ["x"]}))
    shards, rows = read_all(url, storage)
    assert [s.format for s in shards] == ["webdataset", "webdataset"]
    assert [r["key"] for r in rows] == [f"{i:06d}" for i in range(20)]
    assert [r["_image"] for r in rows] == images[:20]
    assert [r["prompt"] for r in rows] == prompts[:20]


def test_a_glob_selects_the_shards(tmp_path, sample):
    for name in ("a-0.parquet", "a-1.parquet", "b-0.parquet"):
        write_parquet(None, str(tmp_path / "in" / name), img2dataset_table(sample, 0, 3))
    shards, rows = read_all(str(tmp_path / "in" / "a-*.parquet"))
    assert [s.output_name for s in shards] == ["a-0.parquet", "a-1.parquet"]
    assert len(rows) == 6


def test_a_folder_with_a_jsonl_sidecar_on_s3(s3_bucket, s3_endpoint, sample):
    fs, bucket = s3_bucket
    names, images, prompts = sample
    for name, data in zip(names[:9], images[:9], strict=True):
        fs.pipe_file(f"{bucket}/gen/{name}", data)
    sidecar = "\n".join(json.dumps({"file_name": n, "text": p})
                        for n, p in zip(names[:8], prompts[:8], strict=True))
    fs.pipe_file(f"{bucket}/gen/metadata.jsonl", sidecar.encode())
    shards, rows = read_all(f"s3://{bucket}/gen", StorageConfig(s3_endpoint=s3_endpoint),
                            folder_chunk_size=4)
    assert len(shards) == 3
    order = [names.index(r["key"]) for r in rows]
    assert sorted(order) == list(range(9))
    # the 9th image has no sidecar entry
    assert [r["prompt"] for r in rows] == [prompts[i] if i < 8 else None for i in order]
    assert [r["_image"] for r in rows] == [images[i] for i in order]


def test_a_csv_index_with_an_image_root(sample):
    names, images, prompts = sample
    index = SAMPLE / "prompts.csv"  # name,prompt,mos_quality,mos_align; images/ beside it
    shards, rows = read_all(str(index), image_path_column="name",
                            image_root=str(SAMPLE / "images"), key_columns=["name"])
    assert [s.format for s in shards] == ["csv"] and shards[0].estimated_rows == 32
    assert [r["name"] for r in rows] == names
    assert [r["_image"] for r in rows] == images and [r["prompt"] for r in rows] == prompts
