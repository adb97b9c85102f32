"""The stage interface: each step between the shard list and the sink is a :class:`Stage`.

A stage has a name, the resources one copy of it needs, ``setup()`` (load a model once per
process) and ``process(batch)``: a dict of equal-length numpy columns in, one (or, for the
read stage, several) out. What a batch holds at each boundary is :mod:`iqray.pipeline.rows`'
contract; with ``IQRAY_CHECK_ROWS=1`` (the tests set it) every output is checked against it
as it leaves its stage, and a stage that breaks it stops the run as a bug, naming itself.

Both executors run the same stage objects: :func:`iqray.pipeline.graph.on_ray` puts one on
Ray Data (tasks, or an actor pool when it asks for actors), :mod:`iqray.pipeline.local`
calls it in this process. The stages of `iqray score`:

    ReadShards  shard records -> rows of encoded bytes        (tasks)
    Decode      encoded bytes -> uint8 crops, error rows      (tasks, never torch)
    Scorer      crops -> the model's outputs, status          (actor pool; scoring.py)
    (Embedder)  crops -> tower embeddings                     (actor pool; embed.py)

then the sink on the driver (``ShardWriter``), or commit actors (``--commit actors``).
This module imports neither Ray nor torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from iqray.pipeline import rows as R
from iqray.pipeline.io.shards import ReadConfig, Shard
from iqray.pipeline.io.storage import StorageConfig

CHECK_ROWS_ENV = "IQRAY_CHECK_ROWS"  # "1": every stage's output is checked (tests, debugging)


class RowContractError(AssertionError):
    """A stage's output is not what :mod:`iqray.pipeline.rows` says it holds: a bug."""


def checking_rows() -> bool:
    return os.environ.get(CHECK_ROWS_ENV, "") not in ("", "0")


@dataclass(frozen=True)
class Resources:
    """What one copy of a stage takes: Ray's ``num_cpus``/``num_gpus``/``memory`` for each
    task or actor; ``actors``: an actor pool of that size (None: stateless tasks)."""

    num_cpus: float
    num_gpus: float = 0.0
    memory: int | None = None
    actors: int | None = None
    batch_size: int | None = None


class Stage:
    """One step of the graph. Subclasses set ``name`` and ``contract`` (the key of
    :data:`rows.STAGE_OUTPUT` their output meets) and implement :meth:`process`."""

    name: ClassVar[str] = "stage"
    contract: ClassVar[str] = ""  # "": a stage outside iqray's graph, not checked
    # The form process() takes: numpy columns, or (shard records) an Arrow table.
    batch_format: ClassVar[str] = "numpy"
    # User datasets (score_dataset) have no input file, row or shard columns.
    from_dataset: bool = False
    _ready: bool = False

    def setup(self) -> None:
        """Load what the stage holds for its lifetime (a model); once per process."""

    def process(self, batch):
        raise NotImplementedError

    def output_names(self) -> tuple[str, ...]:
        """Score columns the output holds (checked as float32, NaN on error rows)."""
        return ()

    def emit(self, batch: dict[str, np.ndarray]) -> Any:
        """The checked output as the next stage or the sink takes it."""
        return batch

    def run(self, batch) -> Iterator[Any]:
        """:meth:`process` (after :meth:`setup`, the first time), each output checked."""
        if not self._ready:
            self.setup()
            self._ready = True
        out = self.process(batch)
        for part in (out if isinstance(out, Iterator) else (out,)):
            if self.contract and checking_rows():
                self.check(part)
            yield self.emit(part)

    def check(self, batch: dict[str, np.ndarray]) -> None:
        problems = R.check_batch(batch, self.contract, self.output_names(),
                                 from_dataset=self.from_dataset)
        if problems:
            from iqray.pipeline.decode import batch_where
            from iqray.pipeline.failures import StageBug

            error = RowContractError(f"{self.name}'s output breaks the row contract: "
                                     + "; ".join(problems))
            raise StageBug.of(self.contract, batch_where(batch), error)

    def __call__(self, batch):
        """One batch in, one out (tests call stages this way)."""
        outputs = list(self.run(batch))
        if len(outputs) != 1:
            raise TypeError(f"{self.name} gave {len(outputs)} batches for one")
        return outputs[0]


class ReadShards(Stage):
    """Shard records -> rows of encoded bytes (:func:`iqray.pipeline.io.read.read_shard`),
    in batches of ``--read-batch-rows``; storage errors are retried inside, a shard that
    stays unreadable ends in its ``shard_unfinished`` marker row."""

    name = "ReadShards"
    contract = "read"
    batch_format = "pyarrow"

    def __init__(self, read: ReadConfig, storage: StorageConfig, key_columns: list[str]):
        self.read, self.storage, self.key_columns = read, storage, key_columns

    def process(self, shards: pa.Table) -> Iterator[dict[str, np.ndarray]]:
        for record in shards.to_pylist():
            yield from self.shard_batches(Shard.from_record(record))

    def shard_batches(self, shard: Shard) -> Iterator[dict[str, np.ndarray]]:
        from iqray.pipeline.failures import StageBug
        from iqray.pipeline.io.read import read_shard

        try:
            for rows in read_shard(shard, self.read, self.storage, self.key_columns,
                                   on_failure="marker"):
                yield {name: R.column(values) for name, values in rows.items()}
        except Exception as exc:  # storage and bad bytes are handled inside: a bug
            raise StageBug.of("read", f"shard {shard.url}", exc) from exc


class Decode(Stage):
    """Encoded bytes -> uint8 crops at the towers' size (:func:`decode.decode_batch`), in
    a PIL-only child process per worker with a time limit per image; failures become error
    rows. Rows of a user's dataset (``user``: its image column and how to read it) become
    the readers' columns first (:func:`decode.decode_user_batch`)."""

    name = "Decode"
    contract = "decode"

    def __init__(self, options: dict[str, Any], user: dict[str, Any] | None = None):
        self.options, self.user = options, user
        self.from_dataset = user is not None

    def process(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from iqray.pipeline.decode import decode_batch, decode_user_batch

        if self.user is not None:
            return decode_user_batch(batch, **self.user, **self.options)
        return decode_batch(batch, **self.options)


def shard_table(shards: list[Shard]) -> pa.Table:
    """The read stage's input: one typed record per shard (:meth:`Shard.record`)."""
    return pa.Table.from_pylist([s.record() for s in shards], schema=Shard.ARROW_SCHEMA)
