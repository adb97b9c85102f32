"""Which exceptions are worth another attempt: a whitelist of transport failures. Real
exception objects as fsspec's file systems raise them (s3fs translates botocore's
ClientError into an OSError with an errno, the ClientError as its cause)."""

from __future__ import annotations

import errno

import aiohttp
import botocore.exceptions
import pyarrow as pa
import pytest
from s3fs.errors import translate_boto_error

from iqray.pipeline.io.storage import StorageConfig, StorageUnavailable, is_transient


def cut_body() -> aiohttp.ClientPayloadError:
    """A body cut short under its Content-Length, as aiohttp raises it: the parser's
    ContentLengthError (which carries code 400, the answer a server would give to such a
    request, not one that came back) chained as the cause."""
    parse_error = aiohttp.http_exceptions.ContentLengthError(
        "Not enough data to satisfy content length header")
    try:
        raise aiohttp.ClientPayloadError("Response payload is not completed") from parse_error
    except aiohttp.ClientPayloadError as exc:
        return exc


def s3_error(status: int, code: str) -> OSError:
    error = botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": code},
         "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")
    return translate_boto_error(error)


@pytest.mark.parametrize("exc", [
    ConnectionResetError(errno.ECONNRESET, "reset by peer"),
    ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
    TimeoutError("timed out"),
    aiohttp.ClientPayloadError("Response payload is not completed"),
    cut_body(),
    aiohttp.ServerDisconnectedError(),
    botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:9"),
    botocore.exceptions.ReadTimeoutError(endpoint_url="http://127.0.0.1:9"),
    s3_error(500, "InternalError"),
    s3_error(503, "SlowDown"),
    s3_error(502, "BadGateway"),
    s3_error(400, "RequestTimeout"),
], ids=lambda e: type(e).__name__ + ":" + str(e)[:30])
def test_transport_failures_are_retried(exc):
    assert is_transient(exc)


class Resolver:
    def lookup(self, table):
        return table["rows"]


@pytest.mark.parametrize("exc", [
    TypeError("unsupported operand type(s) for +: 'int' and 'str'"),
    KeyError("rows"),
    AttributeError("'NoneType' object has no attribute 'read'"),
    ZeroDivisionError("division by zero"),
    FileNotFoundError(errno.ENOENT, "no such key"),
    PermissionError(errno.EACCES, "access denied"),
    s3_error(404, "NoSuchKey"),
    s3_error(403, "AccessDenied"),
    s3_error(400, "InvalidArgument"),
    pa.ArrowInvalid("Parquet magic bytes not found"),
    OSError("Couldn't deserialize thrift"),  # pyarrow's damaged page: broken bytes
    StorageUnavailable("read", "s3://b/k", None, ConnectionResetError(), 4),
], ids=lambda e: type(e).__name__ + ":" + str(e)[:30])
def test_everything_else_is_not(exc):
    assert not is_transient(exc)


def test_a_bug_inside_a_storage_call_is_raised_at_once_never_retried():
    calls = []

    def action():
        calls.append(1)
        return Resolver().lookup({})

    storage = StorageConfig(storage_attempts=4, storage_backoff_s=60)  # a retry would hang
    with pytest.raises(KeyError, match="rows"):
        storage.retry(action, "read", "s3://b/k")
    assert calls == [1]
