"""End-to-end training of a two-view model: random fine crops in training, centre in val;
weight averaging; distortion pretraining of the towers."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from iqray.model.config import MSTConfig
from iqray.model.distortions import KINDS, LEVELS, distort
from iqray.model.mst_clipiqa import MSTClipIQA
from iqray.model.preprocess import open_image
from iqray.model.training import (
    DISTORTION_CLASSES,
    ImageRows,
    TrainSettings,
    WeightAverage,
    distortion_batch,
    distortion_class,
    distortion_threads,
    embed_rows,
    fit_end_to_end,
    in_order_ahead,
    pretrain_on_distortions,
    validation_srcc,
)


def two_view_model() -> MSTClipIQA:
    config = {"coarse": {"model_name": "iqray-tiny-ViT-32", "image_size": 64},
              "fine": {"model_name": "iqray-tiny-ViT-16", "init_seed": 1, "image_size": 64},
              "image_size": 64, "fine_resize": 160}
    return MSTClipIQA.from_config(MSTConfig.model_validate(config))


def centre_rows(model: MSTClipIQA, sample_rows) -> tuple[ImageRows, ImageRows]:
    """12 sample images as 8 train and 4 val rows (centre views), targets spread over [0, 1]."""
    pixels = torch.stack([model.transform.crop(open_image(r["path"]))
                          for r in sample_rows[:12]])
    targets = {"quality": torch.linspace(0, 1, 12), "alignment": torch.linspace(1, 0, 12)}
    prompts = [r["prompt"] for r in sample_rows[:12]]
    return (ImageRows(pixels[:8], prompts[:8], {k: v[:8] for k, v in targets.items()}),
            ImageRows(pixels[8:], prompts[8:], {k: v[8:] for k, v in targets.items()}))


def test_training_draws_random_fine_crops_and_validates_on_the_centre(sample_rows):
    model = two_view_model()
    images = [open_image(r["path"]) for r in sample_rows[:12]]
    pixels = torch.stack([model.transform.crop(i) for i in images])
    areas = torch.stack([model.transform.fine_area(i) for i in images])
    targets = {"quality": torch.linspace(0, 1, 12), "alignment": torch.linspace(1, 0, 12)}
    prompts = [r["prompt"] for r in sample_rows[:12]]
    train = ImageRows(pixels[:8], prompts[:8], {k: v[:8] for k, v in targets.items()},
                      fine_areas=areas[:8])
    val = ImageRows(pixels[8:], prompts[8:], {k: v[8:] for k, v in targets.items()})
    seen: list[tuple[bool, torch.Tensor]] = []
    hook = model.fine_visual.register_forward_hook(
        lambda module, args, out: seen.append((module.training, args[0].detach().clone())))
    try:
        fit_end_to_end(model, train, val, TrainSettings(epochs=1, train_batch_size=8),
                       seed=0, tower_lr=1e-3)
    finally:
        hook.remove()
    normalise = model.transform.normalize
    training_inputs = [x for training, x in seen if training]
    val_inputs = [x for training, x in seen if not training]
    centres = normalise(pixels[:8, 3:]).flip(-1)
    flipped_or_not = [normalise(pixels[:8, 3:]), centres]
    # Training fine inputs are not (all) the centre crops, flipped or not...
    (batch,) = training_inputs
    assert not any(torch.allclose(batch, c, atol=1e-5) for c in flipped_or_not)
    # ...but each is a crop of one image's fine area (up to a flip; rows are shuffled).
    area = normalise(areas[:8])
    for i in range(8):
        assert any(is_crop_of(area[j], x) for j in range(8) for x in (batch[i],
                                                                      batch[i].flip(-1)))
    # Validation sees exactly the centre views.
    torch.testing.assert_close(torch.cat(val_inputs), normalise(pixels[8:, 3:]))


def is_crop_of(area: torch.Tensor, crop: torch.Tensor) -> bool:
    """Whether ``crop`` (3, s, s) is a window of ``area`` (3, A, A)."""
    size = crop.shape[-1]
    corners = area.unfold(1, 4, 1).unfold(2, 4, 1)  # 4x4 blocks at every position
    close = (corners - crop[:, None, None, :4, :4]).abs().amax(dim=(0, 3, 4)) < 1e-5
    for y, x in close.nonzero().tolist():
        window = area[:, y:y + size, x:x + size]
        if window.shape == crop.shape and torch.allclose(window, crop, atol=1e-5):
            return True
    return False


def test_weight_average_follows_the_warmed_up_recurrence_and_swaps_back():
    layer = torch.nn.Linear(2, 1)
    norm = torch.nn.BatchNorm1d(1)
    model = torch.nn.Sequential(layer, norm)
    names = {"0.weight", "0.bias", "1.running_mean", "1.num_batches_tracked"}
    average = WeightAverage(model, names, decay=0.9)
    # Integer buffers are not averaged; names outside the set are not tracked.
    assert set(average.shadow) == {"0.weight", "0.bias", "1.running_mean"}
    expected = layer.weight.detach().clone()
    for step in range(20):
        with torch.no_grad():
            layer.weight.fill_(float(step))
        decay = min(0.9, (1 + step) / (10 + step))
        assert average.current_decay() == pytest.approx(decay)
        average.update(model)
        expected = decay * expected + (1 - decay) * float(step)
    torch.testing.assert_close(average.shadow["0.weight"], expected)
    live = layer.weight.detach().clone()
    with average.applied(model):
        torch.testing.assert_close(layer.weight.detach(), expected)
    torch.testing.assert_close(layer.weight.detach(), live)


def test_end_to_end_training_with_an_average_validates_and_keeps_the_averaged_weights(
        sample_rows):
    model = two_view_model()
    train, val = centre_rows(model, sample_rows)
    settings = TrainSettings(epochs=3, train_batch_size=4, ema_decay=0.9)
    averaged = fit_end_to_end(model, train, val, settings, seed=0, tower_lr=1e-3)
    # The model ends with the selected epoch's weights, and they score as recorded.
    model.refresh_grade_text()
    assert validation_srcc(model, embed_rows(model, val)) == pytest.approx(averaged.best_val)
    plain = fit_end_to_end(model, train, val, settings.model_copy(update={"ema_decay": 0.0}),
                           seed=0, tower_lr=1e-3)
    # Same seed: the average only observes, so training takes the same steps (the live
    # weights are back after each validation)...
    assert [h["train_loss"] for h in averaged.history] == pytest.approx(
        [h["train_loss"] for h in plain.history], rel=1e-6)
    # ...and what is kept is the average, not the last weights: towers and heads differ.
    moved = {k.split(".")[0] for k in plain.state if plain.state[k].is_floating_point()
             and not torch.equal(plain.state[k], averaged.state[k])}
    assert {"coarse", "fine_visual", "fusion", "quality_head"} <= moved


def test_distortion_classes_are_clean_plus_every_kind_and_level_once():
    classes = [distortion_class(c) for c in range(DISTORTION_CLASSES)]
    assert classes == [None] + [(k, level) for k in KINDS for level in range(1, LEVELS + 1)]
    with pytest.raises(ValueError, match="0..25"):
        distortion_class(DISTORTION_CLASSES)


def test_each_pretraining_view_carries_the_distortion_its_label_names(sample_rows):
    model = two_view_model()
    views = torch.stack([model.transform.crop(open_image(r["path"]))[:3]
                         for r in sample_rows[:24]])
    out, labels = distortion_batch(views, np.random.default_rng(3))
    assert out.dtype == torch.uint8 and out.shape == views.shape
    assert len(set(labels.tolist())) > 10  # random classes, not one per batch
    # Replaying the generator gives each view's seed and flip: the view is exactly the
    # labelled distortion of its own source (so labels can never drift from images).
    replay = np.random.default_rng(3)
    replay.integers(0, DISTORTION_CLASSES, len(views))
    seeds = [int(replay.integers(1 << 30)) for _ in views]
    flips = replay.random(len(views)) < 0.5
    for view, label, seed, flip, got in zip(views, labels.tolist(), seeds, flips, out,
                                            strict=True):
        which = distortion_class(label)
        image = Image.fromarray(view.permute(1, 2, 0).numpy())
        expected = image if which is None else distort(image, *which, seed=seed)
        expected = torch.from_numpy(np.asarray(expected).copy()).permute(2, 0, 1)
        torch.testing.assert_close(got, expected.flip(-1) if flip else expected)


def test_distortion_pretraining_trains_each_image_tower_on_its_own_view(sample_rows):
    model = two_view_model()
    # Coarse views black, fine views white: every distortion keeps a black view dark and a
    # white one bright, so the tower inputs show which view each tower was given.
    pixels = torch.cat([torch.zeros(10, 3, 64, 64, dtype=torch.uint8),
                        torch.full((10, 3, 64, 64), 255, dtype=torch.uint8)], dim=1)
    seen = {"coarse": [], "fine": []}
    hooks = [tower.register_forward_hook(lambda m, args, out, role=role: seen[role].append(
        args[0].detach().clone())) for role, tower in (("coarse", model.coarse.visual),
                                                        ("fine", model.fine_visual))]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    records = []
    try:
        history = pretrain_on_distortions(
            model, pixels, TrainSettings(pretrain_distortions=2, train_batch_size=4), seed=0,
            on_epoch=records.append)
    finally:
        for hook in hooks:
            hook.remove()
    assert history == records and [h["epoch"] for h in history] == [1, 2]
    assert all(0 <= h["accuracy_coarse"] <= 1 and 0 <= h["accuracy_fine"] <= 1
               and np.isfinite(h["loss"]) for h in history)
    raw = {role: torch.cat(seen[role]) for role in seen}
    black, white = (model.transform.normalize(pixels[:1, :3]),
                    model.transform.normalize(pixels[:1, 3:]))
    assert len(raw["coarse"]) == len(raw["fine"]) == 2 * 10
    assert (raw["coarse"] - black).mean() < (raw["fine"] - black).mean()
    assert (raw["fine"] - white).abs().mean() < (raw["coarse"] - white).abs().mean()
    # Only the image towers learned; the text tower, heads and the frozen state are as before.
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert any(k.startswith("coarse.visual.") for k in changed)
    assert any(k.startswith("fine_visual.") for k in changed)
    assert all(k.startswith(("coarse.visual.", "fine_visual.")) for k in changed)
    assert not any(p.requires_grad for t in model.towers() for p in t.parameters())
    assert not model.training


def test_pretraining_views_are_distorted_on_threads_without_changing_the_result(monkeypatch):
    import iqray.model.training as training

    threads_used = []
    distorted_view = training.distorted_view

    def recording(view, label, seed):
        threads_used.append(threading.current_thread().name)
        return distorted_view(view, label, seed)

    monkeypatch.setattr(training, "distorted_view", recording)
    pixels = torch.randint(0, 256, (21, 6, 64, 64), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))  # last batch partial
    runs = {}
    for workers in (0, 3):
        model, threads_used[:] = two_view_model(), []
        settings = TrainSettings(pretrain_distortions=2, train_batch_size=8,
                                 distortion_workers=workers)
        history = pretrain_on_distortions(model, pixels, settings, seed=5)
        runs[workers] = history, model.state_dict(), set(threads_used)
        assert len(threads_used) == 2 * 2 * len(pixels)  # epochs x towers x views
    assert runs[0][2] == {"MainThread"}
    assert runs[3][2] and all(name.startswith("iqray-distort") for name in runs[3][2])
    assert runs[3][0] == runs[0][0]
    torch.testing.assert_close(runs[3][1], runs[0][1], rtol=0, atol=0)


def test_work_computed_ahead_comes_back_in_order_and_raises_where_it_failed():
    def slow_first(i):
        time.sleep(0.05 if i % 3 == 0 else 0.0)  # later items finish first
        return i * i

    for threads in (0, 1, 4, 9):
        assert list(in_order_ahead(slow_first, 7, threads)) == [i * i for i in range(7)]
    assert list(in_order_ahead(slow_first, 0, 4)) == []

    def broken(i):
        if i == 2:
            raise ValueError("view 2 is broken")
        return i

    got = []
    with pytest.raises(ValueError, match="view 2"):
        for item in in_order_ahead(broken, 6, 3):
            got.append(item)
    assert got == [0, 1]
    assert distortion_threads(TrainSettings(distortion_workers=0)) == 0
    assert 1 <= distortion_threads(TrainSettings()) <= 8


def test_end_to_end_training_can_start_from_distortion_pretrained_towers(sample_rows):
    model = two_view_model()
    train, val = centre_rows(model, sample_rows)
    settings = TrainSettings(epochs=1, train_batch_size=4, pretrain_distortions=2)
    pretrained = fit_end_to_end(model, train, val, settings, seed=0, tower_lr=1e-3)
    assert [h["epoch"] for h in pretrained.pretrain_history] == [1, 2]
    again = fit_end_to_end(model, train, val, settings, seed=0, tower_lr=1e-3)
    plain = fit_end_to_end(model, train, val, settings.model_copy(
        update={"pretrain_distortions": 0}), seed=0, tower_lr=1e-3)
    assert plain.pretrain_history == []
    # Seeded: the same settings train the same model; pretraining changes what is trained.
    assert again.pretrain_history == pretrained.pretrain_history
    torch.testing.assert_close(again.state, pretrained.state, rtol=0, atol=0)
    assert not torch.equal(plain.state["fine_visual.proj"], pretrained.state["fine_visual.proj"])
