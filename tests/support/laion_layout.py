"""The LAION aesthetic predictor's published layout, with random weights: what a user makes
of the published ``.pth`` (its tensors as ``model.safetensors``, key names ``layers.N.*``,
beside a config naming the architecture), on the tiny test tower."""

from __future__ import annotations

import json

import torch
from pipeline_data import REPO
from safetensors.torch import save_file
from torch import nn

TINY = "laion-aesthetic-tiny-random"


def published_mlp(input_size: int) -> nn.Sequential:
    """The predictor as its repository defines it (ReLUs commented out there too)."""
    return nn.Sequential(
        nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))


def published_checkpoint(folder, input_size=512, seed=0):
    """What a user makes of the published .pth: its tensors (key names ``layers.N.*``) as
    model.safetensors beside a config naming the architecture (here on the tiny tower)."""
    with torch.random.fork_rng(devices=[]):  # leaves the process's own stream alone
        torch.manual_seed(seed)
        reference = published_mlp(input_size)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({f"layers.{k}": v for k, v in reference.state_dict().items()},
              str(folder / "model.safetensors"))
    preset = json.loads((REPO / "model" / "configs" / "presets" / f"{TINY}.json").read_text())
    (folder / "config.json").write_text(json.dumps({**preset, "trained": True}))
    return reference
