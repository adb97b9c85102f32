"""BPCLIP on tiny random-init towers: outputs, frozen backbone, NR/FR, training, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import iqray.model
from iqray.model.bpclip import BPCLIP
from iqray.model.config import DEFAULT_ADJECTIVE_PAIRS, BPCLIPConfig, TowerConfig
from iqray.model.distortions import distort, square
from iqray.model.training import LevelRows, TrainSettings, fit_bpclip, level_features, predict

DIMENSIONS = ["aesthetics", "color", "exposure", "noise_free", "sharpness", "structure"]


@pytest.fixture(scope="module")
def images(sample_rows):
    return [square(Image.open(r["path"]).convert("RGB"), 224) for r in sample_rows]


def test_scores_have_quality_and_the_six_dimension_columns(images):
    model = iqray.model.load("bpclip-tiny-random")
    assert isinstance(model, BPCLIP)
    pairs = [p for v in model.config.heads.adjective_pairs.values() for p in v]
    assert len(pairs) == 20 and len({w for p in pairs for w in p}) == 40
    assert model.output_names == ["quality", *DIMENSIONS] == list(model.score_range)
    scores = model.score(images[:5])
    assert set(scores) == set(model.output_names)
    for values in scores.values():
        assert values.shape == (5,) and values.dtype == np.float32
        assert np.isfinite(values).all()
    for name in DIMENSIONS:
        assert ((scores[name] >= 0) & (scores[name] <= 1)).all()
    # Prompts are part of the common interface; BPCLIP does not use them.
    again = model.score(images[:5], prompts=["a cat"] * 5)
    np.testing.assert_allclose(again["quality"], scores["quality"], atol=1e-6)


def test_untrained_quality_is_clip_iqa_over_the_antonym_pairs(images):
    """Zero-shot = the tower's own embedding against the pairs, equal weights: computed
    here by hand from open_clip's encode_image/encode_text."""
    model = iqray.model.load("bpclip-tiny-random")
    pixels = torch.stack([model.transform(im) for im in images[:4]])
    tower = model.backbone
    with torch.no_grad():
        image = F.normalize(tower.encode_image(pixels), dim=-1)
        words = [w for d in DIMENSIONS for p in DEFAULT_ADJECTIVE_PAIRS[d] for w in p]
        text = F.normalize(tower.encode_text(model.tokenizer(
            [f"a {w} photo." for w in words])), dim=-1).reshape(20, 2, -1)
        logits = tower.logit_scale.exp() * torch.einsum("bd,pkd->bpk", image, text)
        good = logits.softmax(-1)[..., 0]
    scores = model.score(pixels)
    np.testing.assert_allclose(scores["quality"], good.mean(-1).numpy(), atol=1e-5)
    first = sum(len(DEFAULT_ADJECTIVE_PAIRS[d]) for d in DIMENSIONS[:4])  # sharpness: 4 pairs
    np.testing.assert_allclose(scores["sharpness"], good[:, first:first + 4].mean(-1).numpy(),
                               atol=1e-5)


def test_levels_come_from_four_depths_pooled_to_the_deepest_size():
    model = iqray.model.load("bpclip-tiny-random")
    assert model.depths == ["layer1", "layer2", "layer3", "layer4"]
    features = model.encode_levels(torch.randn(2, 3, 224, 224))
    assert [x.shape[1] for x in features.levels] == [64, 128, 256, 512]
    assert {tuple(x.shape[-2:]) for x in features.levels} == {(7, 7)}
    # ViT towers: tokens after evenly spaced blocks, as a grid (class token dropped).
    vit = BPCLIP.from_config(BPCLIPConfig(backbone=TowerConfig(model_name="iqray-tiny-ViT-16")))
    assert vit.depths == ["transformer.resblocks.0", "transformer.resblocks.1"]
    levels = vit.encode_levels(torch.randn(2, 3, 224, 224)).levels
    assert [tuple(x.shape) for x in levels] == [(2, 64, 14, 14)] * 2
    with pytest.raises(ValueError, match="no module"):
        BPCLIP.from_config(BPCLIPConfig(backbone=TowerConfig(model_name="iqray-tiny-RN"),
                                        depths=["layer9"]))


def test_the_backbone_is_frozen_and_not_in_the_trainable_state():
    model = iqray.model.load("bpclip-tiny-random")
    assert not any(p.requires_grad for p in model.backbone.parameters())
    state = model.trainable_state_dict()
    assert state and not any(k.startswith("backbone.") for k in state)
    counts = model.parameter_counts()
    assert counts["trainable"] == sum(v.numel() for v in state.values())
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.config = model.config.model_copy(update={"trained": True})
    model.train()
    assert not model.backbone.training  # frozen norms stay in eval mode
    loss = model(model.transform.normalize(torch.randint(0, 255, (4, 3, 224, 224),
                                                         dtype=torch.uint8)))["quality"].sum()
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.out_proj.weight.abs().sum() > 0  # the trainable part did move


