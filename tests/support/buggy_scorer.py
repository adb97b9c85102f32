"""An architecture with a bug, for tests/jobs/test_exit_codes.py: a real model stage whose
model fails on every batch with an exception no stage expects (a KeyError), registered the
way any plugin is. Ray workers import it when they unpickle its config (tests/conftest.py
puts tests/support on their PYTHONPATH)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from iqray.model.outputs import ScoreSpec
from iqray.model.preprocess import ImageTransform
from iqray.model.registry import Architecture, register
from iqray.model.scoring_model import ScoringModule

NAME = "buggy"


class BuggyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    architecture: Literal["buggy"] = NAME
    description: str = "a test's scorer with a bug"
    image_size: int = 32
    fine_resize: None = None
    trained: bool = False
    score_reference: None = None
    tower_roles: tuple[str, ...] = ()
    output_names: list[str] = ["score"]
    full_reference: bool = False
    prompt_aware: bool = False


def buggy_outputs(config: BuggyConfig) -> dict[str, ScoreSpec]:
    return {"score": ScoreSpec(0.0, 1.0, True, True, "never computed")}


class BuggyScorer(ScoringModule):
    def __init__(self, config: BuggyConfig):
        super().__init__()
        self.config = config
        self.transform = ImageTransform(config.image_size, (0.5,) * 3, (0.5,) * 3)
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)

    @classmethod
    def from_config(cls, config: BuggyConfig, **_: Any) -> BuggyScorer:
        return cls(config)

    def score_pixels(self, pixels, prompts):
        batch = {"pixels": pixels}
        return batch["no_such_column"]

    def trainable_state_dict(self):
        return {}


register(Architecture(
    name=NAME, paper="none (a test's)", config_class="buggy_scorer:BuggyConfig",
    model_class="buggy_scorer:BuggyScorer", score_range="buggy_scorer:buggy_outputs",
    heads=("score",), training=None, embedding_cache=False, full_reference=False,
    finetune=False, int8=False, compile=False))
