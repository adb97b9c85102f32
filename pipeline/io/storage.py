"""Object storage access: any fsspec URL (local paths, s3://, gs://, ...).

S3 endpoint, credentials and region come from the usual AWS environment variables and config
files (boto's chain); ``StorageConfig.s3_endpoint`` overrides the endpoint explicitly (MinIO,
moto, R2, ...). The config is plain data so Ray tasks rebuild the filesystem on their side.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import http.client
import importlib
import os
import posixpath
import random
import ssl
import sys
import tarfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, TypeVar

import fsspec
from fsspec.core import url_to_fs
from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class StorageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    group_title: ClassVar[str] = "storage"  # its --help section in the jobs that use it

    s3_endpoint: str | None = Field(
        default=None, description="S3 endpoint URL override (else AWS_ENDPOINT_URL / AWS config)"
    )
    s3_anonymous: bool = Field(default=False, description="unsigned S3 requests (public buckets)")
    s3_max_attempts: int | None = Field(
        default=None, gt=0, description="attempts per S3 request inside botocore (its "
        "standard retry mode); default: botocore's own setting")
    storage_attempts: int = Field(
        default=4, gt=0, description="attempts of each whole read, listing or commit that "
        "fails with a storage error, on top of the client's own retries; a shard that still "
        "fails is left unfinished (not committed) for the next run")
    storage_backoff_s: float = Field(
        default=1.0, ge=0, description="first wait between those attempts; doubles each "
        "time, with jitter, up to 30 s")

    def options_for(self, url: str) -> dict[str, Any]:
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        if protocol in ("gs", "gcs"):
            return {"use_listings_cache": False}
        if protocol not in ("s3", "s3a"):
            return {}
        # fsspec keeps one filesystem per set of options for the whole process; with its
        # listing cache, a second job in the same process would not see objects added since
        # the first one listed the prefix (an incremental rerun would miss new shards).
        options: dict[str, Any] = {"use_listings_cache": False}
        endpoint = self.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
            "AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
        if self.s3_anonymous:
            options["anon"] = True
        if self.s3_max_attempts is not None:
            options["config_kwargs"] = {"retries": {"max_attempts": self.s3_max_attempts,
                                                    "mode": "standard"}}
        return options

    def endpoint_for(self, url: str) -> str | None:
        """The endpoint requests for ``url`` go to, for messages (None: the default)."""
        return self.options_for(url).get("endpoint_url")

    def retry(self, action: Callable[[], T], what: str, url: str) -> T:
        """``action()``, again after storage errors (:func:`is_transient`) with bounded,
        jittered backoff; then :class:`StorageUnavailable`, naming ``url`` and the endpoint.
        Errors that another attempt cannot change (a missing file, bad content) pass at once.
        """
        for attempt in range(1, self.storage_attempts + 1):
            try:
                return action()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if attempt == self.storage_attempts:
                    raise StorageUnavailable(what, url, self.endpoint_for(url), exc,
                                             attempt) from exc
                time.sleep(self.backoff_s(attempt))
        raise AssertionError("unreachable")

    def missing(self, url: str) -> str:
        """Why ``url`` is not there, for a one-line error: on an object store, whether its
        bucket exists, and at which endpoint (a forgotten --s3-endpoint looks like this)."""
        bucket = _bucket_name(url)
        if bucket is None:
            return f"{url} does not exist"
        endpoint = self.endpoint_for(url) or "the default endpoint"
        try:
            _, found = self._bucket(url)
        except (StorageUnavailable, *PERMANENT_OS_ERRORS) as exc:
            return f"{url}: cannot look up bucket {bucket!r} at {endpoint}: {exc}"
        if not found:
            return self._no_bucket(url, bucket)
        return f"{url} does not exist (bucket {bucket!r} at {endpoint})"

    def check_output(self, url: str, name: str = "output") -> None:
        """Before anything runs: an output on an object store needs an existing bucket (a
        missing one would fail only at the first commit, after the work)."""
        looked = self._bucket(url)
        if looked is not None and not looked[1]:
            raise ValueError(f"{name} {self._no_bucket(url, looked[0])}")

    def _bucket(self, url: str) -> tuple[str, bool] | None:
        """(bucket, whether it exists) of an object-store URL; None for a local path."""
        bucket = _bucket_name(url)
        if bucket is None:
            return None
        fs, _ = self.filesystem(url)
        return bucket, self.retry(lambda: fs.exists(bucket), "look up the bucket of", url)

    def _no_bucket(self, url: str, bucket: str) -> str:
        endpoint = self.endpoint_for(url) or "the default endpoint"
        return (f"{url}: bucket {bucket!r} does not exist at {endpoint} (is --s3-endpoint / "
                "AWS_ENDPOINT_URL right?)")

    def backoff_s(self, attempt: int) -> float:
        """Wait after the ``attempt``-th failure: exponential, capped, +-50% jitter so that
        many workers hitting one throttled prefix do not retry in lockstep."""
        return min(30.0, self.storage_backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)

    def storage_config(self) -> StorageConfig:
        """Just the storage settings of a job config that extends this class (plain data
        for Ray tasks and helpers)."""
        return StorageConfig.model_validate(
            self.model_dump(include=set(StorageConfig.model_fields)))

    def filesystem(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """(filesystem, path without protocol) for ``url``."""
        return url_to_fs(url, **self.options_for(url))


def _bucket_name(url: str) -> str | None:
    """The bucket of an object-store URL; None for a local path."""
    if "://" not in url or url.startswith("file://"):
        return None
    return url.split("://", 1)[1].split("/", 1)[0]


class StorageUnavailable(OSError):
    """Storage kept failing after every retry: the message is one line for the user."""

    def __init__(self, what: str, url: str, endpoint: str | None, cause: BaseException,
                 attempts: int):
        self.url, self.endpoint, self.cause = url, endpoint, cause
        where = f" at {endpoint}" if endpoint else ""
        detail = " ".join(str(cause).split())[:300]
        hint = (" (is --s3-endpoint / AWS_ENDPOINT_URL right?)"
                if "://" in url and "Connect" in type(cause).__name__ else "")
        super().__init__(f"cannot {what} {url}{where} after {attempts} attempts: "
                         f"{type(cause).__name__}: {detail}{hint}")


# A file that is absent or refused: another attempt gets the same answer.
PERMANENT_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError,
                       PermissionError)
# One image a row names cannot be read (missing, refused, a bad URL, storage down past
# every retry): that row is an error row. Anything else is a bug and propagates.
ROW_READ_FAILURES = (OSError, ValueError)
# What parsers raise on bad bytes (pyarrow's ArrowInvalid is a ValueError).
BROKEN_BYTES_ERRORS = (ValueError, tarfile.TarError, EOFError, zlib.error)


def is_broken_bytes(exc: BaseException) -> bool:
    """The bytes read do not parse. A read cut short looks the same, so readers confirm it
    with a second read before they call a file broken. pyarrow reports damaged pages as a
    bare OSError without an errno ("Couldn't deserialize thrift"), where the file systems'
    own errors carry one (s3fs maps S3 errors to errnos; other clients raise their own
    types)."""
    if type(exc) is OSError and exc.errno is None:
        return True
    return isinstance(exc, BROKEN_BYTES_ERRORS) and not isinstance(exc, OSError)


# Transport failures another attempt can cure. A whitelist: anything else (a missing
# file, bad bytes, a TypeError in our own code) is passed on at once, never retried.
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "TooManyRequests",
    "RequestLimitExceeded", "RequestThrottled", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "BandwidthLimitExceeded"})
TRANSIENT_ERRNOS = frozenset(getattr(errno, name) for name in (
    "EIO", "EREMOTEIO", "EBUSY", "EAGAIN", "ETIMEDOUT", "ECONNRESET", "ECONNREFUSED",
    "ECONNABORTED", "EPIPE", "ENETUNREACH", "ENETDOWN", "ENETRESET", "EHOSTUNREACH")
    if hasattr(errno, name))


@functools.cache
def _transport_errors() -> tuple[type[BaseException], ...]:
    """Exception classes of the network stacks fsspec's file systems run on (those that
    are installed): connection, timeout and cut-body errors."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError,
                                        http.client.HTTPException, ssl.SSLEOFError]
    optional = {
        "fsspec.exceptions": ("FSTimeoutError",),
        "aiohttp": ("ClientConnectionError", "ClientPayloadError", "ServerTimeoutError"),
        "botocore.exceptions": ("ConnectionError", "HTTPClientError", "IncompleteReadError",
                                "ResponseStreamingError", "ReadTimeoutError",
                                "ConnectTimeoutError"),
        "urllib3.exceptions": ("ProtocolError", "TimeoutError", "NewConnectionError"),
        "requests.exceptions": ("ConnectionError", "Timeout", "ChunkedEncodingError"),
    }
    for module_name, names in optional.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        found += [getattr(module, name) for name in names if hasattr(module, name)]
    return tuple(found)


