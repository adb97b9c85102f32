"""Reading `iqray score` output back: the Parquet files of a run (local or object storage),
their footer metadata, and safe row expressions over them.

Dataset jobs (filter, preferences, clean, report) work on score columns only -- a few dozen
bytes per row -- so they read with pyarrow on the driver: 1M rows is ~100 MB here.
"""

from __future__ import annotations

import ast
import dataclasses
import operator
import posixpath
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from iqray.model.outputs import RunOutputs, run_outputs
from iqray.pipeline import rows as R
from iqray.pipeline.io.discovery import discover_shards
from iqray.pipeline.io.read import read_shard
from iqray.pipeline.io.resume import read_output_metadata
from iqray.pipeline.io.shards import ReadConfig, read_bytes, source_file_kind
from iqray.pipeline.io.storage import StorageConfig, to_url


class ExpressionError(ValueError):
    """A --where expression that is not allowed or names unknown columns."""


def score_files(url: str, storage: StorageConfig) -> list[str]:
    """Parquet files of a score run: a directory, a glob or one file (sorted URLs)."""
    fs, path = storage.filesystem(url)
    if any(ch in path for ch in "*?["):
        paths = fs.glob(path)
    elif fs.isdir(path):
        paths = [p for p in fs.find(path) if p.endswith(".parquet")]
    elif fs.exists(path):
        paths = [path]
    else:
        raise FileNotFoundError(f"{url}: no such score output")
    paths = sorted(p for p in paths if not posixpath.basename(p).startswith((".", "_")))
    if not paths:
        raise FileNotFoundError(f"{url}: no Parquet files (is this an `iqray score` output?)")
    return [to_url(fs, p, url) for p in paths]


def table_outputs(table: pa.Table, metadata: dict | None) -> RunOutputs:
    """The outputs a run's footer lists (the first is the primary score) that ``table``
    holds; ValueError in one line when it holds none."""
    listed = run_outputs(metadata)
    outputs = listed.within(table.column_names)
    if not outputs.names:
        raise ValueError(f"no score columns in the run (looked for {', '.join(listed.names)}; "
                         f"columns: {', '.join(table.column_names)})")
    return outputs


def score_values(table: pa.Table, name: str) -> np.ndarray:
    """A score column as float64, NaN where the row was not scored (status != ok) and
    everywhere when the column is absent."""
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan)
    values = table[name].to_numpy(zero_copy_only=False).astype(float)
    if "status" in table.column_names:
        values[np.array(table["status"].to_pylist()) != "ok"] = np.nan
    return values


def read_scores(url: str, storage: StorageConfig, columns: list[str] | None = None
                ) -> pa.Table:
    """All rows of a score run as one table (schema metadata dropped)."""
    tables = []
    for file_url in score_files(url, storage):
        fs, path = storage.filesystem(file_url)
        with fs.open(path, "rb") as handle:
            tables.append(pq.read_table(handle, columns=columns).replace_schema_metadata(None))
    return pa.concat_tables(tables, promote_options="default")


def score_metadata(url: str, storage: StorageConfig) -> dict[str, Any]:
    """Footer metadata of a run's first file: model, model identity, input, key columns."""
    fs, path = storage.filesystem(score_files(url, storage)[0])
    return read_output_metadata(fs, path) or {}


_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt,
            ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge}
_ARITH = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
          ast.Div: operator.truediv}


