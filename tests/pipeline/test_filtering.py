"""Filter rules on a small hand-made score table: each rule's exact rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from iqray.pipeline.tables.filtering import FilterRules, add_relative_columns, apply_rules
from iqray.pipeline.tables.runs import ExpressionError, compile_where


def score_table() -> pa.Table:
    # Two generators (key prefix), two prompts; b1 is a byte-copy of a1; c2 failed.
    rows = [
        ("sd/a1", "cat", "s1", 4.0, 0.9, "ok"),
        ("sd/a2", "cat", "s2", 3.0, 0.5, "ok"),
        ("mj/b1", "cat", "s1", 3.5, 0.8, "ok"),
        ("mj/b2", "dog", "s3", 2.0, 0.7, "ok"),
        ("mj/c1", "dog", "s4", 4.5, 0.4, "ok"),
        ("sd/c2", "dog", "s5", None, None, "error"),
        ("sd/c3", "dog", "s6", 1.0, 0.2, "ok"),
    ]
    names = ["key", "prompt", "image_sha256", "quality", "alignment", "status"]
    columns = list(zip(*rows, strict=True))
    return pa.table({n: pa.array(c, pa.float32() if n in ("quality", "alignment") else None)
                     for n, c in zip(names, columns, strict=True)})


def kept(table: pa.Table, rules: FilterRules, embeddings=None) -> list[str]:
    result, _ = apply_rules(table, rules, embeddings)
    return [k for k, keep in zip(result["key"].to_pylist(), result["keep"].to_pylist(),
                                 strict=True) if keep]


def reasons(table: pa.Table, rules: FilterRules) -> dict[str, str | None]:
    result, _ = apply_rules(table, rules)
    return dict(zip(result["key"].to_pylist(), result["reason"].to_pylist(), strict=True))


def test_error_rows_are_dropped_unless_kept():
    table = score_table()
    assert "sd/c2" not in kept(table, FilterRules())
    assert reasons(table, FilterRules())["sd/c2"] == "error"
    assert len(kept(table, FilterRules(keep_errors=True))) == 7


def test_where_keeps_exactly_the_matching_rows():
    rules = FilterRules(where="quality >= 3.5 and alignment >= 0.6")
    assert kept(score_table(), rules) == ["sd/a1", "mj/b1"]
    assert kept(score_table(), FilterRules(where="prompt == 'dog' and not quality < 2")) == \
        ["mj/b2", "mj/c1"]


def test_exact_duplicates_keep_the_best_scored_copy():
    result, counts = apply_rules(score_table(), FilterRules(dedupe="exact"))
    row = result.to_pylist()[2]
    assert (row["key"], row["reason"], row["duplicate_of"]) == ("mj/b1", "duplicate", "sd/a1")
    assert counts["dropped_by_rule"] == {"error": 1, "duplicate": 1}
    # Scoped to groups, copies in different groups both stay.
    scoped = FilterRules(dedupe="exact", dedupe_scope="group", per_pattern=r"^(\w+)/")
    assert "mj/b1" in kept(score_table(), scoped)


def test_near_duplicates_use_embedding_cosine():
    table = score_table()
    vectors = {"s1": [1, 0, 0], "s2": [0.99, 0.14, 0], "s3": [0, 1, 0], "s4": [0, 0.96, 0.28],
               "s5": [0, 0, 1], "s6": [0, 0, 1]}

    def embeddings(shas):
        return np.array([vectors[s] for s in shas], np.float32)

    result, _ = apply_rules(table, FilterRules(dedupe="near", near_threshold=0.95,
                                               embeddings="cache"), embeddings)
    got = {r["key"]: (r["reason"], r["duplicate_of"]) for r in result.to_pylist()}
    assert got["sd/a2"] == ("near_duplicate", "sd/a1")  # cos 0.99 to a better image
    assert got["mj/b2"] == ("near_duplicate", "mj/c1")  # cos 0.96; c1 scores higher
    assert got["mj/b1"] == ("duplicate", "sd/a1")
    assert got["sd/c3"] == (None, None)  # its twin s5 failed scoring: nothing to match
    strict = FilterRules(dedupe="near", near_threshold=0.999, embeddings="cache")
    assert "sd/a2" in kept(table, strict, embeddings)


def test_keep_top_counts_within_each_group():
    table = score_table()
    # Global: 6 ok rows, top half = 3 best by quality.
    assert kept(table, FilterRules(keep_top=0.5)) == ["sd/a1", "mj/b1", "mj/c1"]
    # Per generator: sd has a1 4.0, a2 3.0, c3 1.0 -> top 2 (ceil 1.5); mj b1 3.5, b2 2.0,
    # c1 4.5 -> top 2.
    per = FilterRules(keep_top=0.5, per_pattern=r"^(\w+)/")
    assert sorted(kept(table, per)) == ["mj/b1", "mj/c1", "sd/a1", "sd/a2"]
    by_prompt = FilterRules(keep_top=0.33, per="prompt", by="alignment")
    assert sorted(kept(table, by_prompt)) == ["mj/b2", "sd/a1"]
    _, counts = apply_rules(table, per)
    assert counts["groups"]["sd"] == {"kept": 2, "dropped": 2,
                                      "dropped_by_rule": {"error": 1, "below_top": 1}}


def test_rules_apply_in_order_and_name_the_first_that_dropped_a_row():
    rules = FilterRules(where="alignment >= 0.5", dedupe="exact", keep_top=0.5)
    got = reasons(score_table(), rules)
    assert got == {"sd/a1": None, "sd/a2": None, "mj/b1": "duplicate",
                   "mj/b2": "below_top", "mj/c1": "where", "sd/c2": "error", "sd/c3": "where"}


def test_bad_expressions_and_unknown_columns_fail_before_any_work():
    table = score_table()
    for bad, message in (("__import__('os').system('true')", "Call is not allowed"),
                         ("quality.real > 1", "Attribute is not allowed"),
                         ("qualty > 3", "unknown column 'qualty'"),
                         ("quality >", "not an expression"),
                         ("3", "must evaluate to bool"),
                         ("prompt > 3", "prompt > 3")):
        with pytest.raises(ExpressionError, match=message):
            apply_rules(table, FilterRules(where=bad))
    with pytest.raises(ExpressionError, match="--per 'model': no such column"):
        apply_rules(table, FilterRules(keep_top=0.5, per="model"))
    with pytest.raises(ExpressionError, match="--by 'prompt' is not numeric"):
        apply_rules(table, FilterRules(keep_top=0.5, by="prompt"))
    with pytest.raises(ValueError, match="needs --embeddings"):
        FilterRules(dedupe="near")
    expression = compile_where("key in ['sd/a1', 'mj/b1'] or quality is None",
                               table.column_names)
    assert table.filter(expression)["key"].to_pylist() == ["sd/a1", "mj/b1", "sd/c2"]


def test_relative_columns_rank_within_prompts_and_against_the_reference():
    reference = {"quality": {"mean": 3.0, "std": 0.5}}
    table = add_relative_columns(score_table(), reference)
    rows = {r["key"]: r for r in table.to_pylist()}
    assert [rows[k]["quality_prompt_rank"] for k in ("sd/a1", "mj/b1", "sd/a2")] == [1, 2, 3]
    assert rows["sd/a1"]["quality_prompt_percentile"] == 1.0
    assert rows["mj/b1"]["quality_prompt_percentile"] == 0.5
    assert rows["sd/c2"]["quality_prompt_rank"] is None
    assert rows["mj/c1"]["quality_percentile"] == 1.0  # best of 6 scored rows
    assert rows["sd/c3"]["quality_percentile"] == 0.0
    assert rows["sd/a1"]["quality_z"] == pytest.approx(2.0)
    assert "alignment_z" not in table.column_names  # no reference for it: no z-score


def test_the_default_ranking_is_the_primary_output_in_its_own_direction():
    """Outputs from the run's footer: without --by, the primary score ranks; a lower-is-better
    primary keeps its lowest rows, and its percentiles put the lowest at 1 (best)."""
    from iqray.model.outputs import RunOutputs

    spec = {"low": 0, "high": 5, "zero_shot": True, "description": "", "needs_prompt": False}
    table = score_table().rename_columns(
        ["key", "prompt", "image_sha256", "noise", "alignment", "status"])
    outputs = RunOutputs({"noise": {**spec, "higher_better": False}})
    result, _ = apply_rules(table, FilterRules(keep_top=0.5), outputs=outputs)
    kept_keys = [k for k, keep in zip(result["key"].to_pylist(), result["keep"].to_pylist(),
                                      strict=True) if keep]
    assert kept_keys == ["sd/a2", "mj/b2", "sd/c3"]  # the 3 least noisy of 6 scored
    relative = add_relative_columns(table, None, outputs)
    percentile = dict(zip(relative["key"].to_pylist(),
                          relative["noise_percentile"].to_pylist(), strict=True))
    assert percentile["sd/c3"] == 1.0 and percentile["mj/c1"] == 0.0
    assert "alignment_percentile" not in relative.column_names  # not an output of this run
