"""Two executors, one contract: the same input scored in this process (``--executor local``)
and on Ray Data (``--executor ray``) gives the same files: names, columns, rows, error rows,
footers (but the time each was written) and run records; either resumes the other's output."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_data import TEST_MODEL, img2dataset_table, write_parquet

from iqray.jobs.cli import main
from iqray.jobs.score import ScoreConfig, run_score
from iqray.pipeline.local import LOCAL_MAX_ROWS, choose_executor

FLOATS = ("quality", "alignment")  # batch composition may move the last float bit


@pytest.fixture()
def dataset(tmp_path, sample):
    """Two Parquet shards, one with an undecodable image and a row without a prompt."""
    first = img2dataset_table(sample, 0, 20)
    images = first["jpg"].to_pylist()
    images[3] = b"not an image"
    prompts = first["caption"].to_pylist()
    prompts[5] = None
    first = first.set_column(1, "jpg", pa.array(images)).set_column(2, "caption",
                                                                    pa.array(prompts))
    write_parquet(None, str(tmp_path / "in" / "a.parquet"), first)
    write_parquet(None, str(tmp_path / "in" / "b.parquet"), img2dataset_table(sample, 20, 13))
    return tmp_path / "in"


def committed(folder):
    files = {}
    for path in sorted(folder.glob("*.parquet")):
        table = pq.read_table(path)
        footer = json.loads(table.schema.metadata[b"iqray"])
        footer.pop("written")
        files[path.name] = (table.replace_schema_metadata(None), footer)
    return files


def test_local_and_ray_executors_commit_the_same_files(ray_local, dataset, tmp_path):
    summaries = {}
    for executor in ("local", "ray"):
        summaries[executor] = run_score(ScoreConfig(
            input=str(dataset), output=str(tmp_path / executor), model=TEST_MODEL,
            executor=executor, batch_size=8, decode_batch_size=8, progress=False),
            log=lambda *a: None)
    local, ray = committed(tmp_path / "local"), committed(tmp_path / "ray")
    assert sorted(local) == sorted(ray) == ["a.parquet", "b.parquet"]
    for name in local:
        (table_l, footer_l), (table_r, footer_r) = local[name], ray[name]
        assert footer_l == footer_r
        assert table_l.schema == table_r.schema
        for column in table_l.column_names:
            left, right = table_l[column], table_r[column]
            if column in FLOATS:
                np.testing.assert_allclose(left.to_numpy(zero_copy_only=False),
                                           right.to_numpy(zero_copy_only=False), atol=1e-6)
            else:
                assert left.to_pylist() == right.to_pylist(), column
    a = local["a.parquet"][0]
    assert a["status"].to_pylist().count("error") == 1 and a["error_kind"][3].as_py() == "decode"
    assert np.isnan(a["alignment"][5].as_py())
    for key in ("rows", "ok", "errors", "shards_scored", "input_rows", "unfinished"):
        assert getattr(summaries["local"], key) == getattr(summaries["ray"], key), key
    for records in ("_SUCCESS",):
        assert (tmp_path / "local" / records).exists() and (tmp_path / "ray" / records).exists()
    assert summaries["local"].operators[0].startswith("in process")
    assert "ray_started" not in summaries["local"].timeline

    # either executor resumes the other's output: nothing to score
    again = run_score(ScoreConfig(input=str(dataset), output=str(tmp_path / "local"),
                                  model=TEST_MODEL, executor="ray", progress=False),
                      log=lambda *a: None)
    assert (again.shards_skipped, again.shards_scored) == (2, 0)


def test_auto_runs_small_inputs_here_and_large_or_clustered_ones_on_ray(dataset, monkeypatch):
    from iqray.pipeline.io.discovery import discover_shards
    from iqray.pipeline.io.storage import StorageConfig

    config = ScoreConfig(input=str(dataset), output="unused", model=TEST_MODEL)
    shards = discover_shards(str(dataset), config.read_config(), StorageConfig())
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert choose_executor(config, shards) == "local"
    big = [dataclasses.replace(s, estimated_rows=LOCAL_MAX_ROWS) for s in shards]
    assert choose_executor(config, big) == "ray"
    unknown = [dataclasses.replace(s, estimated_rows=None) for s in shards]
    assert choose_executor(config, unknown) == "ray"
    assert choose_executor(config.model_copy(update={"ray_address": "auto"}), shards) == "ray"
    assert choose_executor(config.model_copy(update={"commit": "actors"}), shards) == "ray"
    assert choose_executor(config.model_copy(update={"executor": "ray"}), shards) == "ray"
    for ray_option in ({"ray_num_cpus": 2}, {"object_store_memory": 2**27},
                       {"num_actors": 1}, {"max_in_flight_bytes": 2**28}):
        assert choose_executor(config.model_copy(update=ray_option), shards) == "ray"
    assert choose_executor(config.model_copy(update={"limit": 5}), shards) == "local"
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert choose_executor(config, shards) == "ray"


def test_commit_actors_with_the_local_executor_is_refused_before_anything(dataset, tmp_path,
                                                                          capsys):
    assert main(["score", str(dataset), str(tmp_path / "out"), "--model", TEST_MODEL,
                 "--executor", "local", "--commit", "actors"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--commit actors" in err and "--executor ray" in err
    assert not (tmp_path / "out").exists()
