"""The row contract: every column a batch carries between the pipeline's stages.

A batch is a dict of equal-length numpy columns. The user's own columns (prompt, key
columns, anything a Ray Data pipeline brings) pass through untouched; the columns below are
iqray's. Those starting with ``_`` are private: they exist only between stages and never
reach an output file. Each is written by one stage and read by later ones; :data:`COLUMNS`
says which, :data:`STAGE_OUTPUT` says what each stage's output holds (and what it must no
longer hold), and :func:`check_batch` checks a batch against both: every stage output does,
as it leaves its stage, when ``IQRAY_CHECK_ROWS=1`` (:mod:`iqray.pipeline.stages`; the
tests set it). Between stages on Ray the columns keep their :func:`arrow_type`.

    read   -> SOURCE_FILE SOURCE_ROW PROMPT IMAGE [REFERENCE] ERROR ERROR_KIND
              SHARD SHARD_END READ_S
    decode -> drops IMAGE, REFERENCE; adds PIXELS IMAGE_SHA256 [ENCODED] [IMAGE_BYTES]
              DECODE_S DECODE_NODE
    model  -> drops PIXELS, ENCODED, ERROR, ERROR_KIND; adds STATUS PUBLIC_ERROR
              PUBLIC_ERROR_KIND MODEL_S MODEL_NODE and the model's outputs (Scorer) or
              its embeddings (Embedder)

Imports nothing but numpy and pyarrow, so readers, decode tasks and actors can all use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

Kind = Literal["str", "int", "float", "bool", "bytes", "crops", "vectors"]

# -- written by the readers ----------------------------------------------------------------
SOURCE_FILE = "source_file"
SOURCE_ROW = "source_row"
PROMPT = "prompt"
IMAGE = "_image"
REFERENCE = "_reference"
ERROR = "_error"
ERROR_KIND = "_error_kind"
SHARD = "_shard"
SHARD_END = "_shard_end"
READ_S = "_read_s"
# -- written by decode ---------------------------------------------------------------------
PIXELS = "pixels"
IMAGE_SHA256 = "image_sha256"
ENCODED = "_encoded"
IMAGE_BYTES = "image"
DECODE_S = "_decode_s"
DECODE_NODE = "_decode_node"
# -- written by the model stage ------------------------------------------------------------
STATUS = "status"
PUBLIC_ERROR = "error"
PUBLIC_ERROR_KIND = "error_kind"
PROMPT_TRUNCATED = "prompt_truncated"
MODEL_S = "_model_s"
MODEL_NODE = "_model_node"
EMBEDDINGS = "_embeddings"
EMBEDDED = "_embedded"
EMBED_ERROR = "_embed_error"

# --commit actors: the model stage returns tally rows instead of scored rows; each stands for
# this many rows of one shard, its stage-seconds columns holding their sums.
TALLY_ROWS = "_tally_rows"

# Stage seconds per row, summed by the driver into the run summary's busy time.
STAGE_SECONDS = {"read": READ_S, "decode": DECODE_S, "model": MODEL_S}
STAGE_NODES = {"decode": DECODE_NODE, "model": MODEL_NODE}

# Error kinds a reader gives a whole shard.
SHARD_UNFINISHED = "shard_unfinished"  # not committed; the next run reads the shard again
SHARD_CORRUPT = "shard_corrupt"  # the file's bytes are broken: committed as error rows

STATUS_OK = "ok"
STATUS_ERROR = "error"


@dataclass(frozen=True)
class Column:
    name: str
    kind: Kind
    nullable: bool
    meaning: str
    written_by: str
    read_by: tuple[str, ...]

    @property
    def private(self) -> bool:
        return self.name.startswith("_")


COLUMNS: dict[str, Column] = {c.name: c for c in (
    Column(SOURCE_FILE, "str", False, "URL of the input file (folder inputs: the image)",
           "read", ("decode", "writer")),
    Column(SOURCE_ROW, "int", False, "row number inside that input shard", "read",
           ("decode", "writer")),
    Column(PROMPT, "str", True, "the prompt, None when the input has none", "read",
           ("model",)),
    Column(IMAGE, "bytes", True, "encoded image bytes; None on an error row", "read",
           ("decode",)),
    Column(REFERENCE, "bytes", True, "full-reference reads: the reference's encoded bytes",
           "read", ("decode",)),
    Column(ERROR, "str", True, "why this row failed so far; None while it is fine",
           "read", ("decode", "model")),
    Column(ERROR_KIND, "str", True, "machine-readable class of ERROR (decode, read, "
           f"{SHARD_UNFINISHED}, ...)", "read", ("decode", "model")),
    Column(SHARD, "int", False, "index of the input shard the row came from", "read",
           ("writer",)),
    Column(SHARD_END, "int", False, "rows the shard produced, on its last batch; -1 before",
           "read", ("writer",)),
    Column(READ_S, "float", False, "reader seconds per row of its batch", "read",
           ("driver",)),
    Column(PIXELS, "crops", False, "uint8 (N, C, S, S) crops at the towers' size; "
           "zeros on error rows and rows left ENCODED", "decode", ("model",)),
    Column(IMAGE_SHA256, "str", True, "sha256 of the encoded bytes (cache key, duplicates)",
           "decode", ("model", "writer")),
    Column(ENCODED, "bytes", True, "--decode device: JPEG bytes the actor decodes itself",
           "decode", ("model",)),
    Column(IMAGE_BYTES, "bytes", True, "--keep-image-bytes: the encoded bytes, to the output",
           "decode", ("writer",)),
    Column(DECODE_S, "float", False, "decode seconds per row", "decode", ("driver",)),
    Column(DECODE_NODE, "str", True, "Ray node that decoded the row", "decode", ("driver",)),
    Column(STATUS, "str", False, f"'{STATUS_OK}' or '{STATUS_ERROR}'", "model",
           ("writer", "user")),
    Column(PUBLIC_ERROR, "str", True, "why the row failed, None on ok rows", "model",
           ("writer", "user")),
    Column(PUBLIC_ERROR_KIND, "str", True, "class of the error, None on ok rows", "model",
           ("writer", "user")),
    Column(PROMPT_TRUNCATED, "bool", False, "prompt-aware models: the prompt was longer "
           "than the text tower's context", "model", ("writer", "user")),
    Column(MODEL_S, "float", False, "model-stage seconds per row", "model", ("driver",)),
    Column(MODEL_NODE, "str", True, "Ray node of the model actor", "model", ("driver",)),
    Column(EMBEDDINGS, "vectors", False, "Embedder: the towers' embeddings side by side, one "
           "per tower role (MST-CLIPIQA: coarse then fine; zeros if not embedded)", "model",
           ("embed sink",)),
    Column(EMBEDDED, "bool", False, "Embedder: this row's embeddings are new to the cache",
           "model", ("embed sink",)),
    Column(EMBED_ERROR, "float", False, "Embedder: storage-precision error on unit vectors",
           "model", ("embed sink",)),
)}

_READ = (SOURCE_FILE, SOURCE_ROW, PROMPT, IMAGE, ERROR, ERROR_KIND, SHARD, SHARD_END, READ_S)
_DECODED = (SOURCE_FILE, SOURCE_ROW, PROMPT, ERROR, ERROR_KIND, PIXELS, IMAGE_SHA256,
            DECODE_S, DECODE_NODE)
_MODELLED = (SOURCE_FILE, SOURCE_ROW, PROMPT, IMAGE_SHA256, STATUS, PUBLIC_ERROR,
             PUBLIC_ERROR_KIND, MODEL_S, MODEL_NODE)

# stage -> (columns its output must hold, columns it must have removed)
STAGE_OUTPUT: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "read": (_READ, (PIXELS, STATUS)),
    "decode": (_DECODED, (IMAGE, REFERENCE, STATUS)),
    "model": (_MODELLED, (PIXELS, ENCODED, IMAGE, ERROR, ERROR_KIND)),
    "embed": (_MODELLED + (EMBEDDINGS, EMBEDDED, EMBED_ERROR),
              (PIXELS, ENCODED, IMAGE, ERROR, ERROR_KIND)),
}

PRIVATE = frozenset(name for name in COLUMNS if name.startswith("_"))


def column(values: list[Any]) -> np.ndarray:
    """A batch column from a list of values: numbers as a numeric array, anything else
    (bytes, strings, None) as an object array (numpy would split bytes or guess widths)."""
    array = np.empty(len(values), dtype=object)
    array[:] = values
    if values and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return np.asarray(values)
    return array


def _fits(value: Any, kind: Kind) -> bool:
    if kind == "str":
        return isinstance(value, str)
    if kind == "bytes":
        return isinstance(value, bytes)
    if kind == "int":
        return isinstance(value, int | np.integer) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, float | np.floating)
    return isinstance(value, bool | np.bool_)


# Rows of a user's own dataset (score_dataset) come from no input file or shard.
_READER_ONLY = frozenset((SOURCE_FILE, SOURCE_ROW, PROMPT, SHARD, SHARD_END, READ_S))

# Arrow types of the contract's scalar kinds (crops and vectors are tensors).
ARROW_TYPES = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(),
               "bool": pa.bool_(), "bytes": pa.binary()}


def owned_columns(from_dataset: bool = False) -> frozenset[str]:
    """The columns whose kind the contract fixes. In a user's dataset (score_dataset) the
    reader-only names and ``image`` (--keep-image-bytes) are the user's own, whatever they
    hold, and pass through untouched."""
    if from_dataset:
        return frozenset(COLUMNS) - _READER_ONLY - {IMAGE_BYTES}
    return frozenset(COLUMNS)


def arrow_type(name: str) -> pa.DataType | None:
    """The Arrow type a contract column has between stages (None: not the contract's, or a
    tensor): an all-None column keeps its type, so it stays null, never NaN."""
    column = COLUMNS.get(name)
    return None if column is None else ARROW_TYPES.get(column.kind)


def boundary_schema(stage: str) -> list[tuple[str, str]]:
    """(column, type) of what ``stage``'s output holds by contract, for the docs."""
    kinds = {"crops": "uint8 (N, C, S, S)", "vectors": "float (N, D)"}
    return [(name, kinds.get(COLUMNS[name].kind) or str(arrow_type(name)))
            for name in STAGE_OUTPUT[stage][0]]


