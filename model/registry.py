"""The architecture registry: each model architecture declares what it supports and how it
trains, and the jobs ask here instead of testing names; model names resolve here, once.

A new architecture is one entry in :data:`ARCHITECTURES` (its config class, its model
class, what its outputs mean, its capabilities), or, outside this package, one call to
:func:`register` in a module named by the ``IQRAY_ARCHITECTURES`` environment variable
(comma-separated module names, imported on first lookup in every process, Ray workers
included): `iqray score`, `embed`, `train`, `eval`, `info` and the dataset jobs follow.
Imports neither torch nor Ray (classes are named as ``"module:Class"``, imported on first use).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Training = Literal["heads-on-cached-embeddings", "heads-on-level-features"]
PLUGINS_ENV = "IQRAY_ARCHITECTURES"  # modules that register() further architectures


@dataclass(frozen=True)
class Architecture:
    name: str  # the config's ``architecture`` field
    paper: str
    config_class: str  # "package.module:Class"
    model_class: str
    score_range: str  # "package.module:function", config -> {output: ScoreSpec}
    heads: tuple[str, ...]  # what it learns from human ratings, in order
    training: Training | None  # how `iqray train` fits it with the towers frozen (None: no)
    embedding_cache: bool  # `iqray embed`, `score --cache`, train/eval from the cache
    full_reference: bool  # has a full-reference mode (--mode fr)
    finetune: bool  # `iqray train --towers finetune` (towers trained end to end)
    int8: bool  # `--precision int8` (dynamic quantisation of the image towers)
    compile: bool  # `--compile` (torch.compile of the image towers)
    zero_shot: bool = True  # scores before `iqray train` has fitted anything

    def check_can_score(self, config) -> None:
        """ValueError in one line for an untrained model of an architecture that has no
        zero-shot scores (its untrained head would only produce noise)."""
        if not config.trained and not self.zero_shot:
            raise ValueError(f"{self.name} has no zero-shot scores: give a trained checkpoint "
                             "(`iqray train`, or published weights converted as the README "
                             "shows), not the untrained preset")

    def config_type(self) -> type:
        return resolve_function(self.config_class)

    def model_type(self) -> type:
        return resolve_function(self.model_class)

    def score_specs(self, config) -> dict[str, Any]:
        """{output: ScoreSpec} for a model with this config (the function ``score_range``
        names)."""
        return resolve_function(self.score_range)(config)

    def outputs(self, config) -> dict[str, dict[str, Any]]:
        """What each output of a model with this config means (range, direction, how it is
        made), as plain data: recorded in every output footer, shown by `iqray report`."""
        import dataclasses

        specs = self.score_specs(config)
        return {name: dataclasses.asdict(spec) for name, spec in specs.items()}

    def require(self, capability: str, what: str) -> None:
        """ValueError in one line when this architecture lacks ``capability``."""
        if not getattr(self, capability):
            able = [a.name for a in architectures().values() if getattr(a, capability)]
            raise ValueError(f"{what} is not offered by {self.name} models (only "
                             f"{', '.join(able) or 'none'})")


def resolve_function(path: str) -> Any:
    """The object a ``"package.module:name"`` path names (imported on first use)."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)



ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture(
        name="mst-clipiqa", paper="arXiv 2606.16799",
        config_class="iqray.model.config:MSTConfig",
        model_class="iqray.model.mst_clipiqa:MSTClipIQA",
        score_range="iqray.model.outputs:mst_clipiqa_outputs",
        heads=("quality", "alignment"), training="heads-on-cached-embeddings",
        embedding_cache=True, full_reference=False, finetune=True, int8=True, compile=True),
    Architecture(
        # BPCLIP reads its tower at four depths through forward hooks: compiled graphs skip
        # them, end-to-end tuning would move the levels the fusion was fitted on, and the
        # level features are kept in memory for training rather than cached.
        name="bpclip", paper="arXiv 2506.17969",
        config_class="iqray.model.config:BPCLIPConfig",
        model_class="iqray.model.bpclip:BPCLIP",
        score_range="iqray.model.outputs:bpclip_outputs",
        heads=("quality",), training="heads-on-level-features",
        embedding_cache=False, full_reference=True, finetune=False, int8=True, compile=False),
    Architecture(
        # The predictor labs filter training and generated images with (NeMo Curator's image
        # pipeline uses it). Its head has no zero-shot meaning: scores need its weights.
        name="laion-aesthetic",
        paper="LAION improved aesthetic predictor (github.com/christophschuhmann/"
              "improved-aesthetic-predictor)",
        config_class="iqray.model.config:LaionAestheticConfig",
        model_class="iqray.model.laion_aesthetic:LaionAesthetic",
        score_range="iqray.model.outputs:laion_aesthetic_outputs",
        heads=("aesthetic",), training="heads-on-cached-embeddings",
        embedding_cache=True, full_reference=False, finetune=False, int8=False, compile=False,
        zero_shot=False),
)}
DEFAULT_ARCHITECTURE = "mst-clipiqa"  # config files from before BPCLIP name none
_plugins_loaded: set[str] = set()


