"""End-to-end training of a two-view model: random fine crops in training, centre in val."""

from __future__ import annotations

import pytest
import torch

from iqray.model.config import MSTConfig
from iqray.model.mst_clipiqa import MSTClipIQA
from iqray.model.preprocess import open_image
from iqray.model.training import (
    ImageRows,
    TrainSettings,
    WeightAverage,
    embed_rows,
    fit_end_to_end,
    validation_srcc,
)


def two_view_model() -> MSTClipIQA:
    config = {"coarse": {"model_name": "iqray-tiny-ViT-32", "image_size": 64},
              "fine": {"model_name": "iqray-tiny-ViT-16", "init_seed": 1, "image_size": 64},
              "image_size": 64, "fine_resize": 160}
    return MSTClipIQA.from_config(MSTConfig.model_validate(config))


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
    images = [open_image(r["path"]) for r in sample_rows[:12]]
    pixels = torch.stack([model.transform.crop(i) for i in images])
    targets = {"quality": torch.linspace(0, 1, 12), "alignment": torch.linspace(1, 0, 12)}
    prompts = [r["prompt"] for r in sample_rows[:12]]
    train = ImageRows(pixels[:8], prompts[:8], {k: v[:8] for k, v in targets.items()})
    val = ImageRows(pixels[8:], prompts[8:], {k: v[8:] for k, v in targets.items()})
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