def compile_where(text: str, columns: list[str]) -> pc.Expression:
    """A boolean pyarrow expression from Python-like syntax, e.g.
    ``quality >= 3.5 and alignment >= 0.6 and status == 'ok'``.

    Allowed: column names, numbers, strings, True/False/None, comparisons (chained too),
    ``and``/``or``/``not``, + - * /, ``in [..]``/``not in [..]``, ``is None``/``is not None``.
    Everything else (calls, attributes, subscripts) is refused -- nothing is ever evaluated
    as Python. Unknown columns are refused before any work starts.
    """
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise ExpressionError(f"--where {text!r}: not an expression: {exc.msg}") from exc
    known = set(columns)

    def build(node: ast.AST) -> Any:
        if isinstance(node, ast.BoolOp):
            values = [build(v) for v in node.values]
            combine = operator.and_ if isinstance(node.op, ast.And) else operator.or_
            result = values[0]
            for value in values[1:]:
                result = combine(result, value)
            return result
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return ~build(node.operand)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return pc.negate(build(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
            return _ARITH[type(node.op)](build(node.left), build(node.right))
        if isinstance(node, ast.Compare):
            parts, left = [], build(node.left)
            for op, right_node in zip(node.ops, node.comparators, strict=True):
                if isinstance(op, ast.In | ast.NotIn):
                    part = left.isin(build_list(right_node))
                    parts.append(~part if isinstance(op, ast.NotIn) else part)
                    continue
                if isinstance(op, ast.Is | ast.IsNot):
                    if not (isinstance(right_node, ast.Constant) and right_node.value is None):
                        raise ExpressionError(f"--where {text!r}: 'is' only compares to None")
                    part = left.is_null()
                    parts.append(~part if isinstance(op, ast.IsNot) else part)
                    continue
                if type(op) not in _COMPARE:
                    raise ExpressionError(f"--where {text!r}: operator not allowed")
                right = build(right_node)
                parts.append(_COMPARE[type(op)](left, right))
                left = right
            result = parts[0]
            for part in parts[1:]:
                result = result & part
            return result
        if isinstance(node, ast.Name):
            if node.id not in known:
                raise ExpressionError(f"--where {text!r}: unknown column {node.id!r}; columns: "
                                      f"{', '.join(sorted(known))}")
            return pc.field(node.id)
        if isinstance(node, ast.Constant) and (node.value is None or isinstance(
                node.value, bool | int | float | str)):
            return pc.scalar(node.value)
        raise ExpressionError(f"--where {text!r}: {type(node).__name__} is not allowed "
                              "(columns, constants, comparisons, and/or/not, + - * /, in)")

    def build_list(node: ast.AST) -> list:
        if not isinstance(node, ast.List | ast.Tuple | ast.Set):
            raise ExpressionError(f"--where {text!r}: 'in' needs a literal list")
        values = []
        for element in node.elts:
            if not isinstance(element, ast.Constant):
                raise ExpressionError(f"--where {text!r}: 'in' lists hold constants only")
            values.append(element.value)
        return values

    expression = build(tree.body)
    if not isinstance(expression, pc.Expression):
        raise ExpressionError(f"--where {text!r}: not a condition on columns")
    return expression


def fetch_images(table: pa.Table, rows: list[int], source: str, read: ReadConfig,
                 storage: StorageConfig) -> dict[int, bytes]:
    """Image bytes of score rows: from an ``image`` column when the score run kept them,
    else read back from the source dataset (only the rows asked for)."""
    if "image" in table.column_names:
        column = table["image"]
        return {i: column[i].as_py() for i in rows}
    files = table["source_file"].to_pylist()
    numbers = table["source_row"].to_pylist()
    wanted: dict[str, dict[int, int]] = defaultdict(dict)
    out: dict[int, bytes] = {}
    for i in rows:
        if source_file_kind(files[i]) == "image":
            out[i] = read_bytes(files[i], storage)  # a folder input: the file is the image
        else:
            wanted[files[i]][numbers[i]] = i
    if wanted:
        shards = {s.url: s for s in discover_shards(source, read, storage)}
        for url, by_row in wanted.items():
            if url not in shards:
                raise FileNotFoundError(f"{url} (named by the scores) is not among the shards "
                                        f"of {source}; pass the score run's input as --source")
            shard = dataclasses.replace(shards[url], only_rows=sorted(by_row))
            for batch in read_shard(shard, read, storage, []):
                for number, image in zip(batch[R.SOURCE_ROW], batch[R.IMAGE], strict=True):
                    if image is not None:
                        out[by_row[int(number)]] = image
    missing = [i for i in rows if i not in out]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images could not be read back from {source} "
                                f"(first: {files[missing[0]]} row {numbers[missing[0]]})")
    return out
