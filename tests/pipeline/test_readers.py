"""Readers and discovery, called directly (no Ray): retries through a real faulty proxy in
front of the S3 test server, broken files, configuration checks and the warnings."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fault_proxy import Fault
from pipeline_data import img2dataset_table, wds_members, write_parquet, write_tar

from iqray.pipeline.io.discovery import discover_shards, inspect_input
from iqray.pipeline.io.read import ShardUnfinished, read_shard
from iqray.pipeline.io.shards import ReadConfig
from iqray.pipeline.io.storage import StorageConfig, StorageUnavailable, check_separate
from iqray.pipeline.rows import SHARD_CORRUPT, SHARD_UNFINISHED

# Few, fast retries: botocore's own and ours.
FAST = {"s3_max_attempts": 2, "storage_attempts": 3, "storage_backoff_s": 0.01}


def rows_of(shard, read, storage, key_columns=("key",), on_failure="raise") -> list[dict]:
    out = []
    for batch in read_shard(shard, read, storage, list(key_columns), on_failure=on_failure):
        names = [n for n in batch
                 if not n.startswith("_") or n in ("_error", "_error_kind", "_image")]
        out += [dict(zip(names, values, strict=True))
                for values in zip(*(batch[n] for n in names), strict=True)]
    return out


def test_reads_through_storage_faults_give_exactly_the_clean_rows(s3_bucket, fault_proxy,
                                                                  sample):
    fs, bucket = s3_bucket
    # Small row groups and batches: the faults land mid-file, so reads resume mid-file.
    table = img2dataset_table(sample, 0, 24)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=4)
    fs.pipe_file(f"{bucket}/in/a.parquet", buffer.getvalue())
    write_tar(fs, f"{bucket}/in/b.tar", wds_members(sample, 0, 12))
    read = ReadConfig(read_batch_rows=4)
    clean = StorageConfig(s3_endpoint=fault_proxy.url, **FAST)
    expected = {}
    for url in (f"s3://{bucket}/in/a.parquet", f"s3://{bucket}/in/b.tar"):
        (shard,) = discover_shards(url, read, clean)
        expected[url] = (shard, rows_of(shard, read, clean))
    assert [len(rows) for _, rows in expected.values()] == [24, 12]

    # Each fault kind on half of the object reads, with botocore's own retries off so that
    # ours have to resume; every read is a new file handle (no cached bytes).
    faulty = StorageConfig(s3_endpoint=fault_proxy.url, storage_attempts=10,
                           storage_backoff_s=0.01, s3_max_attempts=1)
    for seed, kind in enumerate(["500", "503", "reset", "truncate"]):
        fault_proxy.set(Fault(kind, "GET", rate=0.5), seed=seed + 2)
        for _ in range(2):
            for shard, rows in expected.values():
                assert rows_of(shard, read, faulty) == rows, kind
        assert fault_proxy.injected[(kind, "GET")] > 0, kind


def test_a_shard_failing_past_every_retry_is_unfinished_not_an_error_row(s3_bucket,
                                                                          fault_proxy, sample):
    fs, bucket = s3_bucket
    write_parquet(fs, f"{bucket}/in/a.parquet", img2dataset_table(sample, 0, 6))
    storage = StorageConfig(s3_endpoint=fault_proxy.url, **{**FAST, "storage_attempts": 2})
    read = ReadConfig()
    (shard,) = discover_shards(f"s3://{bucket}/in/", read, storage)
    fault_proxy.set(Fault("500", "GET", key="a.parquet"))
    with pytest.raises(ShardUnfinished, match=r"a\.parquet: cannot read .*2 attempts"):
        rows_of(shard, read, storage)
    (marker,) = rows_of(shard, read, storage, on_failure="marker")
    assert marker["_error_kind"] == SHARD_UNFINISHED
    assert "a.parquet: cannot read" in marker["_error"] and marker["_image"] is None


def test_broken_files_are_error_rows_with_their_row_count_when_known(tmp_path, sample):
    storage = StorageConfig(storage_backoff_s=0.0)
    read = ReadConfig()
    members = wds_members(sample, 0, 6)
    write_tar(None, str(tmp_path / "full.tar"), members)
    data = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "in").mkdir()
    # Cut inside the fourth sample's image: three whole samples, then damage.
    cut = data.index(members[6][1]) + 100
    (tmp_path / "in" / "cut.tar").write_bytes(data[:cut])
    (shard,) = discover_shards(str(tmp_path / "in"), read, storage)
    rows = rows_of(shard, read, storage)
    assert [r["_error_kind"] for r in rows] == [None, None, None, SHARD_CORRUPT]
    assert "file unreadable from row 3" in rows[-1]["_error"] and shard.estimated_rows is None

    # A Parquet whose footer survives but whose data pages are damaged: its metadata says
    # how many rows it holds, and every one of them gets a row.
    table = img2dataset_table(sample, 0, 8)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=4, compression="none")
    raw = bytearray(buffer.getvalue())
    meta = pq.ParquetFile(io.BytesIO(bytes(raw))).metadata
    start = meta.row_group(1).column(1).data_page_offset  # the second group's images
    raw[start : start + 64] = b"\xff" * 64
    (tmp_path / "pq").mkdir()
    (tmp_path / "pq" / "damaged.parquet").write_bytes(bytes(raw))
    read = ReadConfig(read_batch_rows=4)  # a batch per row group
    (shard,) = discover_shards(str(tmp_path / "pq"), read, storage)
    rows = rows_of(shard, read, storage)
    assert shard.estimated_rows == 8 and [r["source_row"] for r in rows] == list(range(8))
    assert [r["_error_kind"] for r in rows] == [None] * 4 + [SHARD_CORRUPT] * 4


def test_planning_storage_errors_end_in_one_line_naming_url_and_endpoint(s3_bucket,
                                                                         fault_proxy, sample):
    fs, bucket = s3_bucket
    write_parquet(fs, f"{bucket}/in/a.parquet", img2dataset_table(sample, 0, 3))
    storage = StorageConfig(s3_endpoint=fault_proxy.url, **FAST)
    fault_proxy.set(Fault("503", "LIST", rate=0.5), seed=3)  # moderate: retried away
    (shard,) = discover_shards(f"s3://{bucket}/in/", ReadConfig(), storage)
    assert shard.estimated_rows == 3
    fault_proxy.set(Fault("500", "LIST"))
    with pytest.raises(StorageUnavailable) as failure:
        discover_shards(f"s3://{bucket}/in/", ReadConfig(), storage)
    message = str(failure.value)
    assert "\n" not in message and f"s3://{bucket}/in/" in message
    assert fault_proxy.url in message and "3 attempts" in message
    fault_proxy.set(Fault("reset", "LIST"))  # no answer at all: maybe the wrong endpoint
    with pytest.raises(StorageUnavailable, match="is --s3-endpoint / AWS_ENDPOINT_URL right"):
        discover_shards(f"s3://{bucket}/in/", ReadConfig(), storage)


def test_configuration_mistakes_are_found_on_the_first_shard(tmp_path, sample):
    storage = StorageConfig()
    write_parquet(None, str(tmp_path / "in" / "a.parquet"), img2dataset_table(sample, 0, 2))
    shards = discover_shards(str(tmp_path / "in"), ReadConfig(), storage)
    for read, message in [
            (ReadConfig(prompt_column="text"), "no column 'text' for the prompt"),
            (ReadConfig(image_column="png"), "no column 'png' for the image bytes"),
            (ReadConfig(key_columns=["uid"]), "no key column 'uid'"),
            (ReadConfig(reference_column="ref"), "no reference column 'ref'")]:
        with pytest.raises(ValueError, match=message):
            inspect_input(shards, read, storage)
        # The read stage says the same of a shard that lacks them, as unfinished.
        (marker,) = rows_of(shards[0], read, storage, on_failure="marker")
        assert marker["_error_kind"] == SHARD_UNFINISHED and message in marker["_error"]
    assert inspect_input(shards, ReadConfig(), storage) == ["key"]


def test_silent_gaps_are_warned_about(tmp_path, sample):
    names, images, prompts = sample
    (tmp_path / "imgs").mkdir()
    for name, data in zip(names[:7], images[:7], strict=True):
        (tmp_path / "imgs" / name).write_bytes(data)
    (tmp_path / "side.csv").write_text("name,prompt\nother.jpg,a cat\n" +
                                       f"{names[0]},{prompts[0]}\n")
    warnings: list[str] = []
    shards = discover_shards(str(tmp_path / "imgs"), ReadConfig(sidecar=str(tmp_path /
                                                                            "side.csv")),
                             StorageConfig(), warn=warnings.append)
    assert len(warnings) == 1 and "names 1 of 7 images; the other 6 get no prompt" in \
        warnings[0]
    assert sum(p is not None for p in shards[0].prompts.values()) == 1

    table = pa.table({"name": names[:2], "jpg": images[:2], "prompt": prompts[:2]})
    write_parquet(None, str(tmp_path / "t" / "a.parquet"), table)
    shards = discover_shards(str(tmp_path / "t"), ReadConfig(), StorageConfig())
    warnings.clear()
    assert inspect_input(shards, ReadConfig(), StorageConfig(), warn=warnings.append) == []
    assert len(warnings) == 1 and "no key column" in warnings[0]
    assert "columns: name, jpg, prompt" in warnings[0] and "--key-columns" in warnings[0]
    warnings.clear()
    inspect_input(shards, ReadConfig(key_columns=["name"]), StorageConfig(),
                  warn=warnings.append)
    assert warnings == []


@pytest.mark.parametrize(("source", "target", "relation"), [
    ("data", "data", "is the input"),
    ("data/", "data/scores", "lies inside the input"),
    ("data/scores", "data", "contains the input"),
    ("data/**/*.parquet", "data/scores", "lies inside the input"),
    ("data/*.parquet", "data/scores", None),  # the glob never descends into scores/
    ("data", "data2", None),
    ("s3://b/in/", "s3://b/in", "is the input"),
    ("s3a://b/in", "s3://b//in/./out", "lies inside the input"),
    ("s3://b/in", "s3://b/out", None),
    ("s3://b/in", "gs://b/in", None),
])
def test_an_output_overlapping_the_input_is_refused(tmp_path, monkeypatch, source, target,
                                                    relation):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    if relation is None:
        check_separate(source, target)
    else:
        with pytest.raises(ValueError, match=relation):
            check_separate(source, target)


def test_a_symlinked_output_is_compared_by_its_real_path(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "data")
    with pytest.raises(ValueError, match="is the input"):
        check_separate(str(tmp_path / "data"), str(tmp_path / "alias"))


def test_discovery_never_takes_the_output_as_input(tmp_path, sample):
    write_parquet(None, str(tmp_path / "in" / "a.parquet"), img2dataset_table(sample, 0, 2))
    write_parquet(None, str(tmp_path / "in" / "scores" / "a.parquet"),
                  img2dataset_table(sample, 0, 2))
    shards = discover_shards(str(tmp_path / "in" / "*" ), ReadConfig(format="parquet"),
                             StorageConfig(), exclude=str(tmp_path / "in" / "scores"))
    assert [s.url for s in shards] == [str(tmp_path / "in" / "a.parquet")]


@pytest.mark.parametrize("pattern", [
    "data/run-?/x.parquet", "data/run-[12]/x.parquet", "data/run-*/x.parquet",
    "data/**/x.parquet", "data/run-1/*.parquet", "data/run-?/*", "d?ta/run-1/x.parquet",
    "[d]ata/run-1/x.parquet", "*/run-1/x.parquet"])
def test_output_names_never_escape_the_output_for_any_glob(tmp_path, monkeypatch, sample,
                                                           pattern):
    monkeypatch.chdir(tmp_path)
    for run in ("run-1", "run-2"):
        write_parquet(None, str(tmp_path / "data" / run / "x.parquet"),
                      img2dataset_table(sample, 0, 2))
    shards = discover_shards(pattern, ReadConfig(format="parquet"), StorageConfig())
    assert shards, pattern
    for shard in shards:
        assert not shard.output_name.startswith(("/", "..")), (pattern, shard.output_name)
        assert "x.parquet" in shard.output_name
    names = [s.output_name for s in shards]
    assert len(set(names)) == len(names)  # two runs never share one output file
    # where the writer puts them: inside the output folder, whatever the pattern
    from iqray.pipeline.io.writer import ShardWriter, score_schema

    output = tmp_path / "out" / "scores"
    writer = ShardWriter(shards, str(output), StorageConfig(), {}, complete=True,
                         key_columns=["key"], keep_prompt=True, keep_image_bytes=False,
                         schema=score_schema(["quality", "alignment"]))
    for shard in shards:
        path = writer._path(shard.output_name)
        assert path.startswith(str(output) + "/"), (pattern, path)


def test_a_folder_glob_names_its_chunks_inside_the_output(tmp_path, monkeypatch, sample):
    monkeypatch.chdir(tmp_path)
    names, images, _ = sample
    for run in ("run-1", "run-2"):
        (tmp_path / "imgs" / run).mkdir(parents=True)
        (tmp_path / "imgs" / run / names[0]).write_bytes(images[0])
    shards = discover_shards("imgs/run-?/*", ReadConfig(format="folder"), StorageConfig())
    assert [s.output_name for s in shards] == ["images-00000.parquet"]
    assert sorted(shards[0].prompts) == [f"run-1/{names[0]}", f"run-2/{names[0]}"]


def test_the_writer_refuses_a_name_that_would_leave_the_output(tmp_path):
    from iqray.pipeline.io.storage import output_name_within

    assert output_name_within("a/./b.parquet", "x") == "a/b.parquet"
    for bad in ("../run-1/x.parquet", "/etc/x.parquet", "a/../../x.parquet"):
        with pytest.raises(ValueError, match="outside the output folder"):
            output_name_within(bad, "x")