def _http_answer(exc: BaseException) -> tuple[int | None, str | None]:
    """(HTTP status, error code) a client error carries: botocore's ClientError (s3fs
    chains it as the cause of the OSError it raises), aiohttp's ClientResponseError,
    gcsfs' HttpError. aiohttp's parse errors (a body cut short) carry a ``code`` too, the
    answer a server would give to what was received; nothing came back, so they are none."""
    if _is_parse_error(exc):
        return None, None
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status, response.get("Error", {}).get("Code")
    for attribute in ("status", "code"):
        value = getattr(exc, attribute, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value, None
    return None, None


def _is_parse_error(exc: BaseException) -> bool:
    module = sys.modules.get("aiohttp.http_exceptions")
    return module is not None and isinstance(exc, module.HttpProcessingError)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from (explicit causes)."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__
    return seen


def is_transient(exc: BaseException) -> bool:
    """Whether another attempt could succeed: transport errors only (connections reset or
    refused, timeouts, bodies cut short, HTTP 5xx, 408 and 429, throttling codes). An HTTP
    answer anywhere in the exception's causes decides; else its class or errno must be a
    known transport failure. Everything else (a missing file, bad bytes, a bug) is not."""
    if isinstance(exc, StorageUnavailable):
        return False  # an inner retry already gave up
    chain = _chain(exc)
    for link in chain:
        status, code = _http_answer(link)
        if code in TRANSIENT_CODES:
            return True
        if status is not None:
            return status in TRANSIENT_STATUS
    for link in chain:
        if isinstance(link, PERMANENT_OS_ERRORS):
            return False
        if isinstance(link, _transport_errors()):
            return True
        if isinstance(link, OSError) and link.errno in TRANSIENT_ERRNOS:
            return True
    return False


GLOB_CHARS = "*?["


def glob_base(path: str) -> str:
    """The folder a glob's matches all lie under: everything before the last '/' ahead of
    its first glob character ('' when the pattern starts in the first path part). Any of
    ``*``, ``?`` and ``[`` starts a pattern, not only ``*``."""
    glob_at = min((path.find(ch) for ch in GLOB_CHARS if ch in path), default=-1)
    if glob_at < 0:
        return path
    cut = path.rfind("/", 0, glob_at)
    return path[:cut] if cut >= 0 else ""


def output_name_within(relative: str, source: str) -> str:
    """``relative`` (an input file's path below the input's base) as an output file name that
    stays inside the output folder; ValueError for one that would leave it ('..', absolute),
    which only a base computed wrongly could produce."""
    name = posixpath.normpath(relative)
    if name.startswith("/") or name == ".." or name.startswith("../") or name == ".":
        raise ValueError(f"{source}: its output name {relative!r} would lie outside the "
                         "output folder; iqray never writes outside what it owns")
    return name


def location(url: str) -> tuple[str, str]:
    """(protocol, normalised path) of a URL, to compare two of them: local real paths;
    bucket + prefix without trailing slashes on object stores. A glob keeps its pattern
    after the last folder before its first glob character."""
    protocol = {"gcs": "gs", "s3a": "s3"}.get(protocol_of(url), protocol_of(url))
    path = url.split("://", 1)[1] if "://" in url else url
    base = glob_base(path)
    pattern = path[len(base):].lstrip("/") if base != path else ""
    if protocol == "file":
        base = os.path.realpath(os.path.expanduser(base or "."))
    else:
        base = posixpath.normpath("/" + base).strip("/")
    return protocol, posixpath.join(base, pattern) if pattern else base


def inside(path: str, folder: str) -> bool:
    return folder in ("", "/") or path == folder or path.startswith(folder.rstrip("/") + "/")


def _glob_reaches(pattern: str, folder: str) -> bool:
    """Whether a glob could match a path strictly inside ``folder``."""
    parts, inner = pattern.strip("/").split("/"), folder.strip("/").split("/")
    for i, part in enumerate(parts):
        if "**" in part or i == len(inner):
            return True
        if not fnmatch.fnmatchcase(inner[i], part):
            return False
    return False


def check_separate(input_url: str, output_url: str, output_name: str = "output") -> None:
    """Refuse (ValueError, before anything is read or written) an output that is the input,
    lies inside it (it would be read back as input) or contains it (outputs would be
    written over input files)."""
    (source_protocol, source), (target_protocol, target) = (location(input_url),
                                                            location(output_url))
    if source_protocol != target_protocol:
        return
    if any(ch in source for ch in GLOB_CHARS):
        base = glob_base(source)
        relation = ("contains the input" if inside(base, target) else
                    "lies inside the input" if _glob_reaches(source, target) else None)
    else:
        relation = ("is the input" if source == target else
                    "lies inside the input" if inside(target, source) else
                    "contains the input" if inside(source, target) else None)
    if relation:
        raise ValueError(f"the {output_name} {output_url} {relation} {input_url}: iqray never "
                         f"writes where it reads; choose an {output_name} outside the input")


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def join_url(root: str, *parts: str) -> str:
    """Join path parts onto a URL or local path, keeping the protocol."""
    if "://" in root:
        protocol, rest = root.split("://", 1)
        return f"{protocol}://" + posixpath.join(rest, *parts)
    return os.path.join(root, *parts)


def to_url(fs: fsspec.AbstractFileSystem, path: str, like: str) -> str:
    """A path returned by ``fs`` (no protocol) as a URL with the same protocol as ``like``."""
    protocol = protocol_of(like)
    return path if protocol == "file" else f"{protocol}://{path}"


def fingerprint(info: dict[str, Any]) -> str:
    """What says a file changed: size plus ETag (object stores) or mtime (file systems)."""
    size = info.get("size")
    tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("mtime") or \
        info.get("LastModified") or info.get("updated") or ""
    return f"{size}:{tag}"


_WRITTEN = [0]  # files this process (the driver) has committed: see files_written


def files_written() -> int:
    """How many files this process has written with :func:`write_atomic` (plus those commit
    actors wrote for it, see :func:`note_written`): whether an error comes before or after
    the run changed anything, which its exit code must tell (2: nothing written)."""
    return _WRITTEN[0]


def note_written(count: int) -> None:
    """Count files another process committed for this one (``--commit actors``)."""
    _WRITTEN[0] += count


@contextlib.contextmanager
def cache_fill() -> Iterator[None]:
    """Writes inside are a cache being filled on the way to a job's output (``iqray train``
    embedding its tables), not the output: :func:`files_written` does not count them, so a
    mistake found afterwards still exits 2. A cache entry is correct whenever it exists."""
    _FILLING_CACHE[0] += 1
    try:
        yield
    finally:
        _FILLING_CACHE[0] -= 1


_FILLING_CACHE = [0]


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so that readers see either no file or the whole file.

    Local: temp file in the same folder + rename. Object stores: one PUT (an object becomes
    visible only once its upload completes).
    """
    _write_atomic(fs, path, data)
    if not _FILLING_CACHE[0]:
        _WRITTEN[0] += 1


def _write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    if protocol_of(_fs_protocol(fs)) == "file":
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def _fs_protocol(fs: fsspec.AbstractFileSystem) -> str:
    protocol = fs.protocol
    name = protocol[0] if isinstance(protocol, tuple | list) else protocol
    return "file" if name in ("file", "local") else f"{name}://"
