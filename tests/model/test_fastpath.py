"""--precision int8: the image towers' Linear layers become dynamically quantised; scores
stay in rank order against fp32 on a trained model; refused where it makes no sense."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

import iqray.model
from iqray.model.fastpath import apply_precision, image_towers


def test_int8_quantises_the_image_towers_only_and_keeps_the_ranking(sample_rows):
    paths = [r["path"] for r in sample_rows]
    prompts = [r["prompt"] for r in sample_rows]
    reference = iqray.model.load(iqray.model.DEFAULT_MODEL)
    fast = apply_precision(iqray.model.load(iqray.model.DEFAULT_MODEL), "int8")
    quantised = [m for t in image_towers(fast) for m in t.modules()
                 if type(m).__module__.startswith("torch.ao.nn.quantized")]
    assert quantised  # the towers' Linear layers were replaced
    text_linears = [type(m) for m in fast.coarse.transformer.modules()
                    if isinstance(m, torch.nn.Linear)]
    assert text_linears and not any(t.__module__.startswith("torch.ao") for t in text_linears)
    base, other = reference.score(paths, prompts), fast.score(paths, prompts)
    for name in ("quality", "alignment"):
        assert stats.spearmanr(base[name], other[name]).statistic >= 0.999
        assert np.abs(base[name] - other[name]).max() < 0.05
        assert not np.array_equal(base[name], other[name])  # it did run another path


def test_precision_is_checked():
    model = iqray.model.load("mst-clipiqa-tiny-random")
    assert apply_precision(model, "fp32") is model
    with pytest.raises(ValueError, match="unknown precision"):
        apply_precision(model, "bf16")
    model.set_towers_trainable(True)
    with pytest.raises(ValueError, match="cannot be trained"):
        apply_precision(model, "int8")



def test_compiled_towers_score_like_eager_ones(sample_rows):
    from iqray.model.fastpath import compile_towers

    paths = [r["path"] for r in sample_rows[:8]]
    prompts = [r["prompt"] for r in sample_rows[:8]]
    eager = iqray.model.load("mst-clipiqa-tiny-random")
    compiled = compile_towers(iqray.model.load("mst-clipiqa-tiny-random"))
    assert type(compiled.fine_visual).__name__ == "OptimizedModule"
    base, other = eager.score(paths, prompts), compiled.score(paths, prompts)
    for name in ("quality", "alignment"):
        np.testing.assert_allclose(other[name], base[name], rtol=1e-4, atol=1e-5)


def test_compile_is_refused_where_it_is_not_offered():
    from iqray.model.fastpath import compile_towers

    with pytest.raises(ValueError, match="int8 is not offered"):
        compile_towers(apply_precision(iqray.model.load("mst-clipiqa-tiny-random"), "int8"))
    with pytest.raises(ValueError, match="--compile is not offered by bpclip models"):
        compile_towers(iqray.model.load("bpclip-tiny-random"))
    trainable = iqray.model.load("mst-clipiqa-tiny-random")
    trainable.set_towers_trainable(True)
    with pytest.raises(ValueError, match="cannot be trained"):
        compile_towers(trainable)
