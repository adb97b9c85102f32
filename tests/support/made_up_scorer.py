"""A throwaway architecture that exists only in the tests: two made-up outputs computed from
the pixels (``clutter``, lower is better and the primary score; ``colourfulness``, higher is
better), no prompt, no towers. It lives here, outside the package, and reaches iqray through
:func:`iqray.model.registry.register` alone, the way a user's own scorer would: importing
this module (``IQRAY_ARCHITECTURES=made_up_scorer``) is all it takes for `iqray score`,
`filter` and `report` to use it.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from iqray.model.outputs import ScoreSpec
from iqray.model.preprocess import ImageTransform
from iqray.model.registry import Architecture, register
from iqray.model.scoring_model import ScoringModule

NAME = "made-up"


class MadeUpConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    architecture: Literal["made-up"] = NAME
    description: str = "a test's made-up scorer"
    image_size: int = 32
    fine_resize: None = None
    trained: bool = False
    score_reference: dict[str, dict[str, float | int | str]] | None = None

    @property
    def tower_roles(self) -> tuple[str, ...]:
        return ()

    @property
    def output_names(self) -> list[str]:
        return ["clutter", "colourfulness"]

    @property
    def full_reference(self) -> bool:
        return False

    @property
    def prompt_aware(self) -> bool:
        return False


def made_up_outputs(config: MadeUpConfig) -> dict[str, ScoreSpec]:
    return {"clutter": ScoreSpec(0.0, 2.0, False, True, "mean horizontal pixel gradient"),
            "colourfulness": ScoreSpec(0.0, 1.0, True, True, "spread across the channels")}


class MadeUpScorer(ScoringModule):
    def __init__(self, config: MadeUpConfig):
        super().__init__()
        self.config = config
        self.transform = ImageTransform(config.image_size, (0.5,) * 3, (0.5,) * 3)
        self.weights = nn.Parameter(torch.ones(2), requires_grad=False)

    @classmethod
    def from_config(cls, config: MadeUpConfig, **_: Any) -> MadeUpScorer:
        return cls(config)

    def score_pixels(self, pixels, prompts):
        pixels = pixels.float() * 0.5 + 0.5  # back to [0, 1]
        clutter = (pixels[..., 1:] - pixels[..., :-1]).abs().mean((1, 2, 3)) * 2
        colourfulness = pixels.std(dim=1).mean((1, 2)) * 2
        return {"clutter": self.weights[0] * clutter,
                "colourfulness": self.weights[1] * colourfulness}

    def trainable_state_dict(self):
        return {}


register(Architecture(
    name=NAME, paper="none (a test's)", config_class="made_up_scorer:MadeUpConfig",
    model_class="made_up_scorer:MadeUpScorer", score_range="made_up_scorer:made_up_outputs",
    heads=("clutter", "colourfulness"), training=None, embedding_cache=False,
    full_reference=False, finetune=False, int8=False, compile=False))
