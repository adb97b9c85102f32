"""Model staging: the driver reads a model's checkpoint and tower weight files once and puts
their bytes in Ray's object store; every actor materialises them in a local temp dir and
loads from there, so a pool of hundreds of actors makes no hub or bucket requests of its own.

Imports no torch: resolving and staging a model (and failing on a mistyped name) takes no
more than reading its files, before Ray starts.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import iqray.model
from iqray.model.config import ModelConfig, load_preset, parse_model_config
from iqray.model.files import CONFIG_NAME, FORMAT, FORMAT_VERSION, WEIGHTS_NAME
from iqray.model.registry import resolve_name, unknown_model
from iqray.model.weights import looks_like_path, resolve_tower_weights
from iqray.pipeline.io.storage import StorageConfig, to_url


@dataclass
class ModelSpec:
    """Everything an actor needs to build the model, with no file access of its own."""

    name: str  # what the user asked for (preset name or checkpoint URL)
    config: ModelConfig
    identity: str  # sha256 over config + weights: names the exact scorer in output metadata
    checkpoint_sha256: str | None = None  # of the trained heads' model.safetensors
    tower_identity: str = ""  # sha256 over tower configs + weights + input size: what the
    # frozen encoders compute, and so what an embedding cache may be shared across
    towers: dict[str, Any] = field(default_factory=dict)  # readable names/tags
    files: dict[str, Any] = field(default_factory=dict)  # relative name -> bytes or ObjectRef
    raw_config: dict[str, Any] = field(default_factory=dict)

    def materialise(self, directory: Path) -> Path:
        import ray

        for name, payload in self.files.items():
            data = ray.get(payload) if isinstance(payload, ray.ObjectRef) else payload
            target = directory / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        config_path = directory / CONFIG_NAME
        config_path.write_text(json.dumps(self.raw_config))
        return config_path

    def put_files(self, put: Callable[[bytes], Any]) -> None:
        """Move the staged file bytes into Ray's object store (``ray.put``): the model is
        resolved before Ray starts, and the refs are made once it has."""
        self.files = {name: put(data) if isinstance(data, bytes) else data
                      for name, data in self.files.items()}

    def load(self, device: str = "cpu", prompt_cache_size: int = 4096):
        """The model, built from the staged files (read into memory; the temp dir goes)."""
        with tempfile.TemporaryDirectory(prefix="iqray-model-") as folder:
            return iqray.model.load(self.materialise(Path(folder)), device=device,
                                    prompt_cache_size=prompt_cache_size, allow_download=False)


def stage_model(name: str, storage: StorageConfig, put: Callable[[bytes], Any] | None = None,
                cache_dir: str | None = None, mode: str | None = None) -> ModelSpec:
    """Read a model's config and weight files once (driver side) into a :class:`ModelSpec`.

    ``put`` (``ray.put``) turns file bytes into object refs; without it bytes travel inline.
    ``mode`` picks BPCLIP's nr/fr mode (see :func:`iqray.model.with_mode`).
    """
    put = put or (lambda data: data)
    files: dict[str, bytes] = {}
    resolved = resolve_name(name)
    if resolved.kind == "preset":
        config = load_preset(name)
        raw: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION}
        base_dir = remote_dir = None
    else:
        location = resolved.location  # shipped models live in the package
        fs, path = storage.filesystem(location)
        config_path = path if path.endswith(".json") else path.rstrip("/") + "/" + CONFIG_NAME
        # Every read retries transport errors like the pipeline's own storage calls do.
        def read(path: str, what: str, action=fs.cat_file):
            return storage.retry(lambda: action(path), what, to_url(fs, path, location))

        if not read(config_path, "look up model config", fs.exists):
            raise FileNotFoundError(unknown_model(name))
        raw = json.loads(read(config_path, "read model config"))
        config = parse_model_config(raw.get("model", raw))
        if "format" not in raw:  # a bare model config: staged as a checkpoint of one
            raw = {"format": FORMAT, "format_version": FORMAT_VERSION}
        weights_path = config_path.rsplit("/", 1)[0] + "/" + WEIGHTS_NAME
        if read(weights_path, "look up model weights", fs.exists):
            files[WEIGHTS_NAME] = read(weights_path, "read model weights")
        base_dir = config_path.rsplit("/", 1)[0] if "://" not in location else None
        remote_dir = config_path.rsplit("/", 1)[0] if "://" in location else None
    config = iqray.model.with_mode(config, mode)
    towers = {}
    original_pretrained = {}
    for role in config.tower_roles:
        tower = getattr(config, role)
        original_pretrained[role] = tower.pretrained
        staged_name = f"towers/{role}.safetensors"
        if base_dir is None and remote_dir and tower.pretrained and looks_like_path(
                tower.pretrained) and not tower.pretrained.startswith(("/", "~")):
            # Towers shipped inside a checkpoint on object storage: fetch them beside it.
            files[staged_name] = read(remote_dir + "/" + tower.pretrained, "read tower weights")
            tower = tower.model_copy(update={"pretrained": staged_name})
        else:
            path = resolve_tower_weights(tower, cache_dir=cache_dir, base_dir=base_dir)
            if path is not None:
                files[staged_name] = path.read_bytes()
                tower = tower.model_copy(update={"pretrained": staged_name})
        towers[role] = tower
    config = config.model_copy(update=towers)
    raw = {**raw, "model": config.model_dump(mode="json")}

    tower_digest = hashlib.sha256()
    tower_names: dict[str, Any] = {"image_size": config.image_size}
    if config.fine_resize is not None:  # absent otherwise: existing caches keep their identity
        tower_names["fine_resize"] = config.fine_resize
    for role in config.tower_roles:
        staged_name = f"towers/{role}.safetensors"
        described: dict[str, Any] = {"model_name": towers[role].model_name,
                                     "pretrained": original_pretrained[role]}
        if staged_name in files:
            described["weights_sha256"] = hashlib.sha256(files[staged_name]).hexdigest()
        else:
            described["init_seed"] = towers[role].init_seed
        tower_names[role] = described
    # Identity is what the towers compute: architecture + weights (or seed) + input size;
    # where the weights were found (a tag, a path) does not change it.
    identity = {role: {k: v for k, v in d.items() if k != "pretrained"} if isinstance(d, dict)
                else d for role, d in tower_names.items()}
    tower_digest.update(json.dumps(identity, sort_keys=True).encode())
    digest = hashlib.sha256(json.dumps(raw["model"], sort_keys=True).encode())
    for file_name in sorted(files):
        digest.update(file_name.encode())
        digest.update(hashlib.sha256(files[file_name]).digest())
    checkpoint_sha256 = (hashlib.sha256(files[WEIGHTS_NAME]).hexdigest()
                         if WEIGHTS_NAME in files else None)
    return ModelSpec(name=name, config=config, identity=digest.hexdigest(),
                     checkpoint_sha256=checkpoint_sha256,
                     tower_identity=tower_digest.hexdigest(), towers=tower_names,
                     files={k: put(v) for k, v in files.items()}, raw_config=raw)
