"""Output formats: how a committed shard's rows and its footer become bytes, and how they
are read back. :class:`~iqray.pipeline.io.writer.ShardWriter` assembles shards and commits
them through one of these; resume planning and the dataset jobs read footers through it.

Parquet is the format today. Another sink (WebDataset sidecars, Lance, a database table)
is one class with these three methods; the footer is what resume rests on (the input's
fingerprint, the scorer's identity, ``complete``, row counts), so a format must store it
with the rows, in the same atomic write.
"""

from __future__ import annotations

import io
import json
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

METADATA_KEY = b"iqray"  # Parquet: the footer's key in the schema metadata


class OutputFormat(Protocol):
    name: str

    def encode(self, table: pa.Table, footer: dict[str, Any]) -> bytes:
        """One committed shard: its rows and footer, as the bytes of one atomic write."""

    def read_footer(self, fs, path: str) -> dict[str, Any] | None:
        """The footer of a committed shard; None when the file is not one of iqray's (no
        footer, or not this format at all). Storage errors propagate."""

    def read_table(self, fs, path: str) -> pa.Table:
        """A committed shard's rows."""


class ParquetFormat:
    """One zstd Parquet file per shard, the footer as JSON in the schema's metadata."""

    name = "parquet"

    def encode(self, table: pa.Table, footer: dict[str, Any]) -> bytes:
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(footer).encode()})
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        return buffer.getvalue()

    def read_footer(self, fs, path: str) -> dict[str, Any] | None:
        try:
            with fs.open(path, "rb") as handle:
                metadata = pq.read_schema(handle).metadata or {}
        except (pa.ArrowInvalid, IsADirectoryError):  # not Parquet, or a folder of that name
            return None
        raw = metadata.get(METADATA_KEY)
        return json.loads(raw) if raw else None

    def read_table(self, fs, path: str) -> pa.Table:
        with fs.open(path, "rb") as handle:
            return pq.read_table(handle)


PARQUET = ParquetFormat()
