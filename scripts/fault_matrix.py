"""Fault matrix: `iqray score` on a local S3 server behind the tests' fault-injecting proxy.

For each case, 12 Parquet shards of 10 images are scored with faults on; the output is
compared with a clean run (keys, scores to 1e-6, duplicates), and when it differs a plain
rerun without faults must restore it. Prints a Markdown table (docs/operations.md holds the
last one). Needs the test extras (moto); about 5 minutes on 2 cores.

    .venv/bin/python scripts/fault_matrix.py
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "support"))
for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1", "IQRAY_OFFLINE": "1"}.items():
    os.environ.setdefault(name, value)

import numpy as np  # noqa: E402
import ray  # noqa: E402
import s3fs  # noqa: E402
from fault_proxy import Fault, FaultProxy  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402
from pipeline_data import TEST_MODEL, img2dataset_table, read_output, write_parquet  # noqa: E402

from iqray.jobs.cli import main  # noqa: E402

SHARDS, ROWS = 12, 10
CASES: list[tuple[str, list[Fault], list[str]]] = [
    ("5% of GETs 500", [Fault("500", "GET", rate=0.05)], []),
    ("50% of GETs 500/503", [Fault("500", "GET", rate=0.25), Fault("503", "GET", rate=0.25)],
     []),
    ("20% of GETs reset", [Fault("reset", "GET", rate=0.2)], []),
    ("20% of GETs cut short", [Fault("truncate", "GET", rate=0.2)], []),
    ("30% of GETs +0.3 s", [Fault("latency", "GET", rate=0.3, delay_s=0.3)], []),
    ("every 2nd PUT 500", [Fault("500", "PUT", every=2)], []),
    ("every 2nd LIST 503", [Fault("503", "LIST", every=2)], []),
    ("60% of GETs 500", [Fault("500", "GET", rate=0.6)], []),
    ("2 shards' GETs always 500, budget 1", [Fault("500", "GET", key="in/003."),
                                             Fault("500", "GET", key="in/007.")],
     ["--max-error-fraction", "1"]),
    ("2 shards' GETs always 500", [Fault("500", "GET", key="in/003."),
                                   Fault("500", "GET", key="in/007.")], []),
    ("every PUT 500", [Fault("500", "PUT")], []),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sample():
    import csv

    rows = list(csv.DictReader(open(REPO / "examples" / "sample" / "prompts.csv")))
    names = [r["name"] for r in rows]
    images = [(REPO / "examples" / "sample" / "images" / n).read_bytes() for n in names]
    return names, images, [r["prompt"] for r in rows]


def outputs(fs, prefix: str):
    paths = sorted(p for p in fs.find(prefix) if p.endswith(".parquet"))
    return read_output(fs, paths) if paths else None


def compare(table, clean) -> tuple[int, int, int, bool]:
    """(output rows, missing keys, duplicate keys, identical to the clean run)."""
    if table is None:
        return 0, clean.num_rows, 0, False
    keys = Counter(table["key"].to_pylist())
    missing = len(set(clean["key"].to_pylist()) - set(keys))
    duplicates = sum(n - 1 for n in keys.values())
    same = (missing == 0 and duplicates == 0 and table["key"].to_pylist() ==
            clean["key"].to_pylist() and all(np.allclose(
                table[c].to_numpy(), clean[c].to_numpy(), atol=1e-6)
                for c in ("quality", "alignment")))
    return table.num_rows, missing, duplicates, same


def score(proxy: FaultProxy, bucket: str, output: str, extra: list[str]) -> int:
    args = ["score", f"s3://{bucket}/in/", f"s3://{bucket}/{output}", "--model", TEST_MODEL,
            "--no-progress", "--s3-endpoint", proxy.url, "--s3-max-attempts", "3",
            "--storage-backoff-s", "0.2", *extra]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(args)


def run() -> None:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    proxy = FaultProxy(f"http://127.0.0.1:{port}").start()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": f"http://127.0.0.1:{port}"},
                           use_listings_cache=False)
    bucket = "faults"
    fs.mkdir(bucket)
    data = sample()
    for i in range(SHARDS):
        write_parquet(fs, f"{bucket}/in/{i:03d}.parquet", img2dataset_table(data, i * ROWS,
                                                                            ROWS))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    assert score(proxy, bucket, "clean", []) == 0
    clean = outputs(fs, f"{bucket}/clean")
    print("| case | faults injected | input rows | output rows | missing | duplicates | exit "
          "| `_SUCCESS` | plain rerun: exit, identical to clean |")
    print("|---|---|---|---|---|---|---|---|---|")
    for number, (label, faults, extra) in enumerate(CASES):
        output = f"case{number}"
        proxy.set(*faults, seed=number)
        code = score(proxy, bucket, output, extra)
        injected = sum(proxy.injected.values())
        proxy.set()
        rows, missing, duplicates, same = compare(outputs(fs, f"{bucket}/{output}"), clean)
        success = fs.exists(f"{bucket}/{output}/_SUCCESS")
        if same:
            rerun = "not needed"
        else:
            again = score(proxy, bucket, output, [])
            restored = compare(outputs(fs, f"{bucket}/{output}"), clean)[3]
            rerun = f"{again}, {'yes' if restored else 'NO'}"
        print(f"| {label} | {injected} | {SHARDS * ROWS} | {rows} | {missing} | {duplicates} | "
              f"{code} | {'yes' if success else 'no'} | {rerun} |", flush=True)
    ray.shutdown()
    proxy.stop()
    server.stop()


if __name__ == "__main__":
    run()
