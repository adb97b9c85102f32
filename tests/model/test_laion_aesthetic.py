"""The LAION improved aesthetic predictor: the published head's layout and arithmetic, read
from a safetensors file with the published key names, on a tiny random tower."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from laion_layout import TINY, published_checkpoint
from pipeline_data import SAMPLE

import iqray.model
from iqray.model.registry import architecture


def test_the_published_head_loads_by_its_key_names_and_scores_as_published(tmp_path):
    reference = published_checkpoint(tmp_path / "laion").eval()
    model = iqray.model.load(tmp_path / "laion")
    assert architecture(model).name == "laion-aesthetic"
    assert sorted(model.trainable_state_dict()) == sorted(
        f"layers.{k}" for k in reference.state_dict())
    images = sorted((SAMPLE / "images").iterdir())[:6]
    scores = model.score(images)
    assert list(scores) == ["aesthetic"] and scores["aesthetic"].dtype == np.float32
    # The published recipe: CLIP image features, L2-normalised, through the MLP.
    with torch.inference_mode():
        pixels = torch.stack([model.transform.load(p) for p in images])
        features = model.tower(pixels)
        expected = reference(features / features.norm(dim=-1, keepdim=True)).squeeze(-1)
    np.testing.assert_allclose(scores["aesthetic"], expected.numpy(), atol=1e-5)
    # from cached embeddings: the same numbers
    (embedding,) = model.encode_images(pixels)
    cached = model.score_embeddings(embedding.numpy())
    np.testing.assert_allclose(cached["aesthetic"], scores["aesthetic"], atol=1e-6)
    assert model.score([])["aesthetic"].shape == (0,)


def test_a_head_of_the_wrong_shape_is_refused_and_the_untrained_preset_does_not_score(tmp_path):
    published_checkpoint(tmp_path / "wide", input_size=768)  # ViT-L-14's width, tiny tower
    with pytest.raises(iqray.model.CheckpointError, match="layers.0.weight"):
        iqray.model.load(tmp_path / "wide")
    untrained = iqray.model.load(TINY)
    with pytest.raises(ValueError, match="^laion-aesthetic has no zero-shot scores"):
        untrained.score(sorted((SAMPLE / "images").iterdir())[:1])


def test_the_full_size_preset_is_vit_l_14_openai_with_the_published_head():
    config = iqray.model.load_preset("laion-aesthetic")
    assert (config.tower.model_name, config.tower.pretrained) == ("ViT-L-14", "openai")
    assert (config.heads.embed_dim, config.heads.hidden) == (768, [1024, 128, 64, 16])
    assert config.output_names == ["aesthetic"] and not config.prompt_aware
