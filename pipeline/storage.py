"""Object storage access: any fsspec URL (local paths, s3://, gs://, ...).

S3 endpoint, credentials and region come from the usual AWS environment variables and config
files (boto's chain); ``StorageConfig.s3_endpoint`` overrides the endpoint explicitly (MinIO,
moto, R2, ...). The config is plain data so Ray tasks rebuild the filesystem on their side.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs
from pydantic import BaseModel, ConfigDict, Field


class StorageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    s3_endpoint: str | None = Field(
        default=None, description="S3 endpoint URL override (else AWS_ENDPOINT_URL / AWS config)"
    )
    s3_anonymous: bool = Field(default=False, description="unsigned S3 requests (public buckets)")

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
        return options

    def storage_config(self) -> StorageConfig:
        """Just the storage settings of a job config that extends this class (plain data
        for Ray tasks and helpers)."""
        return StorageConfig.model_validate(
            self.model_dump(include=set(StorageConfig.model_fields)))

    def filesystem(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """(filesystem, path without protocol) for ``url``."""
        return url_to_fs(url, **self.options_for(url))


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


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so that readers see either no file or the whole file.

    Local: temp file in the same folder + rename. Object stores: one PUT (an object becomes
    visible only once its upload completes).
    """
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
