"""The shard writer and resume planning, called directly (no Ray): what is committed, what
is left unfinished, and the files iqray refuses to write over."""

from __future__ import annotations

import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fault_proxy import Fault
from pipeline_data import img2dataset_table, write_parquet

from iqray.pipeline.io.resume import plan_resume, read_output_metadata
from iqray.pipeline.io.shards import Shard
from iqray.pipeline.io.storage import StorageConfig
from iqray.pipeline.io.writer import (
    SUCCESS_NAME,
    UNFINISHED_NAME,
    ShardWriter,
    score_schema,
    shard_parts,
)
from iqray.pipeline.rows import SHARD_UNFINISHED

SCHEMA = score_schema(["quality", "alignment"])


def shards(count: int, rows: int | None = 3) -> list[Shard]:
    return [Shard(i, f"/in/{i}.parquet", "parquet", f"{i}.parquet", f"fp{i}",
                  estimated_rows=rows) for i in range(count)]


def batch(shard: int, rows: range, end: int = -1, kinds: list | None = None) -> pa.Table:
    kinds = kinds or [None] * len(rows)
    return pa.table({
        "source_file": [f"/in/{shard}.parquet"] * len(rows), "source_row": list(rows),
        "key": [f"{shard}-{r}" for r in rows], "quality": [0.5] * len(rows),
        "status": ["ok" if k is None else "error" for k in kinds],
        "error": [None if k is None else f"{k} here" for k in kinds], "error_kind": kinds,
        "_shard": [shard] * len(rows), "_shard_end": [end] * len(rows)})


def writer(todo, output, storage=None) -> ShardWriter:
    return ShardWriter(todo, output, storage or StorageConfig(), {"scoring_hash": "h"},
                       complete=True, key_columns=["key"], keep_prompt=False,
                       keep_image_bytes=False, schema=SCHEMA)


def test_a_shard_is_committed_once_whole_and_an_unfinished_one_never(tmp_path):
    todo = shards(3)
    out = writer(todo, str(tmp_path / "out"))
    # Shard 1's reader gave up after two rows: its marker arrives before one of its rows.
    out.add(pa.concat_tables([batch(0, range(2)), batch(1, range(2))]))
    out.add(batch(1, range(2, 3), end=3, kinds=[SHARD_UNFINISHED]))
    out.add(batch(0, range(2, 3), end=3, kinds=["decode"]))
    out.add(batch(1, range(1, 2)))  # in flight when the shard failed: dropped
    out.add(batch(2, range(3), end=3))
    out.finish()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0.parquet", "2.parquet"]
    assert out.unfinished_urls() == {"/in/1.parquet": f"{SHARD_UNFINISHED} here"}  # as sent
    ok, errors, unfinished_rows = out.tally()
    assert (ok, dict(errors), unfinished_rows) == (5, {"decode": 1}, 3)
    meta = read_output_metadata(fsspec.filesystem("file"), str(tmp_path / "out" / "0.parquet"))
    assert meta["rows"] == meta["input_rows"] == 3 and meta["errors"] == 1

    assert out.write_run_record({"summary": {}}) == UNFINISHED_NAME
    assert not (tmp_path / "out" / SUCCESS_NAME).exists()
    record = json.loads((tmp_path / "out" / UNFINISHED_NAME).read_text())
    assert record["scoring_hash"] == "h"


def test_a_shard_whose_rows_went_missing_is_left_unfinished(tmp_path):
    out = writer(shards(1), str(tmp_path / "out"))
    out.add(batch(0, range(1)))  # the shard's end marker never arrives
    out.finish()
    assert not (tmp_path / "out").exists()
    assert "1 rows arrived, more expected" in out.unfinished_urls()["/in/0.parquet"]


