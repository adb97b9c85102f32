"""`iqray score` on S3 behind a fault-injecting proxy, end to end through Ray: moderate
faults change nothing; faults past every retry leave shards unfinished (exit 4, never
`_SUCCESS`), and a plain rerun gives exactly the clean output."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from fault_proxy import Fault
from pipeline_data import TEST_MODEL, img2dataset_table, read_output, write_parquet

from iqray.jobs.cli import main
from iqray.jobs.score import ScoreConfig, run_score
from iqray.pipeline.execution import ErrorBudgetExceeded, check_error_budget

SHARDS, ROWS = 6, 6
# botocore's own retries kept short so that ours (with a small backoff) do the work.
STORAGE = {"s3_max_attempts": 2, "storage_attempts": 4, "storage_backoff_s": 0.05}


@pytest.fixture(scope="module")
def dataset(s3_endpoint, fault_proxy_server, sample, ray_local):
    """The input in a bucket of its own, and its clean output (scored once per module)."""
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint},
                           use_listings_cache=False)
    bucket = "iqray-score-faults"
    fs.mkdir(bucket)
    for i in range(SHARDS):
        write_parquet(fs, f"{bucket}/in/{i:03d}.parquet", img2dataset_table(sample, i * ROWS,
                                                                             ROWS))
    fault_proxy_server.set()
    clean = score(fault_proxy_server, bucket, "clean")
    assert clean.exit_code == 0 and clean.rows == SHARDS * ROWS
    yield fs, bucket, outputs(fs, bucket, "clean")
    fs.rm(bucket, recursive=True)


def score(proxy, bucket: str, output: str, **kwargs):
    config = ScoreConfig(input=f"s3://{bucket}/in/", output=f"s3://{bucket}/{output}",
                         model=TEST_MODEL, progress=False, s3_endpoint=proxy.url,
                         batch_size=8, decode_batch_size=8, **{**STORAGE, **kwargs})
    return run_score(config, log=lambda *_: None)


def outputs(fs, bucket: str, output: str):
    paths = sorted(p for p in fs.find(f"{bucket}/{output}") if p.endswith(".parquet"))
    return read_output(fs, paths)


def assert_same_output(actual, expected) -> None:
    assert actual.num_rows == expected.num_rows == SHARDS * ROWS
    keys = actual["key"].to_pylist()
    assert keys == expected["key"].to_pylist() and len(set(keys)) == len(keys)
    assert actual["status"].to_pylist() == ["ok"] * actual.num_rows
    for column in ("quality", "alignment"):
        np.testing.assert_allclose(actual[column].to_numpy(), expected[column].to_numpy(),
                                   atol=1e-6)


def test_moderate_faults_on_get_put_and_list_leave_the_output_unchanged(dataset, fault_proxy):
    fs, bucket, expected = dataset
    fault_proxy.set(
        Fault("500", "GET", rate=0.1), Fault("503", "GET", rate=0.1),
        Fault("reset", "GET", rate=0.1), Fault("truncate", "GET", rate=0.1),
        Fault("latency", "GET", rate=0.1, delay_s=0.2),
        # Every write and listing fails once (its retry is the next try).
        Fault("500", "PUT", first=1), Fault("503", "LIST", first=1),
        Fault("500", "HEAD", rate=0.1), seed=7)
    summary = score(fault_proxy, bucket, "faulty")
    injected = Counter()
    for (_, operation), count in fault_proxy.injected.items():
        injected[operation] += count
    fault_proxy.set()
    assert injected["GET"] > 0 and injected["PUT"] > 0 and injected["LIST"] > 0, injected
    assert summary.exit_code == 0 and not summary.unfinished
    assert summary.rows == summary.input_rows == SHARDS * ROWS
    assert_same_output(outputs(fs, bucket, "faulty"), expected)
    assert fs.exists(f"{bucket}/faulty/_SUCCESS")


def test_faults_past_every_retry_leave_shards_unfinished_until_a_plain_rerun(
        dataset, fault_proxy, capsys):
    fs, bucket, expected = dataset
    args = ["score", f"s3://{bucket}/in/", f"s3://{bucket}/out", "--model", TEST_MODEL,
            "--no-progress", "--s3-endpoint", fault_proxy.url, "--s3-max-attempts", "2",
            "--storage-attempts", "2", "--storage-backoff-s", "0.05",
            "--max-error-fraction", "1"]
    fault_proxy.set(Fault("500", "GET", key="in/002.parquet"),
                    Fault("reset", "GET", key="in/004.parquet"))
    assert main(args) == 4
    printed = capsys.readouterr().err
    assert "2 unfinished" in printed and "rerun the same command to finish" in printed
    for shard in ("002", "004"):
        assert f"unfinished: s3://{bucket}/in/{shard}.parquet: cannot read" in printed
    committed = sorted(p.rsplit("/", 1)[1] for p in fs.find(f"{bucket}/out"))
    assert committed == ["000.parquet", "001.parquet", "003.parquet", "005.parquet",
                         "_UNFINISHED"]
    record = json.loads(fs.cat_file(f"{bucket}/out/_UNFINISHED"))["summary"]
    # Their footers could not be read either: their row counts are unknown.
    assert record["unfinished_unknown_shards"] == 2 and record["input_rows"] is None
    assert record["rows"] == 4 * ROWS
    assert sorted(record["unfinished"]) == [f"s3://{bucket}/in/002.parquet",
                                            f"s3://{bucket}/in/004.parquet"]
    assert record["exit_code"] == 4

    # With the default error budget one such shard is over it: it weighs as a typical shard
    # (6 of 36 rows), not as one row.
    fault_proxy.set(Fault("500", "GET", key="in/002.parquet"))
    assert main(args[:-2]) == 3  # 004 was read and committed; 002 was not
    assert "rows of unfinished shards: 6" in capsys.readouterr().err
    assert not fs.exists(f"{bucket}/out/_SUCCESS")
    assert not fs.exists(f"{bucket}/out/002.parquet")

    fault_proxy.set()
    assert main(args) == 0
    printed = capsys.readouterr().err
    assert "5 already committed" in printed and "0 unfinished" in printed
    assert_same_output(outputs(fs, bucket, "out"), expected)
    assert fs.exists(f"{bucket}/out/_SUCCESS") and not fs.exists(f"{bucket}/out/_UNFINISHED")
    summary = json.loads(fs.cat_file(f"{bucket}/out/_SUCCESS"))["summary"]
    assert summary["shards_scored"] == 1 and summary["rows"] == summary["input_rows"] == 6


def test_the_error_budget_is_over_input_rows():
    # The case seen before: 4 of 12 shards of 10 rows failed whole, 80 rows scored.
    with pytest.raises(ErrorBudgetExceeded, match=r"40 of 120 rows failed \(33\.3%\)"):
        check_error_budget(80, Counter(), 40, 0.05, final=True)
    check_error_budget(116, Counter({"decode": 4}), 0, 0.05, final=True)  # 3.3%: within
    with pytest.raises(ErrorBudgetExceeded, match="decode: 4, rows of unfinished shards: 3"):
        check_error_budget(113, Counter({"decode": 4}), 3, 0.05, final=True)
