"""End-to-end training of a two-view model: random fine crops in training, centre in val."""

from __future__ import annotations

import torch

from iqray.model.config import MSTConfig
from iqray.model.mst_clipiqa import MSTClipIQA
from iqray.model.preprocess import open_image
from iqray.model.training import ImageRows, TrainSettings, fit_end_to_end


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