def check_batch(batch: dict[str, np.ndarray], stage: str,
                outputs: tuple[str, ...] = (), from_dataset: bool = False) -> list[str]:
    """What is wrong with ``stage``'s output ``batch`` against the contract (empty: nothing).

    ``outputs``: the model's score columns (quality first), float32, NaN on error rows.
    ``from_dataset``: rows of a user's dataset, which have no input file or shard."""
    wanted, removed = STAGE_OUTPUT[stage]
    owned = owned_columns(from_dataset)
    wanted = tuple(name for name in wanted if name in owned)
    problems = [f"missing {name}" for name in wanted if name not in batch]
    problems += [f"still holds {name}" for name in removed if name in batch]
    lengths = {name: len(values) for name, values in batch.items()}
    if len(set(lengths.values())) > 1:
        problems.append(f"columns of different lengths: {lengths}")
    for name, values in batch.items():
        column = COLUMNS.get(name) if name in owned else None
        if column is None:
            continue
        if column.kind == "crops":
            if values.dtype != np.uint8 or values.ndim != 4:
                problems.append(f"{name}: {values.dtype} of {values.ndim} dims, not uint8 NCHW")
            continue
        if column.kind == "vectors":
            if values.ndim != 2 or values.dtype.kind != "f":
                problems.append(f"{name}: {values.dtype} of {values.ndim} dims, not (N, D)")
            continue
        for value in values:
            if value is None and column.nullable:
                continue
            if not _fits(value, column.kind):
                problems.append(f"{name}: {value!r} is not {column.kind}"
                                + ("" if column.nullable else " (never null)"))
                break
    for name in outputs:
        if name not in batch:
            problems.append(f"missing output {name}")
        elif batch[name].dtype != np.float32:
            problems.append(f"{name}: {batch[name].dtype}, not float32")
    if STATUS in batch and outputs:
        ok = batch[STATUS] == STATUS_OK
        for name in outputs:
            if name in batch and not np.isnan(batch[name][~ok]).all():
                problems.append(f"{name}: a score on an error row (must be NaN)")
        # quality needs no prompt; alignment is NaN on an ok row without one
        if outputs[0] in batch and np.isnan(batch[outputs[0]][ok]).any():
            problems.append(f"{outputs[0]}: NaN on an ok row")
    return problems
