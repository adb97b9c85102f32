"""iqray.model: torch modules, configs, weight loading and checkpoints. Never imports Ray.

The one call a user needs::

    import iqray.model
    model = iqray.model.load("mst-clipiqa", device="cuda")      # preset, or a checkpoint dir
    scores = model.score(images, prompts)                        # dict of numpy arrays
    model.score_range                                            # what each output means
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

# The trained offline model that ships in the package (AGIQA-3K, small towers from scratch).
DEFAULT_MODEL = "iqray-small-agiqa3k"

# Public names and the submodule that defines each, imported on first use: Ray's read and
# write tasks import this package for configs and constants, and torch + open_clip cost about
# 7 s of start-up in every worker process on a 2-core machine.
_EXPORTS = {
    "bpclip": ("BPCLIP", "LevelFeatures"),
    "checkpoint": ("CheckpointError", "checkpoint_files", "load_trainable",
                   "read_checkpoint_config", "save_checkpoint"),
    "config": ("BPCLIPConfig", "HeadsConfig", "ModelConfig", "MSTConfig", "ScoreScale",
               "TowerConfig", "load_preset", "preset_names", "shipped_models"),
    "mst_clipiqa": ("MSTClipIQA", "PromptBatch"),
    "outputs": ("ScoreSpec",),
    "scoring_model": ("ScoringModel", "ScoringModule"),
    "images": ("CropViews", "ImageDecodeError", "open_image"),
    "preprocess": ("ImageTransform",),
    "weights": ("UnsafeCheckpointError", "WeightsNotFoundError", "resolve_tower_weights"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}

if TYPE_CHECKING:
    import torch

    from iqray.model.config import ModelConfig
    from iqray.model.scoring_model import ScoringModel

# Derived, so a name added to _EXPORTS is public without a second list to keep in step.
__all__ = ["DEFAULT_MODEL", "load", "resolve_device", *_HOME]


def __getattr__(name: str):
    if name in _HOME:
        value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    elif not name.startswith("_") and (Path(__file__).parent / f"{name}.py").exists():
        value = importlib.import_module(f"{__name__}.{name}")  # iqray.model.weights, ...
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})


def resolve_device(device: str | torch.device | None) -> torch.device:
    import torch

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def with_mode(config: ModelConfig, mode: str | None) -> ModelConfig:
    """``config`` in BPCLIP mode ``mode`` ('nr'/'fr'; None keeps it). A trained checkpoint
    keeps the mode it was trained in; MST-CLIPIQA has no full-reference mode."""
    from iqray.model.registry import architecture

    if mode is None or mode == ("fr" if config.full_reference else "nr"):
        return config
    architecture(config).require("full_reference", f"mode {mode!r} (full-reference)")
    if config.trained:
        raise ValueError(f"this checkpoint was trained in mode {config.mode!r}; it cannot "
                         f"score in mode {mode!r}")
    return config.model_copy(update={"mode": mode})


def build(config: ModelConfig, **kwargs) -> ScoringModel:
    """The module a config describes (towers resolved as in :mod:`iqray.model.weights`)."""
    from iqray.model.registry import architecture

    return architecture(config).model_type().from_config(config, **kwargs)


def load(name_or_path: str | os.PathLike = DEFAULT_MODEL, device: str | torch.device = "cpu",
         cache_dir: str | os.PathLike | None = None, allow_download: bool | None = None,
         prompt_cache_size: int = 2048, mode: str | None = None) -> ScoringModel:
    """Build a scoring model from a preset name or a checkpoint (directory, weights or config).

    Tower weights resolve as documented in :mod:`iqray.model.weights`; trained head weights
    come from the checkpoint's ``model.safetensors`` (never a pickle). ``mode`` ('nr'/'fr')
    picks BPCLIP's no-/full-reference mode for an untrained preset.
    """
    from iqray.model.checkpoint import (
        CheckpointError,
        checkpoint_files,
        load_trainable,
        read_checkpoint_config,
    )
    from iqray.model.config import load_preset
    from iqray.model.registry import (
        UnknownModel,
        looks_like_a_name,
        resolve_name,
        unknown_model,
    )

    resolved = resolve_name(str(name_or_path))
    if resolved.kind == "preset":
        model = build(with_mode(load_preset(resolved.location), mode), cache_dir=cache_dir,
                      allow_download=allow_download)
    else:
        if not resolved.shipped and looks_like_a_name(resolved.location):
            raise UnknownModel(unknown_model(resolved.location))
        path = Path(resolved.location).expanduser()
        config_path, weights_path = checkpoint_files(path)
        config, raw = read_checkpoint_config(config_path)
        if config.trained and weights_path is None:
            raise CheckpointError(f"{config_path} says the heads are trained but there is no "
                                  "model.safetensors beside it")
        model = build(with_mode(config, mode), cache_dir=cache_dir,
                      base_dir=config_path.parent, allow_download=allow_download)
        if weights_path is not None:
            load_trainable(model, weights_path, raw.get("trainable_parameters"))
    if hasattr(model, "prompt_cache_size"):  # models that cache prompt features
        model.prompt_cache_size = prompt_cache_size
    return model.to(resolve_device(device)).eval()