def test_an_output_that_cannot_be_written_is_unfinished_not_lost(s3_bucket, fault_proxy):
    fs, bucket = s3_bucket
    storage = StorageConfig(s3_endpoint=fault_proxy.url, s3_max_attempts=1,
                            storage_attempts=2, storage_backoff_s=0.01)
    todo = shards(2)
    out = writer(todo, f"s3://{bucket}/out", storage)
    fault_proxy.set(Fault("500", "PUT", key="out/1.parquet"))
    out.add(pa.concat_tables([batch(0, range(3), end=3), batch(1, range(3), end=3)]))
    assert out.committed == [f"s3://{bucket}/out/0.parquet"]
    assert "cannot write" in out.unfinished_urls()["/in/1.parquet"]
    assert fault_proxy.injected[("500", "PUT")] >= 2
    fault_proxy.set(Fault("503", "PUT", rate=0.5), seed=1)  # moderate faults: retried away
    again = writer(todo[1:], f"s3://{bucket}/out", storage)
    again.add(batch(1, range(3), end=3))
    assert again.committed == [f"s3://{bucket}/out/1.parquet"] and not again.unfinished


def test_resume_refuses_to_write_over_files_iqray_did_not_write(tmp_path, sample):
    output = tmp_path / "out"
    todo = shards(2)
    done = writer(todo[:1], str(output))
    done.add(batch(0, range(3), end=3))
    assert plan_resume(todo, str(output), StorageConfig(), "h", False)[0] == todo[1:]

    write_parquet(None, str(output / "1.parquet"), img2dataset_table(sample, 0, 2))
    with pytest.raises(ValueError, match=r"1\.parquet exists and has no iqray footer"):
        plan_resume(todo, str(output), StorageConfig(), "h", False)
    (output / "1.parquet").write_text("my notes")
    with pytest.raises(ValueError, match="never writes over a file it did not write"):
        plan_resume(todo, str(output), StorageConfig(), "h", False)
    (output / "1.parquet").unlink()

    for name in (SUCCESS_NAME, UNFINISHED_NAME):
        (output / name).write_text("done by hand")
        with pytest.raises(ValueError, match=f"{name} exists and is not an iqray run summary"):
            plan_resume(todo, str(output), StorageConfig(), "h", False)
        assert (output / name).read_text() == "done by hand"
        (output / name).unlink()


def test_a_broken_file_of_unknown_size_records_that_in_its_footer(tmp_path):
    todo = shards(1, rows=None)
    out = writer(todo, str(tmp_path / "out"))
    out.add(batch(0, range(2), end=2, kinds=[None, "shard_corrupt"]))
    meta = pq.read_schema(tmp_path / "out" / "0.parquet").metadata[b"iqray"]
    assert json.loads(meta)["input_rows"] is None and out.unknown_size == 1


def test_commit_actors_split_the_shards_and_the_driver_writer_reports_as_if_it_wrote(tmp_path):
    """--commit actors without Ray: two CommitActors (the class the actors run) over the
    shards routed to them, their reports folded into the driver's writer, give the same
    files, counts and unfinished shards as one writer fed the same rows."""
    from iqray.pipeline.commit import CommitActor, _tally_rows

    def feed(add):
        add(pa.concat_tables([batch(0, range(2)), batch(1, range(2))]))
        add(batch(1, range(2, 3), end=3, kinds=[SHARD_UNFINISHED]))
        add(batch(0, range(2, 3), end=3, kinds=["decode"]))
        add(batch(2, range(3), end=3))
        add(batch(3, range(3), end=3))

    alone = writer(shards(4), str(tmp_path / "alone"))
    feed(alone.add)
    alone.finish()

    driver = writer(shards(4), str(tmp_path / "pool"))
    owned = [[s for s in shards(4) if s.index % 2 == n] for n in range(2)]
    actors = [CommitActor(part, driver.remote_kwargs(part)) for part in owned]

    def route(table):  # what CommitRouter does, without Ray
        for shard_id, part in shard_parts(table):
            actors[shard_id % 2].add(part)

    feed(route)
    assert actors[1].received_rows() == {1: 3, 3: 3}
    for actor in actors:
        driver.absorb(actor.finish())
    assert sorted(p.name for p in (tmp_path / "pool").iterdir()) == sorted(
        p.name for p in (tmp_path / "alone").iterdir()) == ["0.parquet", "2.parquet",
                                                           "3.parquet"]
    for name in ("0.parquet", "2.parquet", "3.parquet"):
        assert pq.read_table(tmp_path / "pool" / name).equals(
            pq.read_table(tmp_path / "alone" / name))
    assert driver.tally() == alone.tally() and driver.unfinished == alone.unfinished
    assert sorted(driver.committed) == [str(tmp_path / "pool" / n)
                                        for n in ("0.parquet", "2.parquet", "3.parquet")]

    # An empty batch routes nothing and stands for no rows.
    import numpy as np

    from iqray.pipeline.commit import CommitRouter

    empty = CommitRouter([]).route({"_shard": np.zeros(0, np.int64),
                                    "quality": np.zeros(0, np.float32)})
    assert len(empty["_tally_rows"]) == 0 and "_model_s" in empty

    # The driver's tally rows: one per shard part, standing for its rows.
    part = batch(2, range(3), end=3).append_column("_model_s", pa.array([0.5, 0.25, 0.25]))
    tally = _tally_rows(part, 2)
    assert list(tally["_tally_rows"]) == [3] and list(tally["_model_s"]) == [1.0]