def register(entry: Architecture) -> Architecture:
    """Add an architecture (a plugin module calls this at import); the name must be new."""
    known = ARCHITECTURES.get(entry.name)
    if known is not None and known != entry:
        raise ValueError(f"architecture {entry.name!r} is already registered")
    ARCHITECTURES[entry.name] = entry
    return entry


def load_plugins() -> None:
    """Import the modules ``IQRAY_ARCHITECTURES`` names (once each, in this process)."""
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        if module not in _plugins_loaded:
            _plugins_loaded.add(module)
            importlib.import_module(module)


def architectures() -> dict[str, Architecture]:
    """Every known architecture, plugins included."""
    load_plugins()
    return ARCHITECTURES


def architecture(of: Any) -> Architecture:
    """The entry for an architecture name, a config (or its raw dict), or a model."""
    if isinstance(of, str):
        name = of
    elif isinstance(of, dict):
        name = of.get("architecture", DEFAULT_ARCHITECTURE)
    else:
        name = getattr(of, "config", of).architecture
    known = architectures()
    if name not in known:
        raise ValueError(f"unknown model architecture {name!r}; known: {', '.join(known)}")
    return known[name]


# -- names ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ResolvedName:
    kind: Literal["preset", "checkpoint"]
    location: str  # preset name, or the checkpoint's directory / config / URL
    shipped: bool = False


def resolve_name(name: str) -> ResolvedName:
    """What a ``--model`` value names: a shipped checkpoint (package data), a preset, or a
    checkpoint path/URL, in that order. Whether the checkpoint exists is the loader's check
    (it may be on object storage); :func:`unknown_model` words the error."""
    from iqray.model.config import preset_names, shipped_models

    shipped = shipped_models()
    if name in shipped:
        return ResolvedName("checkpoint", str(shipped[name]), shipped=True)
    if name in preset_names():
        return ResolvedName("preset", name)
    return ResolvedName("checkpoint", name)


def looks_like_a_name(name: str) -> bool:
    """A bare word (no folder, no suffix) that is not a file: a mistyped model name."""
    return "/" not in name and not Path(name).suffix and not Path(name).expanduser().exists()


class UnknownModel(KeyError, ValueError):
    """A model name that is no shipped model, preset or checkpoint: a usage mistake (a
    ValueError, so jobs answer it in one line), still a KeyError for lookups."""

    def __str__(self) -> str:  # KeyError would quote the whole sentence
        return str(self.args[0]) if self.args else ""


def unknown_model(name: str) -> str:
    from iqray.model.config import preset_names, shipped_models

    return (f"model {name!r} is neither a shipped model ({', '.join(shipped_models())}), a "
            f"preset ({', '.join(preset_names())}) nor a checkpoint with config.json")
