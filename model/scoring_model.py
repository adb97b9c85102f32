"""What every scoring model is: the :class:`ScoringModel` protocol that ``iqray.model.load``,
the pipeline's model stage, re-scoring and the jobs rely on, and :class:`ScoringModule`, a
base class that gives a new architecture the shared parts (input handling, batching, eval
mode, empty inputs, what its outputs mean) so its module holds only what is its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from iqray.model.outputs import ScoreSpec
from iqray.model.preprocess import ImageSource, ImageTransform, image_batch, prompt_list

MAX_LOGIT_SCALE = 100.0  # CLIP's own clamp
HEAD_INIT_SEED = 0  # seeds the trainable heads a model is built with (training reseeds per repeat)


@runtime_checkable
class ScoringModel(Protocol):
    """A model iqray can score with: built from its config, scoring images (and prompts)
    into one float32 array per output, on the scales its ``score_range`` declares."""

    config: Any
    transform: ImageTransform

    @classmethod
    def from_config(cls, config: Any, cache_dir: str | Path | None = None,
                    base_dir: str | Path | None = None,
                    allow_download: bool | None = None) -> ScoringModel: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def output_names(self) -> list[str]: ...

    @property
    def score_range(self) -> dict[str, ScoreSpec]: ...

    def score(self, images: Sequence[ImageSource] | torch.Tensor,
              prompts: Sequence[str | None] | None = None,
              batch_size: int = 32) -> dict[str, np.ndarray]: ...

    def trainable_state_dict(self) -> dict[str, torch.Tensor]: ...


class ScoringModule(nn.Module):
    """Base of a model that scores normalised crops. A subclass sets ``config`` and
    ``transform`` and implements :meth:`score_pixels` (normalised pixels and their prompts in,
    each output on its score scale out) and :meth:`trainable_state_dict`; :meth:`score`
    takes every input ``model.score`` documents."""

    config: Any
    transform: ImageTransform

    @property
    def zero_shot(self) -> bool:
        return not self.config.trained

    @property
    def mode(self) -> str:
        return "zero-shot" if self.zero_shot else "trained"

    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        return {"trainable": trainable, "frozen": frozen}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def output_names(self) -> list[str]:
        return list(self.config.output_names)

    @property
    def score_range(self) -> dict[str, ScoreSpec]:
        from iqray.model.registry import architecture

        return architecture(self.config).score_specs(self.config)

    def to_score_scale(self, normalised: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Heads' [0, 1] predictions on each output's scale (:attr:`score_range`)."""
        spec = self.score_range
        return {k: spec[k].low + v * (spec[k].high - spec[k].low) for k, v in normalised.items()}

    def score_pixels(self, pixels: torch.Tensor, prompts: list[str | None]
                     ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def empty_scores(self) -> dict[str, np.ndarray]:
        out = {name: np.zeros(0, np.float32) for name in self.output_names}
        if self.config.prompt_aware:
            out["prompt_truncated"] = np.zeros(0, bool)
        return out

    @torch.inference_mode()
    def score(self, images: Sequence[ImageSource] | torch.Tensor,
              prompts: Sequence[str | None] | None = None,
              batch_size: int = 32) -> dict[str, np.ndarray]:
        """Score one image or many: a path, bytes, PIL image, HxWx3 uint8 array or CHW
        tensor (uint8, or floats in [0, 1]); a list of them; or an NCHW batch (at the
        model's crop shape it is taken as crops: uint8 from :meth:`ImageTransform.crop`, or
        floats already normalised). ``prompts``: None, one string for every image, or one
        per image.

        Returns one float32 array per output (``output_names``, on the scales in
        :attr:`score_range`), and bool ``prompt_truncated`` for models that read prompts.
        Scores do not depend on batch size or on the other rows of a batch."""
        from iqray.model.registry import architecture

        architecture(self.config).check_can_score(self.config)
        images = image_batch(images, self.transform.channels, self.transform.size)
        count = len(images)
        prompts = prompt_list(prompts, count)
        was_training = self.training
        self.eval()
        parts: dict[str, list[np.ndarray]] = {}
        try:
            for start in range(0, count, batch_size):
                chunk = images[start : start + batch_size]
                if isinstance(chunk, torch.Tensor):
                    # uint8 crops (the pipeline's decode output) are normalised here, on the
                    # model's device; float tensors are taken as already normalised.
                    pixels = chunk.to(self.device)
                    if pixels.dtype == torch.uint8:
                        pixels = self.transform.normalize(pixels)
                else:
                    pixels = torch.stack([self.transform.load(img) for img in chunk])
                scores = self.score_pixels(pixels.to(self.device),
                                           list(prompts[start : start + batch_size]))
                for key, value in scores.items():
                    value = value.cpu().numpy() if isinstance(value, torch.Tensor) else value
                    parts.setdefault(key, []).append(
                        value if value.dtype == bool else value.astype(np.float32))
        finally:
            self.train(was_training)
        if count == 0:
            return self.empty_scores()
        return {k: np.concatenate(v) for k, v in parts.items()}
