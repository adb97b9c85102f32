"""A model that scores nothing: the ``constant`` architecture, registered like any plugin.

`iqray bench --measure overhead` runs `iqray score` with it so that what is measured is the
pipeline's own cost per row (read, decode, object store, the model stage's bookkeeping,
the driver loop, the commits): the same Scorer stage, rows and columns, with constant
scores in place of towers. It reaches iqray through ``register`` alone; Ray workers import
this module when they unpickle its config, which registers it there too.
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

NAME = "constant"
SCORE = 0.5


class ConstantConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    architecture: Literal["constant"] = NAME
    description: str = "iqray bench's constant model (no weights; scores nothing)"
    image_size: int = 224
    fine_resize: None = None
    trained: bool = False
    outputs: list[str]  # the columns of the model it stands in for
    prompt_aware: bool = False
    score_reference: None = None

    @property
    def tower_roles(self) -> tuple[str, ...]:
        return ()

    @property
    def output_names(self) -> list[str]:
        return list(self.outputs)

    @property
    def full_reference(self) -> bool:
        return False


def constant_outputs(config: ConstantConfig) -> dict[str, ScoreSpec]:
    return {name: ScoreSpec(0.0, 1.0, True, True, f"constant {SCORE}: a benchmark's stand-in")
            for name in config.outputs}


class ConstantModel(ScoringModule):
    """The stand-in: the crops arrive and are normalised on the device as for a real model;
    the scores are constant."""

    def __init__(self, config: ConstantConfig):
        super().__init__()
        self.config = config
        self.transform = ImageTransform(config.image_size, (0.5,) * 3, (0.5,) * 3)
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)  # gives it a device

    @classmethod
    def from_config(cls, config: ConstantConfig, **_: Any) -> ConstantModel:
        return cls(config)

    def score_pixels(self, pixels, prompts):
        count = len(pixels)
        out = {name: torch.full((count,), SCORE) for name in self.config.outputs}
        if self.config.prompt_aware:
            out["prompt_truncated"] = torch.zeros(count, dtype=torch.bool)
        return out

    def trainable_state_dict(self):
        return {}



register(Architecture(
    name=NAME, paper="none (a benchmark's stand-in)",
    config_class="iqray_bench.constant:ConstantConfig",
    model_class="iqray_bench.constant:ConstantModel",
    score_range="iqray_bench.constant:constant_outputs", heads=(), training=None,
    embedding_cache=False, full_reference=False, finetune=False, int8=False, compile=False))
