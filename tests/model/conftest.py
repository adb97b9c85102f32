from __future__ import annotations

import pytest
import torch

import iqray.model


@pytest.fixture(scope="session")
def zero_shot_model():
    return iqray.model.load("mst-clipiqa-tiny-random")


def make_trained(seed: int = 0) -> iqray.model.MSTClipIQA:
    """A tiny model whose heads are in trained mode with non-trivial weights.

    The residual gate is opened so the cross-attention actually shapes the alignment score
    (at its init value of 0 a padding-mask bug would be invisible).
    """
    model = iqray.model.load("mst-clipiqa-tiny-random")
    model.config = model.config.model_copy(update={
        "trained": True,
        "quality_scale": iqray.model.ScoreScale(low=0.0, high=5.0),
        "alignment_scale": iqray.model.ScoreScale(low=0.0, high=5.0),
    })
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "fusion" not in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
        model.alignment_head.alpha.fill_(0.8)
    return model


@pytest.fixture(scope="session")
def make_trained_model():
    return make_trained


@pytest.fixture(scope="session")
def trained_model():
    return make_trained()
