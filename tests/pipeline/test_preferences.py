"""Pairing rules on a hand-made score table: strategies, margin, max uses, seeds, splits."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from iqray.pipeline.tables.preferences import PairRules, make_pairs, prompt_split, ranking_score


def score_table(per_prompt: int = 4, prompts: int = 3) -> pa.Table:
    keys, texts, quality, alignment, status = [], [], [], [], []
    for p in range(prompts):
        for i in range(per_prompt):
            keys.append(f"p{p}-{i}")
            texts.append(f"prompt {p}")
            quality.append(float(i))  # i = 0 .. per_prompt-1: image i beats every j < i
            alignment.append(float(per_prompt - i))
            status.append("ok")
    keys.append("p0-broken")
    texts.append("prompt 0")
    quality.append(None)
    alignment.append(None)
    status.append("error")
    return pa.table({"key": keys, "prompt": texts, "quality": pa.array(quality, pa.float32()),
                     "alignment": pa.array(alignment, pa.float32()), "status": status})


def named(table, pairs):
    keys = table["key"].to_pylist()
    return [(keys[p.chosen], keys[p.rejected]) for p in pairs]


def test_best_vs_worst_pairs_each_prompt_once():
    table = score_table()
    got = named(table, make_pairs(table, PairRules()))
    assert sorted(got) == [("p0-3", "p0-0"), ("p1-3", "p1-0"), ("p2-3", "p2-0")]


def test_margin_pairs_respect_the_gap_and_max_uses():
    table = score_table(per_prompt=5, prompts=1)
    everything = named(table, make_pairs(table, PairRules(strategy="margin", margin=0.5,
                                                          max_uses=10)))
    assert len(everything) == 10  # all 5 choose 2 pairs differ by >= 1
    assert all(int(a[-1]) > int(b[-1]) for a, b in everything)
    wide = named(table, make_pairs(table, PairRules(strategy="margin", margin=2.5,
                                                    max_uses=10)))
    assert sorted(wide) == [("p0-3", "p0-0"), ("p0-4", "p0-0"), ("p0-4", "p0-1")]
    limited = make_pairs(table, PairRules(strategy="margin", margin=0.5, max_uses=2))
    uses = Counter(i for p in limited for i in (p.chosen, p.rejected))
    assert max(uses.values()) <= 2
    assert limited[0].gap == 4.0  # strongest preference first


def test_ties_are_never_pairs_and_errors_never_join():
    table = score_table(per_prompt=3, prompts=1)
    table = table.set_column(2, "quality", pa.array([1.0, 1.0, 1.05, None], pa.float32()))
    assert make_pairs(table, PairRules(strategy="margin", margin=0.0, max_uses=5)) != []
    assert named(table, make_pairs(table, PairRules(strategy="margin", margin=0.1))) == []
    pairs = make_pairs(score_table(), PairRules(strategy="margin", margin=0.0, max_uses=9))
    assert "p0-broken" not in {k for pair in named(score_table(), pairs) for k in pair}


def test_top_bottom_pairs_the_top_k_with_the_bottom_k():
    table = score_table(per_prompt=6, prompts=1)
    got = named(table, make_pairs(table, PairRules(strategy="top_bottom", top_k=2,
                                                   max_uses=5)))
    assert sorted(got) == [("p0-4", "p0-0"), ("p0-4", "p0-1"), ("p0-5", "p0-0"),
                           ("p0-5", "p0-1")]


def test_rank_by_alignment_and_mix():
    table = score_table(per_prompt=4, prompts=1)
    by_alignment = named(table, make_pairs(table, PairRules(rank_by="alignment")))
    assert by_alignment == [("p0-0", "p0-3")]
    mixed = ranking_score(table, PairRules(rank_by="mix", quality_weight=0.5))
    # quality and alignment disagree exactly: an even mix makes every image equal
    assert np.allclose(mixed[:4], 0.5) and np.isnan(mixed[4])
    assert make_pairs(table, PairRules(rank_by="mix", margin=0.01)) == []
    with pytest.raises(ValueError, match="at most 1"):
        PairRules(rank_by="mix", margin=2)


def test_the_seed_decides_equal_gaps_and_one_seed_gives_one_output():
    table = score_table(per_prompt=4, prompts=6)
    rules = PairRules(strategy="margin", margin=0.5, max_uses=1)
    first = named(table, make_pairs(table, rules))
    assert first == named(table, make_pairs(table, rules))
    others = {tuple(named(table, make_pairs(table, rules.model_copy(update={"seed": s}))))
              for s in range(1, 6)}
    assert len(others | {tuple(first)}) > 1


def test_the_split_is_by_prompt():
    rules = PairRules(val_fraction=0.3, seed=4)
    prompts = [f"prompt {i}" for i in range(400)]
    splits = {p: prompt_split(p, rules) for p in prompts}
    assert 0.2 < sum(s == "validation" for s in splits.values()) / 400 < 0.4
    assert all(prompt_split(p, rules) == s for p, s in splits.items())


def test_rank_by_follows_the_runs_outputs_and_their_direction():
    """Another architecture's outputs: the primary is the default, a lower-is-better score
    ranks negated (the winner has the least), mix takes the primary and the prompt score,
    and a name the run lacks is refused in one line."""
    from iqray.model.outputs import RunOutputs

    spec = {"low": 0, "high": 9, "zero_shot": True, "description": ""}
    outputs = RunOutputs({"blur": {**spec, "higher_better": False, "needs_prompt": False},
                          "match": {**spec, "higher_better": True, "needs_prompt": True}})
    table = score_table(per_prompt=4, prompts=1).rename_columns(
        ["key", "prompt", "blur", "match", "status"])
    assert named(table, make_pairs(table, PairRules(), outputs)) == [("p0-0", "p0-3")]
    assert named(table, make_pairs(table, PairRules(rank_by="match"), outputs)) == \
        [("p0-0", "p0-3")]
    # blur (negated) and match agree here: the mix ranks as each does
    mixed = ranking_score(table, PairRules(rank_by="mix"), outputs)
    assert np.argmax(mixed[:4]) == 0 and np.argmin(mixed[:4]) == 3
    with pytest.raises(ValueError, match=r"^--rank-by 'quality': the run has no such score; "
                                         r"it has blur, match \(or mix\)$"):
        make_pairs(table, PairRules(rank_by="quality"), outputs)
