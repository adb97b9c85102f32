"""Input URL -> the list of shards, on the driver before anything runs: listings and footer
reads retried, the job's own output never taken as input, and the first table shard's
columns checked against the flags (:func:`inspect_input`)."""

from __future__ import annotations

import posixpath

from iqray.pipeline.io.folder import folder_shards
from iqray.pipeline.io.shards import (
    AUTO_KEY_COLUMNS,
    IMAGE_EXTENSIONS,
    TABLE_FORMATS,
    ReadConfig,
    Shard,
    check_columns,
    column_roles,
)
from iqray.pipeline.io.storage import (
    GLOB_CHARS,
    StorageConfig,
    StorageUnavailable,
    fingerprint,
    glob_base,
    inside,
    location,
    output_name_within,
    to_url,
)
from iqray.pipeline.io.tables import table_columns, table_num_rows


def discover_shards(input_url: str, read: ReadConfig, storage: StorageConfig,
                    exclude: str | None = None, warn=None) -> list[Shard]:
    """The input's shards. Listings and footer reads are retried on storage errors (then
    :class:`StorageUnavailable`); nothing under ``exclude`` (the job's output) is ever
    taken as input. ``warn`` gets a line for each silent gap found (sidecar misses)."""
    fs, root = storage.filesystem(input_url)

    def listed(what: str, action):
        return storage.retry(action, what, input_url)

    if any(ch in root for ch in GLOB_CHARS):
        paths = sorted(listed("list", lambda: fs.glob(root)))
        base = glob_base(root)
    elif listed("look up", lambda: fs.isdir(root)):
        paths = sorted(p for p in listed("list", lambda: fs.find(root))
                       if not _hidden(posixpath.relpath(p, root)))
        base = root
    elif listed("look up", lambda: fs.exists(root)):
        paths = [root]
        base = posixpath.dirname(root)
    else:
        raise FileNotFoundError(f"input {storage.missing(input_url)}")
    if exclude is not None:
        excluded = location(exclude)
        paths = [p for p in paths if not _under_location(location(to_url(fs, p, input_url)),
                                                         excluded)]
    infos = {p: listed("look up", lambda p=p: fs.info(p)) for p in paths}
    paths = [p for p in paths if infos[p].get("type") != "directory"]

    fmt = read.format
    if fmt == "auto":
        fmt = _detect_format(paths, input_url)
    if fmt == "parquet":
        chosen = [p for p in paths if p.endswith(".parquet")]
        return [_file_shard(i, fs, p, base, input_url, "parquet", infos[p], storage)
                for i, p in enumerate(chosen)]
    if fmt == "csv":
        chosen = [p for p in paths if p.endswith(".csv")]
        return [_file_shard(i, fs, p, base, input_url, "csv", infos[p], storage)
                for i, p in enumerate(chosen)]
    if fmt == "webdataset":
        chosen = [p for p in paths if p.endswith(".tar")]
        return [_file_shard(i, fs, p, base, input_url, "webdataset", infos[p], storage)
                for i, p in enumerate(chosen)]
    return folder_shards(fs, paths, base, input_url, infos, read, storage, warn)


def _under_location(path: tuple[str, str], folder: tuple[str, str]) -> bool:
    return path[0] == folder[0] and inside(path[1], folder[1])


def _hidden(relative: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative.split("/"))


def _detect_format(paths: list[str], input_url: str) -> str:
    # img2dataset writes NNNNN.tar beside NNNNN.parquet (metadata): tars win when present.
    if any(p.endswith(".tar") for p in paths):
        return "webdataset"
    if any(p.endswith(".parquet") for p in paths):
        return "parquet"
    if any(p.lower().endswith(IMAGE_EXTENSIONS) for p in paths):
        return "folder"  # a prompts.csv beside images is a sidecar, not the input
    if any(p.endswith(".csv") for p in paths):
        return "csv"
    raise ValueError(f"input {input_url}: found no .parquet, .csv, .tar or image files "
                     f"({len(paths)} files looked at); set --format explicitly")


def _file_shard(index: int, fs, path: str, base: str, input_url: str, fmt: str,
                info: dict, storage: StorageConfig) -> Shard:
    relative = posixpath.relpath(path, base) if base else posixpath.basename(path)
    url = to_url(fs, path, input_url)
    output_name = output_name_within(posixpath.splitext(relative)[0] + ".parquet", url)
    estimated = None
    if fmt in TABLE_FORMATS:
        try:
            estimated = storage.retry(lambda: table_num_rows(fs, path), "read the footer of",
                                      url)
        except Exception:  # the read stage tries again, and decides and records what it is
            estimated = None
    return Shard(index, url, fmt, output_name, fingerprint(info), estimated_rows=estimated)


def inspect_input(shards: list[Shard], read: ReadConfig, storage: StorageConfig,
                  warn=None) -> list[str]:
    """Check the input against the configuration on the driver, before anything starts, and
    return the key columns to pass through (configured, or the usual names present).

    The first table shard whose schema can be read must have every column the flags name
    (ValueError, one line, else); ``warn`` hears when no key column is found."""
    if not shards or shards[0].format not in TABLE_FORMATS:
        return list(read.key_columns) if read.key_columns is not None else ["key"]
    for shard in shards:
        fs, path = storage.filesystem(shard.url)
        try:
            columns = storage.retry(lambda fs=fs, path=path: table_columns(fs, path),
                                    "read the schema of", shard.url)
        except StorageUnavailable:
            raise
        except Exception:  # broken bytes: that shard's read decides and records it
            continue
        check_columns(columns, read, shard.url)
        column_roles(columns, read, shard.url)
        if read.key_columns is not None:
            return list(read.key_columns)
        keys = [c for c in AUTO_KEY_COLUMNS if c in columns]
        if not keys and warn is not None:
            warn(f"{shard.url}: no key column (looked for {', '.join(AUTO_KEY_COLUMNS)}; "
                 f"columns: {', '.join(columns)}): output rows are identified by source_file "
                 "+ source_row only; name id columns with --key-columns")
        return keys
    return list(read.key_columns or [])
