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
    reference_path,
    resolve_ref,
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
                  warn=None, check_paths: bool = True) -> list[str]:
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
        _, path_col, _ = column_roles(columns, read, shard.url)
        if check_paths:  # off when images may never be read (--cache rescoring)
            check_paths_resolve(shard, read, storage, path_col, columns)
        if read.key_columns is not None:
            return list(read.key_columns)
        keys = [c for c in AUTO_KEY_COLUMNS if c in columns]
        if not keys and warn is not None:
            warn(f"{shard.url}: no key column (looked for {', '.join(AUTO_KEY_COLUMNS)}; "
                 f"columns: {', '.join(columns)}): output rows are identified by source_file "
                 "+ source_row only; name id columns with --key-columns")
        return keys
    return list(read.key_columns or [])


PATHS_CHECKED = 8  # first rows whose image (and reference) paths the driver resolves


def check_paths_resolve(shard: Shard, read: ReadConfig, storage: StorageConfig,
                        path_col: str | None, columns: list[str]) -> None:
    """Before Ray starts: of the first rows of a table naming its images (and references) by
    path or URL, at least one must exist where iqray looks (relative to ``--image-root``,
    else the table's folder). If none does, the root is wrong, not the images: ValueError in
    one line naming the column, the root and an example tried, and nothing is written."""
    template = read.reference_template
    ref_col = read.reference_column if read.reference_column in columns else None
    wanted = [c for c in dict.fromkeys([path_col, ref_col]) if c is not None]
    if not wanted:
        return
    fs, path = storage.filesystem(shard.url)
    try:
        rows = storage.retry(lambda: _first_rows(fs, path, wanted, PATHS_CHECKED),
                             "read the first rows of", shard.url)
    except StorageUnavailable:
        raise
    except (OSError, ValueError):  # broken bytes: that shard's read decides and records it
        return
    root = read.image_root or f"the table's folder ({shard.url.rsplit('/', 1)[0]})"
    checks = []
    if path_col is not None:
        names = [_ref(v) for v in rows[path_col]]
        checks.append((f"image path column {path_col!r}", names))
        if template is not None:
            checks.append((f"--reference-template {template!r}",
                           [reference_path(template, n, n) if n else None for n in names]))
    if ref_col is not None:
        checks.append((f"reference column {ref_col!r}", [_ref(v) for v in rows[ref_col]]))
    for what, refs in checks:
        refs = [r for r in refs if r]
        if not refs:
            continue
        tried = []
        for ref in refs:
            url = resolve_ref(shard.url, ref, read.image_root)
            ref_fs, ref_path = storage.filesystem(url)
            if storage.retry(lambda f=ref_fs, p=ref_path: f.exists(p), "look up", url):
                break
            tried.append((ref, url))
        else:
            ref, url = tried[0]
            raise ValueError(
                f"{shard.url}: none of the first {len(refs)} paths in its {what} exist "
                f"relative to {root} (e.g. {ref!r} -> {url}); set --image-root to the "
                "folder they are relative to")


def _ref(value) -> str | None:
    """A path a cell names: a string, or a Hugging Face Image struct's path when it carries
    no bytes (None when the image is inline or absent)."""
    if isinstance(value, dict):
        return None if value.get("bytes") else value.get("path")
    return value if isinstance(value, str) else None


def _first_rows(fs, path: str, columns: list[str], count: int) -> dict[str, list]:
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as handle:
        if path.endswith(".csv"):  # streamed: only the first block is parsed
            reader = pa_csv.open_csv(handle, convert_options=pa_csv.ConvertOptions(
                include_columns=columns))
            batches = iter(reader)
        else:
            batches = pq.ParquetFile(handle).iter_batches(batch_size=count, columns=columns)
        batch = next(batches, None)
        if batch is None:
            return {c: [] for c in columns}
        return {c: batch.column(c).to_pylist()[:count] for c in columns}