@pytest.mark.parametrize("footer_hash", ["scoring_hash", "config_hash"])
def test_a_shard_written_under_either_footer_hash_name_is_recognised(tmp_path, footer_hash):
    """Earlier runs wrote the hash as ``config_hash`` too; their shards stay committed."""
    todo = shards(1)
    out = ShardWriter(todo, str(tmp_path / "out"), StorageConfig(), {footer_hash: "h"},
                      complete=True, key_columns=["key"], keep_prompt=False,
                      keep_image_bytes=False, schema=SCHEMA)
    out.add(batch(0, range(3), end=3))
    out.finish()
    left, done, _ = plan_resume(todo, str(tmp_path / "out"), StorageConfig(), "h", False)
    assert (left, len(done)) == ([], 1)
    left, _, _ = plan_resume(todo, str(tmp_path / "out"), StorageConfig(), "other", False)
    assert left == todo


class JsonLinesFormat:
    """Another output format in one class: the footer on the first line, then one JSON
    object per row."""

    name = "jsonl"

    def encode(self, table: pa.Table, footer: dict) -> bytes:
        lines = [json.dumps(footer)] + [json.dumps(r) for r in table.to_pylist()]
        return "\n".join(lines).encode()

    def read_footer(self, fs, path: str) -> dict | None:
        with fs.open(path, "rb") as handle:
            first = handle.readline()
        try:
            footer = json.loads(first)
        except ValueError:
            return None
        return footer if isinstance(footer, dict) and "input_fingerprint" in footer else None

    def read_table(self, fs, path: str) -> pa.Table:
        with fs.open(path, "rb") as handle:
            lines = handle.read().splitlines()[1:]
        return pa.Table.from_pylist([json.loads(line) for line in lines])


def test_another_output_format_is_one_class_and_resume_follows_it(tmp_path):
    jsonl = JsonLinesFormat()
    todo = shards(2)
    out = ShardWriter(todo, str(tmp_path / "out"), StorageConfig(), {"scoring_hash": "h"},
                      complete=True, key_columns=["key"], keep_prompt=False,
                      keep_image_bytes=False, schema=SCHEMA, output_format=jsonl)
    out.add(batch(0, range(3), end=3, kinds=[None, "decode", None]))
    out.add(batch(1, range(2)))  # its last row never arrives: unfinished
    out.finish()
    lines = (tmp_path / "out" / "0.parquet").read_text().splitlines()
    assert json.loads(lines[0])["rows"] == 3 and json.loads(lines[2])["error_kind"] == "decode"
    again, done, _ = plan_resume(shards(2), str(tmp_path / "out"), StorageConfig(), "h",
                                 retry_failed=False, output_format=jsonl)
    assert [s.index for s in done] == [0] and [s.index for s in again] == [1]
    # --retry-failed reads the old rows back through the same format
    again, done, previous = plan_resume(shards(2), str(tmp_path / "out"), StorageConfig(),
                                        "h", retry_failed=True, output_format=jsonl)
    assert again[0].only_rows == [1] and previous[0].num_rows == 3
