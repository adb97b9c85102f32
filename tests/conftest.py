"""Shared fixtures: the shipped sample and tiny random-init models (never any download)."""

from __future__ import annotations

import csv
import os
import socket
from pathlib import Path

import pytest

# Tests must never reach a model hub.
os.environ.setdefault("IQRAY_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("IQRAY_CHECK_ROWS", "1")  # every stage output checked against rows.py
# Ray workers of this session can import the test support modules (test-only architectures).
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [
    str(Path(__file__).resolve().parent / "support"), os.environ.get("PYTHONPATH")]))
# Credentials for the local S3 test server; set before Ray starts so its workers inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "sample"


@pytest.fixture(scope="session")
def sample_rows() -> list[dict]:
    with open(SAMPLE / "prompts.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["path"] = SAMPLE / "images" / row["name"]
    return rows


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample():
    """(names, image bytes, prompts) of the shipped sample."""
    with open(SAMPLE / "prompts.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    names = [r["name"] for r in rows]
    images = [(SAMPLE / "images" / n).read_bytes() for n in names]
    prompts = [r["prompt"] for r in rows]
    return names, images, prompts


@pytest.fixture(scope="session")
def reference_model():
    import iqray.model

    return iqray.model.load("mst-clipiqa-tiny-random")


# A real S3-compatible server (moto) on 127.0.0.1 and fresh buckets.
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture()
def s3_bucket(s3_endpoint, request):
    """A fresh bucket per test; returns (s3fs filesystem, bucket name)."""
    import s3fs

    name = "iqray-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace(
        "]", "")[:40].strip("-")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, use_listings_cache=False)
    fs.mkdir(name)
    yield fs, name
    fs.rm(name, recursive=True)


@pytest.fixture(scope="session")
def fault_proxy_server(s3_endpoint):
    from fault_proxy import FaultProxy

    proxy = FaultProxy(s3_endpoint).start()
    yield proxy
    proxy.stop()


@pytest.fixture()
def fault_proxy(fault_proxy_server):
    """The S3 test server behind a fault-injecting proxy (``.url``; ``.set(Fault(...))``);
    transparent again after the test."""
    fault_proxy_server.set()
    yield fault_proxy_server
    fault_proxy_server.set()
