"""Filter rules over score tables: errors, expressions, duplicates, top fractions per group.

Rules run in a fixed order and each row records the first rule that dropped it (``reason``):

1. ``error``           -- rows whose scoring failed (unless ``keep_errors``);
2. ``where``           -- rows failing the ``--where`` expression;
3. ``duplicate``       -- same image bytes (sha256) as a better-scored row;
4. ``near_duplicate``  -- embedding cosine >= threshold to a better-scored kept row;
5. ``below_top``       -- outside the top ``keep_top`` fraction of its group by ``by``.

Duplicates keep the best-scored copy (ties: the smallest key), so reruns agree. Quantiles
count the rows still in play after rules 1-4, within each group of ``per`` (or globally).

Relative columns make a threshold chosen once keep its meaning: per-prompt rank and
percentile, dataset percentile, and a z-score against the reference set stored with the
model (its own scores on its training data), which does not move when this batch does.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from iqray.model.outputs import RunOutputs, run_outputs
from iqray.pipeline.tables.runs import (
    ExpressionError,
    compile_where,
    score_values,
)


class FilterRules(BaseModel):
    model_config = ConfigDict(extra="forbid")

    where: str | None = Field(default=None, description="row condition, e.g. "
                              "\"quality >= 3.5 and alignment >= 0.6\"")
    keep_top: float | None = Field(default=None, gt=0, le=1,
                                   description="keep this best fraction by --by (per group)")
    by: str | None = Field(default=None, description="score column that ranks rows "
                           "(quantiles, which duplicate survives); default: the run's primary "
                           "score, in its own direction")
    per: str | None = Field(default=None, description="group column for --keep-top and "
                            "--dedupe-scope group (e.g. prompt, or a key column like model)")
    per_pattern: str | None = Field(default=None, description="regex on the key whose first "
                                    "group is the group (instead of --per)")
    keep_errors: bool = Field(default=False, description="keep rows whose scoring failed")
    dedupe: Literal["none", "exact", "near"] = Field(
        default="none", description="drop exact duplicates (same bytes), or also near "
        "duplicates (embedding cosine >= --near-threshold; needs --embeddings)")
    near_threshold: float = Field(default=0.95, gt=0, le=1,
                                  description="cosine at or above which images are near "
                                  "duplicates")
    dedupe_scope: Literal["global", "group"] = Field(
        default="global", description="compare duplicates across the dataset or within groups")
    embeddings: str | None = Field(default=None, description="embedding cache (`iqray embed`) "
                                   "holding the images, for --dedupe near")

    @model_validator(mode="after")
    def _consistent(self) -> FilterRules:
        if self.per and self.per_pattern:
            raise ValueError("give --per or --per-pattern, not both")
        if self.dedupe == "near" and not self.embeddings:
            raise ValueError("--dedupe near needs --embeddings (an `iqray embed` cache)")
        if self.per_pattern:
            try:
                if re.compile(self.per_pattern).groups < 1:
                    raise ValueError(f"--per-pattern {self.per_pattern!r} has no (group)")
            except re.error as exc:
                raise ValueError(f"--per-pattern {self.per_pattern!r}: {exc}") from exc
        return self


def cache_embeddings(rules: FilterRules, storage):
    """``shas -> (n, d)`` coarse embeddings from the rules' embedding cache, for
    ``--dedupe near``; None when no rule needs them."""
    if rules.dedupe != "near":
        return None
    from iqray.pipeline.io.embed_cache import EmbeddingCache

    cache = EmbeddingCache(rules.embeddings, storage)
    return lambda shas: cache.load_images(shas)[0]


# Relative columns (add_relative_columns) and which way each ranks; 1 = best for ranks.
RELATIVE_SUFFIXES = {"_prompt_rank": "lower", "_prompt_percentile": "higher",
                     "_percentile": "higher", "_z": "output"}


def ranking_column(rules: FilterRules, outputs: RunOutputs) -> tuple[str, bool]:
    """The column that ranks rows (``--by``, else the run's primary score) and whether higher
    is better there: an output's declared direction; a relative column's own (a prompt rank
    is best at 1, percentiles at 1, a z-score follows its output); other numeric columns
    rank higher first."""
    column = rules.by or outputs.primary
    if column in outputs.names:
        return column, outputs.higher_better(column)
    for suffix, way in RELATIVE_SUFFIXES.items():
        base = column.removesuffix(suffix)
        if column.endswith(suffix) and base in outputs.names:
            return column, outputs.higher_better(base) if way == "output" else way == "higher"
    return column, True


def check_rules(rules: FilterRules, schema: pa.Schema, outputs: RunOutputs | None = None
                ) -> None:
    """Every column a rule names exists and the expression is a condition: before any work."""
    columns = schema.names
    by, _ = ranking_column(rules, outputs or run_outputs(None).within(columns))
    for flag, column in (("--by", by), ("--per", rules.per)):
        if column is not None and column not in columns:
            raise ExpressionError(f"{flag} {column!r}: no such column; columns: "
                                  f"{', '.join(columns)}")
    by_type = schema.field(by).type
    if not (pa.types.is_floating(by_type) or pa.types.is_integer(by_type)):
        raise ExpressionError(f"--by {by!r} is not numeric")
    if rules.where:
        expression = compile_where(rules.where, columns)
        try:
            schema.empty_table().filter(expression)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, TypeError) as exc:
            raise ExpressionError(f"--where {rules.where!r}: {exc}") from exc


def pattern_labels(values: list[str], pattern: str) -> list[str]:
    """The first group of ``pattern`` in each value (e.g. the generator in a file name);
    'other' where it does not match."""
    compiled = re.compile(pattern)
    labels = []
    for value in values:
        match = compiled.search(value)
        labels.append(match.group(1) if match and match.groups() else "other")
    return labels


def group_labels(table: pa.Table, rules: FilterRules) -> np.ndarray:
    if rules.per:
        return np.array([str(v) for v in table[rules.per].to_pylist()], dtype=object)
    if rules.per_pattern:
        keys = [str(k) for k in table["key"].to_pylist()]
        return np.array(pattern_labels(keys, rules.per_pattern), dtype=object)
    return np.full(table.num_rows, "all", dtype=object)


def add_relative_columns(table: pa.Table, reference: dict | None = None,
                         outputs: RunOutputs | None = None) -> pa.Table:
    """Per output of the run: prompt rank (1 = best) and percentile, dataset percentile, and
    the z-score against the model's reference set. Percentiles are mid-rank fractions in
    [0, 1] (1 = best, in the output's own direction) over rows with a score; error rows get
    nulls; z-scores stay in the output's units."""
    frame = pd.DataFrame({"prompt": table["prompt"].to_pandas() if "prompt" in
                          table.column_names else pd.Series([None] * table.num_rows)})
    outputs = (outputs or run_outputs(None)).within(table.column_names)
    for column in outputs.names:
        raw = pd.Series(score_values(table, column))
        values = raw if outputs.higher_better(column) else -raw
        frame[column] = values
        by_prompt = frame.groupby("prompt", dropna=True)[column]
        prompt_rank = by_prompt.rank(method="min", ascending=False)
        prompt_count = by_prompt.transform("count")
        prompt_mid = by_prompt.rank(method="average", ascending=True)
        extra = {
            f"{column}_prompt_rank": _int_or_null(prompt_rank),
            f"{column}_prompt_percentile": _fraction(prompt_mid, prompt_count),
            f"{column}_percentile": _fraction(values.rank(method="average"),
                                              pd.Series(values.count(), index=values.index)),
        }
        stats = (reference or {}).get(column)
        if stats and stats.get("std"):
            extra[f"{column}_z"] = pa.array((raw - stats["mean"]) / stats["std"],
                                            pa.float64(), from_pandas=True)
        for name, array in extra.items():
            if name in table.column_names:
                table = table.drop_columns([name])
            table = table.append_column(name, array)
    return table


def _int_or_null(values: pd.Series) -> pa.Array:
    return pa.array([None if math.isnan(v) else int(v) for v in values], pa.int32())


def _fraction(mid_rank: pd.Series, count: pd.Series) -> pa.Array:
    # Mid-rank percentile: the lowest of n is 0, the highest 1, a lone row 1.
    fraction = np.where(count > 1, (mid_rank - 1) / (count - 1).clip(lower=1), 1.0)
    fraction = np.where(np.isnan(mid_rank), np.nan, fraction)
    return pa.array(fraction, pa.float64(), from_pandas=True)


def apply_rules(table: pa.Table, rules: FilterRules, embeddings=None,
                outputs: RunOutputs | None = None) -> tuple[pa.Table, dict]:
    """``table`` plus ``keep``, ``reason`` and ``duplicate_of`` columns, and counts.

    ``embeddings(shas) -> (n, d) array`` supplies image embeddings for near duplicates;
    ``outputs`` (the run's, from its footer) give the default ranking score and its direction.
    """
    outputs = (outputs or run_outputs(None)).within(table.column_names)
    check_rules(rules, table.schema, outputs)
    by, higher_better = ranking_column(rules, outputs)
    n = table.num_rows
    reason = np.full(n, None, dtype=object)
    duplicate_of = np.full(n, None, dtype=object)
    groups = group_labels(table, rules)
    keys = np.array([str(k) for k in table["key"].to_pylist()], dtype=object) \
        if "key" in table.column_names else np.arange(n).astype(str).astype(object)
    score = table[by].to_numpy(zero_copy_only=False).astype(float)
    if not higher_better:
        score = -score
    ok = np.array(table["status"].to_pylist()) == "ok" if "status" in table.column_names \
        else np.ones(n, bool)

    if not rules.keep_errors:
        reason[~ok] = "error"
    if rules.where:
        mask = _evaluate(table, rules.where)
        reason[(reason == None) & ~mask] = "where"  # noqa: E711
    # Best first: higher score, then smaller key, so the survivor never depends on order.
    order = np.lexsort((keys, -np.nan_to_num(score, nan=-np.inf)))
    scope = groups if rules.dedupe_scope == "group" else np.full(n, "all", dtype=object)
    if rules.dedupe in ("exact", "near") and "image_sha256" in table.column_names:
        shas = np.array(table["image_sha256"].to_pylist(), dtype=object)
        first: dict[tuple, str] = {}
        for i in order:
            if reason[i] is not None or shas[i] is None:
                continue
            seen = first.setdefault((scope[i], shas[i]), keys[i])
            if seen != keys[i]:
                reason[i], duplicate_of[i] = "duplicate", seen
    if rules.dedupe == "near":
        live = [i for i in order if reason[i] is None]
        shas = table["image_sha256"].to_pylist()
        vectors = np.asarray(embeddings([shas[i] for i in live]), np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)
        for label in dict.fromkeys(scope[live]):
            members = [j for j, i in enumerate(live) if scope[i] == label]
            kept: list[int] = []
            for j in members:
                if kept:
                    similar = vectors[kept] @ vectors[j]
                    best = int(np.argmax(similar))
                    if similar[best] >= rules.near_threshold:
                        reason[live[j]] = "near_duplicate"
                        duplicate_of[live[j]] = keys[live[kept[best]]]
                        continue
                kept.append(j)
    if rules.keep_top is not None:
        for label in dict.fromkeys(groups):
            members = [i for i in order if groups[i] == label and reason[i] is None]
            keep = math.ceil(rules.keep_top * len(members) - 1e-9)  # 0.3 * 10 is 3.0000000000000004
            for i in members[keep:]:
                reason[i] = "below_top"

    keep = np.array([r is None for r in reason])
    result = table.append_column("keep", pa.array(keep)).append_column(
        "reason", pa.array(reason.tolist(), pa.string())).append_column(
        "duplicate_of", pa.array(duplicate_of.tolist(), pa.string()))
    counts = {"rows": n, "kept": int(keep.sum()), "dropped": int((~keep).sum()),
              "dropped_by_rule": {r: c for r, c in Counter(reason[~keep]).items()},
              "groups": {}}
    for label in sorted(set(groups)):
        member = groups == label
        counts["groups"][label] = {
            "kept": int(keep[member].sum()), "dropped": int((~keep[member]).sum()),
            "dropped_by_rule": dict(Counter(reason[member & ~keep]))}
    return result, counts


def _evaluate(table: pa.Table, where: str) -> np.ndarray:
    """Boolean mask of rows for which ``where`` holds (null counts as not holding)."""
    import pyarrow.dataset as pads

    indexed = table.append_column("__row", pa.array(np.arange(table.num_rows)))
    passed = pads.dataset(indexed).to_table(filter=compile_where(where, table.column_names),
                                            columns=["__row"])
    mask = np.zeros(table.num_rows, bool)
    mask[passed["__row"].to_numpy()] = True
    return mask
