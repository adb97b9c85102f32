"""Pipeline fixtures: a real S3-compatible server (moto) on 127.0.0.1 and fresh buckets."""

from __future__ import annotations

import socket

import pytest


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
