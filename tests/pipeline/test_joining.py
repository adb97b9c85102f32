"""Joining chosen score rows back to the source dataset, directly (pyarrow, no Ray): the rows
of Parquet shards, the samples of tar shards, and a folder's images, with their scores."""

from __future__ import annotations

import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_data import img2dataset_table, wds_members, write_parquet, write_tar

from iqray.pipeline.io.storage import StorageConfig
from iqray.pipeline.tables.joining import join_to_source, relative_to


def _scores(source_file: str, rows: list[int]) -> pa.Table:
    return pa.table({"source_file": [source_file] * len(rows), "source_row": rows,
                     "prompt": [f"p{r}" for r in rows],
                     "quality": pa.array([r / 10 for r in rows], pa.float32())})


def test_kept_rows_are_copied_out_of_each_kind_of_source(tmp_path, sample):
    names, images, _ = sample
    src = tmp_path / "src"
    table = img2dataset_table(sample, 0, 6)
    write_parquet(None, str(src / "part" / "a.parquet"), table)
    write_tar(None, str(src / "b.tar"), wds_members(sample, 0, 4))
    for name, data in zip(names[:2], images[:2], strict=True):
        (src / name).write_bytes(data)
    chosen = pa.concat_tables([
        _scores(str(src / "part" / "a.parquet"), [4, 1]),
        _scores(str(src / "b.tar"), [2]),
        _scores(str(src / names[1]), [0])])
    written = join_to_source(chosen, str(src), str(tmp_path / "out"), StorageConfig(),
                             ["quality"])
    assert sorted(p.removeprefix(str(tmp_path / "out") + "/") for p in written) == [
        "b.tar", "images.parquet", "part/a.parquet"]

    rows = pq.read_table(tmp_path / "out" / "part" / "a.parquet")
    assert rows["key"].to_pylist() == [table["key"][4].as_py(), table["key"][1].as_py()]
    assert rows["jpg"].to_pylist() == [table["jpg"][4].as_py(), table["jpg"][1].as_py()]
    assert rows["quality"].to_pylist() == pytest.approx([0.4, 0.1])

    with tarfile.open(tmp_path / "out" / "b.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    assert sorted(members) == ["000002.iqray.json", "000002.jpg", "000002.txt"]
    assert members["000002.jpg"] == images[2]
    assert json.loads(members["000002.iqray.json"])["quality"] == pytest.approx(0.2)

    folder = pq.read_table(tmp_path / "out" / "images.parquet")
    assert folder["name"].to_pylist() == [names[1]]
    assert folder["image"].to_pylist() == [images[1]]


def test_a_row_from_outside_the_join_source_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is not under the join source"):
        relative_to(str(tmp_path / "elsewhere" / "a.parquet"), str(tmp_path / "src"))
    assert relative_to("s3://b/src/x/a.tar", "s3://b/src/") == "x/a.tar"