def test_nr_and_fr_are_one_class_differing_only_in_projection_width():
    nr = iqray.model.load("bpclip-tiny-random")
    fr = iqray.model.load("bpclip-tiny-random", mode="fr")
    assert type(nr) is type(fr) and fr.full_reference and not nr.full_reference
    nr_shapes = {k: tuple(v.shape) for k, v in nr.trainable_state_dict().items()}
    fr_shapes = {k: tuple(v.shape) for k, v in fr.trainable_state_dict().items()}
    assert nr_shapes.keys() == fr_shapes.keys()
    differ = {k for k in nr_shapes if nr_shapes[k] != fr_shapes[k]}
    assert differ == {f"levels.{i}.{p}" for i in range(4)
                      for p in ("norm.weight", "norm.bias", "proj.weight")}
    for key in differ:  # [F_dist, F_ref, |F_dist - F_ref|]: three times the channels
        assert fr_shapes[key][-1] == 3 * nr_shapes[key][-1]
    with pytest.raises(ValueError, match="one reference per image"):
        fr.score([np.zeros((64, 64, 3), np.uint8)])
    with pytest.raises(ValueError, match="no-reference"):
        nr.score([np.zeros((64, 64, 3), np.uint8)], references=[np.zeros((64, 64, 3),
                                                                          np.uint8)])


def _blur_rows(model, sources):
    pixels, targets, levels, source_ids = [], [], [], []
    for s, clean in enumerate(sources):
        reference = model.transform.crop(clean)
        for level in range(6):
            distorted = model.transform.crop(distort(clean, "blur", level))
            pixels.append(torch.cat([distorted, reference]))
            targets.append((5 - level) / 5)
            levels.append(level)
            source_ids.append(s)
    targets = torch.tensor(targets)
    rows = LevelRows(level_features(model, torch.stack(pixels)),
                     {"quality": targets, "alignment": torch.full_like(targets, float("nan"))})
    return rows, np.array(levels), np.array(source_ids)


def test_fr_after_short_training_ranks_blur_levels_and_puts_identity_on_top(images):
    """12 source images x blur levels 0..5 for training; 4 other images held apart."""
    model = iqray.model.load("bpclip-tiny-random", mode="fr")
    train, _, _ = _blur_rows(model, images[:12])
    val, levels, sources = _blur_rows(model, images[12:16])
    result = fit_bpclip(model, train, val, TrainSettings(epochs=20, lr=3e-3,
                                                         train_batch_size=16), seed=0)
    assert result.best_val["quality"] > 0.8  # SRCC with the level on held-apart images
    quality = predict(model, val)["quality"]
    means = [quality[levels == lv].mean() for lv in range(6)]
    # Monotone in the level (level 1, radius 0.6 px, is barely visible to a tiny tower).
    assert all(a > b for a, b in zip(means[1:], means[2:], strict=False))
    assert means[0] >= means[1] - 0.01 and means[0] > max(means[2:]) + 0.05
    for s in range(4):  # reference == distorted scores above every clearly blurred version
        assert quality[(sources == s) & (levels == 0)][0] > quality[(sources == s)
                                                                    & (levels >= 2)].max()
    # The same through the public call, with references as images.
    clean = images[12]
    scored = model.score([clean, distort(clean, "blur", 4)], references=[clean, clean])
    assert scored["quality"][0] > scored["quality"][1]


def test_trained_checkpoint_round_trip_and_mode_is_fixed(tmp_path, images):
    model = iqray.model.load("bpclip-tiny-random", mode="fr")
    model.config = model.config.model_copy(update={
        "trained": True, "quality_scale": iqray.model.ScoreScale(low=0.0, high=5.0)})
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.trainable_state_dict().values():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    iqray.model.save_checkpoint(model, tmp_path / "ckpt")
    loaded = iqray.model.load(tmp_path / "ckpt")
    assert isinstance(loaded, BPCLIP) and loaded.full_reference and not loaded.zero_shot
    refs = images[4:7]
    expected = model.score(images[:3], references=refs)
    got = loaded.score(images[:3], references=refs)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-5)
    assert expected["quality"].std() > 0
    with pytest.raises(ValueError, match="trained in mode 'fr'"):
        iqray.model.load(tmp_path / "ckpt", mode="nr")
    with pytest.raises(ValueError, match="only bpclip"):
        iqray.model.load("mst-clipiqa-tiny-random", mode="fr")
