"""Resume: which input shards a run still has to score, decided from the committed outputs'
footers before anything is read (one footer read per committed shard), and the refusal to
touch a file iqray did not write.

A shard is done when an output at its name has an iqray footer whose input fingerprint and
scoring hash match this run's and which says ``complete``. Anything else is scored again;
with ``--retry-failed`` a done shard's error rows are read again (or the whole file, where
the file itself was unreadable) and replace the old error rows on commit.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from iqray.pipeline import rows as R
from iqray.pipeline.io.formats import PARQUET, OutputFormat
from iqray.pipeline.io.shards import Shard
from iqray.pipeline.io.storage import StorageConfig, join_url
from iqray.pipeline.io.writer import SUCCESS_NAME, UNFINISHED_NAME

# Error kinds of old outputs whose whole file has to be read again by --retry-failed.
WHOLE_FILE_ERRORS = ("shard_read", R.SHARD_CORRUPT)


def read_output_metadata(fs, path: str) -> dict[str, Any] | None:
    """An output's iqray footer; None for a file that is absent, unreadable or not iqray's."""
    try:
        return output_footer(fs, path)
    except Exception:
        return None


def output_footer(fs, path: str, output_format: OutputFormat = PARQUET
                  ) -> dict[str, Any] | None:
    """The iqray footer of an output file; None when the file is not iqray's (no footer, or
    not in the format at all). Storage errors propagate."""
    return output_format.read_footer(fs, path)


def _foreign(url: str, why: str) -> ValueError:
    return ValueError(f"{url} exists and {why}: iqray never writes over a file it did not "
                      "write; move it away or choose another output")


def footer_scoring_hash(meta: dict) -> str | None:
    """The scoring hash a shard was written under. Earlier runs wrote the same value twice,
    as ``scoring_hash`` and ``config_hash``; a footer with either is read."""
    return meta.get("scoring_hash") or meta.get("config_hash")


def plan_resume(shards: list[Shard], output: str, storage: StorageConfig, scoring_hash: str,
                retry_failed: bool, output_format: OutputFormat = PARQUET
                ) -> tuple[list[Shard], list[Shard], dict[int, pa.Table]]:
    """Split shards into (to score, already done) and, for --retry-failed, the old tables
    whose error rows are being rescored. Refuses (ValueError) when a file at an output's
    name was not written by iqray; storage errors are retried, then StorageUnavailable."""
    fs, root = storage.filesystem(output)

    def retried(what: str, action, url: str = output):
        return storage.retry(action, what, url)

    existing = (set(retried("list", lambda: fs.find(root)))
                if retried("look up", lambda: fs.exists(root)) else set())
    for name in (SUCCESS_NAME, UNFINISHED_NAME):  # run records a new run replaces
        path = posixpath.join(root, name)
        if path not in existing:
            continue
        body = retried("read", lambda path=path: fs.cat_file(path), join_url(output, name))
        try:
            record = json.loads(body)
        except ValueError:
            record = None
        ours = isinstance(record, dict) and "summary" in record
        if not ours:
            raise _foreign(join_url(output, name), "is not an iqray run summary")
    todo, done, previous = [], [], {}
    for shard in shards:
        path = posixpath.join(root, shard.output_name)
        url = join_url(output, shard.output_name)
        meta = (retried("read the footer of",
                        lambda path=path: output_format.read_footer(fs, path), url)
                if path in existing else None)
        if path in existing and meta is None:
            raise _foreign(url, "has no iqray footer")
        committed = (meta is not None and meta.get("input_fingerprint") == shard.fingerprint
                     and footer_scoring_hash(meta) == scoring_hash and meta.get("complete"))
        if not committed:
            todo.append(shard)
            continue
        if not retry_failed or not meta.get("errors"):
            done.append(shard)
            continue

        old = retried("read", lambda path=path: output_format.read_table(fs, path), url)
        errors = old.filter(pc.equal(old["status"], "error"))
        whole_file = any(k in WHOLE_FILE_ERRORS for k in errors["error_kind"].to_pylist())
        if whole_file:  # the file itself was unreadable: read all of it again
            todo.append(shard)
        else:
            shard.only_rows = sorted(errors["source_row"].to_pylist())
            previous[shard.index] = old
            todo.append(shard)
    return todo, done, previous
