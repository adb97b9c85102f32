"""The LAION improved aesthetic predictor (github.com/christophschuhmann/
improved-aesthetic-predictor): CLIP ViT-L-14 (``openai``) image embedding, L2-normalised,
then an MLP 768 -> 1024 -> 128 -> 64 -> 16 -> 1 predicting the mean aesthetic rating.

The head's parameters carry the published checkpoint's names (``layers.0.weight`` ...
``layers.7.bias``), so the published weights are this model's ``model.safetensors`` once
converted from the ``.pth`` (a one-line conversion the README shows; iqray never unpickles).
The tower resolves like every other tower (:mod:`iqray.model.weights`). Training fits the
head on cached tower embeddings, as MST-CLIPIQA's heads are fitted.

The MLP predicts on the rating scale (``aesthetic_scale``: 1-10 for the published weights,
the training data's range after `iqray train`); :meth:`forward_heads` maps that to [0, 1],
what the training loss and the shared training code see.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from iqray.model.config import LaionAestheticConfig
from iqray.model.outputs import ScoreSpec, laion_aesthetic_outputs
from iqray.model.preprocess import ImageTransform
from iqray.model.scoring_model import HEAD_INIT_SEED, ScoringModule
from iqray.model.weights import (
    check_input_size,
    create_tower,
    tower_embed_dim,
    tower_preprocess_stats,
)


def aesthetic_mlp(config: LaionAestheticConfig) -> nn.Sequential:
    """The predictor's layers, in the published order and indices: Linear, Dropout, ...,
    Linear(16, 1); no activations (the published model has none)."""
    widths = [config.heads.embed_dim, *config.heads.hidden, 1]
    dropout = list(config.heads.dropout)
    layers: list[nn.Module] = []
    for number, (width_in, width_out) in enumerate(zip(widths, widths[1:], strict=False)):
        layers.append(nn.Linear(width_in, width_out))
        if number < len(dropout):
            layers.append(nn.Dropout(dropout[number]))
    return nn.Sequential(*layers)


class LaionAesthetic(ScoringModule):
    """A frozen image tower and the aesthetic MLP. Build with :func:`iqray.model.load`."""

    def __init__(self, config: LaionAestheticConfig, tower: nn.Module,
                 mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.config = config
        check_input_size(tower, config.image_size, f"tower {config.tower.model_name}")
        out = tower_embed_dim(tower)
        self.tower = tower.visual  # the text side is never used
        if out != config.heads.embed_dim:
            raise ValueError(f"tower {config.tower.model_name} embeds to {out}-d, the head "
                             f"expects {config.heads.embed_dim}-d (heads.embed_dim)")
        self.transform = ImageTransform(config.image_size, tuple(mean), tuple(std))
        self.reset_heads(HEAD_INIT_SEED)

    @classmethod
    def from_config(cls, config: LaionAestheticConfig, cache_dir: str | Path | None = None,
                    base_dir: str | Path | None = None, allow_download: bool | None = None,
                    ) -> LaionAesthetic:
        tower = create_tower(config.tower, cache_dir, base_dir, allow_download)
        mean, std = tower_preprocess_stats(config.tower)
        return cls(config, tower, mean, std)

    @property
    def score_range(self) -> dict[str, ScoreSpec]:
        return laion_aesthetic_outputs(self.config)

    def train(self, mode: bool = True) -> LaionAesthetic:
        super().train(mode)
        self.tower.eval()  # frozen: fixed norms, no dropout
        return self

    def reset_heads(self, seed: int) -> None:
        """A fresh, seeded head (one training repeat); the tower is untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layers = aesthetic_mlp(self.config)
        if "layers" in self._modules:
            layers.to(self.layers[0].weight.device)
        self.layers = layers

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The MLP under the published checkpoint's key names."""
        return {k: v for k, v in self.state_dict().items() if k.startswith("layers.")}

    # -- the frozen tower (cacheable) and the head -----------------------------------------
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor]:
        """The tower's projected image embedding, float32, not normalised (one role)."""
        pixels = pixels.to(self.device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            embedding = self.tower(pixels)
        return (embedding.float(),)

    def forward_heads(self, embedding: torch.Tensor, prompts=None,
                      group_classifier: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """[0, 1]-normalised predictions from a tower embedding (what the loss sees);
        ``prompts`` is unused (the predictor reads none)."""
        unit = F.normalize(embedding.to(self.device).float(), dim=-1)
        rating = self.layers(unit).squeeze(-1)
        scale = self.config.aesthetic_scale
        out = {"aesthetic": (rating - scale.low) / (scale.high - scale.low)}
        if group_classifier is not None:
            out["group_logits"] = group_classifier(unit)
        return out

    def score_pixels(self, pixels: torch.Tensor, prompts) -> dict[str, torch.Tensor]:
        return self.to_score_scale(self.forward_heads(*self.encode_images(pixels)))

    @torch.inference_mode()
    def score_embeddings(self, embedding, prompts: Sequence[str | None] | None = None,
                         batch_size: int = 1024) -> dict[str, np.ndarray]:
        """Scores from cached tower embeddings: only the MLP runs."""
        embedding = torch.as_tensor(np.asarray(embedding), dtype=torch.float32)
        self.eval()
        parts = [self.to_score_scale(self.forward_heads(embedding[start:start + batch_size]))
                 ["aesthetic"].cpu().numpy() for start in range(0, len(embedding), batch_size)]
        return {"aesthetic": np.concatenate(parts).astype(np.float32) if parts
                else np.zeros(0, np.float32)}
