"""Checkpoints: trainable parameters as safetensors + a JSON config. Never pickles.

A checkpoint directory holds::

    config.json         format marker, model config (towers, heads, MOS scales), parameter
                        shapes, metrics, data hash, iqray version, time
    model.safetensors   the trainable parameters only (fusion + heads, < 3M values)

The frozen towers are not copied: the config names where their weights come from
(open_clip tag, local file relative to the checkpoint dir, or a random-init seed).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from iqray.model.config import ModelConfig, parse_model_config
from iqray.model.files import CONFIG_NAME, FORMAT, FORMAT_VERSION, WEIGHTS_NAME
from iqray.model.version import iqray_version
from iqray.model.weights import refuse_pickle


class CheckpointError(ValueError):
    """A checkpoint is malformed or does not match the model its config describes."""


def save_checkpoint(model, directory: str | os.PathLike, *, metrics: dict | None = None,
                    data_hash: str | None = None, extra: dict | None = None,
                    include_towers: bool = False, weights_dtype: str = "float32") -> Path:
    """Write ``model``'s trainable parameters and config to ``directory`` (created).

    ``include_towers`` also writes the towers' weights (``towers/coarse.safetensors``: image
    + text; ``towers/fine.safetensors``: image side only) and points the config at them: for
    towers trained here, which no pretrained tag can name. ``weights_dtype="float16"`` halves
    the files (floating tensors only; loading casts back to the model's dtype).
    """
    from iqray.model.metrics import json_ready

    if weights_dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"weights_dtype must be float32, float16 or bfloat16, "
                         f"got {weights_dtype!r}")
    store_dtype = getattr(torch, weights_dtype)

    def stored(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach().cpu()
        return (tensor.to(store_dtype) if tensor.is_floating_point() else tensor).contiguous()

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_config = model.config
    if include_towers:
        updates = {}
        for role, module, prefix in (("coarse", model.coarse, ""),
                                     ("fine", model.fine_visual, "visual.")):
            relative = f"towers/{role}.safetensors"
            state = {prefix + k: stored(v) for k, v in module.state_dict().items()}
            (directory / "towers").mkdir(exist_ok=True)
            tmp = directory / "towers" / f".{role}.tmp"
            save_file(state, str(tmp), metadata={"format": "pt", "producer": "iqray"})
            os.replace(tmp, directory / relative)
            updates[role] = getattr(model_config, role).model_copy(update={"pretrained": relative})
        model_config = model_config.model_copy(update=updates)
    tensors = {k: stored(v) for k, v in model.trainable_state_dict().items()}
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "iqray_version": iqray_version(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model_config.model_dump(mode="json"),
        "trainable_parameters": {k: list(v.shape) for k, v in tensors.items()},
        "metrics": json_ready(metrics or {}),  # strict JSON: undefined metrics are null
        "data_hash": data_hash,
        **(extra or {}),
    }
    # Write both files before either is visible under its final name.
    weights_tmp = directory / f".{WEIGHTS_NAME}.tmp"
    config_tmp = directory / f".{CONFIG_NAME}.tmp"
    save_file(tensors, str(weights_tmp), metadata={"format": "pt", "producer": "iqray"})
    config_tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(weights_tmp, directory / WEIGHTS_NAME)
    os.replace(config_tmp, directory / CONFIG_NAME)
    return directory


def checkpoint_files(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(config.json, model.safetensors or None) for a checkpoint dir, weights file or config."""
    path = Path(path).expanduser()
    refuse_pickle(path)
    if path.is_dir():
        config, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
        if not config.is_file():
            raise CheckpointError(f"{path}: no {CONFIG_NAME} in checkpoint directory")
        pickles = [p.name for p in path.iterdir() if p.suffix.lower() in (".pt", ".pth", ".bin",
                                                                           ".ckpt", ".pkl")]
        if not weights.is_file():
            hint = f" (found pickled files {pickles}, which are refused)" if pickles else ""
            raise CheckpointError(f"{path}: no {WEIGHTS_NAME} in checkpoint directory{hint}")
        return config, weights
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    if path.suffix == ".safetensors":
        config = path.with_name(CONFIG_NAME)
        if not config.is_file():
            raise CheckpointError(f"{path}: needs its {CONFIG_NAME} beside it")
        return config, path
    if path.suffix == ".json":
        weights = path.with_name(WEIGHTS_NAME)
        return path, weights if weights.is_file() else None
    raise CheckpointError(f"{path}: not a checkpoint (expected a directory, .safetensors or "
                          f"{CONFIG_NAME})")


def read_checkpoint_config(config_path: Path) -> tuple[ModelConfig, dict[str, Any]]:
    try:
        raw = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    if "format" in raw:
        if raw["format"] != FORMAT:
            raise CheckpointError(f"{config_path}: format {raw['format']!r}, expected {FORMAT!r}")
        if raw.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{config_path}: format version {raw['format_version']} is "
                                  f"newer than this iqray reads ({FORMAT_VERSION}); upgrade iqray")
        model_raw = raw.get("model")
    else:
        model_raw = raw  # a bare model config (no trained weights)
    if not isinstance(model_raw, dict):
        raise CheckpointError(f"{config_path}: no model config (expected a JSON object under "
                              "'model')")
    try:
        return parse_model_config(model_raw), raw
    except ValidationError as exc:
        raise CheckpointError(f"{config_path}: model config is invalid:\n{exc}") from exc


def load_trainable(model, weights_path: Path, declared: dict[str, list[int]] | None) -> None:
    """Load safetensors into ``model``'s trainable parameters, refusing any mismatch."""
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{weights_path}: not a readable safetensors file ({exc}); pickled weights are "
            "refused"
        ) from exc
    expected = model.trainable_state_dict()
    problems = []
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"missing parameters: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected parameters: {', '.join(unexpected)}")
    for name in sorted(set(expected) & set(tensors)):
        if tuple(tensors[name].shape) != tuple(expected[name].shape):
            problems.append(f"{name}: checkpoint shape {tuple(tensors[name].shape)}, model "
                            f"shape {tuple(expected[name].shape)}")
        elif declared is not None and list(tensors[name].shape) != declared.get(name):
            problems.append(f"{name}: config declares shape {declared.get(name)}, weights "
                            f"file has {list(tensors[name].shape)}")
    if problems:
        raise CheckpointError(f"{weights_path} does not match the model its config describes: "
                              + "; ".join(problems))
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in tensors.items():
            params[name].copy_(value)
