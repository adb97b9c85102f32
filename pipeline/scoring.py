"""Model stage: weights staged once through the object store, a callable class per actor.

The driver reads the checkpoint and tower weight files once and puts their bytes in Ray's
object store; every actor materialises them in a local temp dir and loads from there, so a
pool of hundreds of actors makes no hub or bucket requests of its own.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import iqray.model
from iqray.model.checkpoint import CONFIG_NAME, FORMAT, FORMAT_VERSION, WEIGHTS_NAME
from iqray.model.config import ModelConfig, load_preset, parse_model_config
from iqray.model.registry import resolve_name, unknown_model
from iqray.model.weights import looks_like_path, resolve_tower_weights
from iqray.pipeline import rows as R
from iqray.pipeline.decode import (
    crop_transform,
    decode_jpegs,
    is_missing,
    node_id,
    restore_nulls,
    row_label,
)
from iqray.pipeline.io.storage import StorageConfig


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
        if not fs.exists(config_path):
            raise FileNotFoundError(unknown_model(name))
        raw = json.loads(fs.cat_file(config_path))
        config = parse_model_config(raw.get("model", raw))
        weights_path = config_path.rsplit("/", 1)[0] + "/" + WEIGHTS_NAME
        if fs.exists(weights_path):
            files[WEIGHTS_NAME] = fs.cat_file(weights_path)
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
            files[staged_name] = fs.cat_file(remote_dir + "/" + tower.pretrained)
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


def check_precision(spec: ModelSpec, shards: list, read, storage: StorageConfig,
                    precision: str, rows: int = 32) -> dict[str, Any]:
    """Gate a fast path on the user's own data: score the first ``rows`` readable images
    with fp32 and with ``precision`` on the driver; refuse the run when the ranking moves
    (Spearman below MIN_SPEARMAN on any output)."""
    from iqray.model.fastpath import MIN_SPEARMAN, apply_precision, fidelity_report
    from iqray.pipeline.decode import iter_crops

    reference = spec.load("cpu")
    readable = ((crop, _prompt(prompt)) for shard in shards
                for _, _, prompt, _, crop in iter_crops(shard, read, storage,
                                                        reference.transform)
                if crop is not None)
    chosen = list(itertools.islice(readable, rows))
    pixels = [crop for crop, _ in chosen]
    prompts = [prompt for _, prompt in chosen]
    if len(pixels) < 3:
        raise ValueError(f"--precision {precision}: fewer than 3 readable images to check "
                         "its scores against fp32")
    batch = torch.stack(pixels)
    fast = apply_precision(spec.load("cpu"), precision)
    report = fidelity_report(reference.score(batch, prompts), fast.score(batch, prompts),
                             reference.output_names)
    report["images"] = len(pixels)
    if not report["passes"]:
        worst = ", ".join(f"{k} {v['spearman']:.4f}" for k, v in report.items()
                          if isinstance(v, dict))
        raise ValueError(f"--precision {precision} changes this model's ranking of the first "
                         f"{len(pixels)} images (Spearman against fp32: {worst}; needs >= "
                         f"{MIN_SPEARMAN}); score with fp32")
    return report


def split_on_oom(score: Callable[[torch.Tensor, list], dict[str, np.ndarray]],
                 pixels: torch.Tensor, prompts: list) -> dict[str, np.ndarray]:
    """Run ``score``; on CUDA out-of-memory, halve the batch and retry each half."""
    try:
        return score(pixels, prompts)
    except torch.cuda.OutOfMemoryError:
        if len(prompts) <= 1:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(prompts) // 2
        first = split_on_oom(score, pixels[:half], prompts[:half])
        second = split_on_oom(score, pixels[half:], prompts[half:])
        return {k: np.concatenate([first[k], second[k]]) for k in first}


# Columns restore_nulls leaves alone: numbers whose NaN means NaN, not an all-None column.
SCORE_NUMBERS = {"quality", "alignment", R.READ_S, R.DECODE_S, R.MODEL_S, R.COARSE, R.FINE,
                 R.EMBED_ERROR, R.DECODE_NODE, R.MODEL_NODE}


class ModelStage:
    """Ray Data callable class: one model per actor, loaded once in ``__init__``.

    Subclasses turn the decoded rows that have no error into model outputs; this base class
    owns loading, the status/error columns and per-row timing."""

    def __init__(self, spec: ModelSpec, device: str = "auto", threads: int | None = None,
                 prompt_cache_size: int = 4096, precision: str = "fp32",
                 compile: bool = False, prompt_column: str | None = R.PROMPT,
                 public: bool = False):
        # public: the last stage of a user's pipeline (score_dataset): private columns are
        # dropped and the output is an Arrow table with the contract's types.
        self.prompt_column = prompt_column
        self.public = public
        if threads:
            torch.set_num_threads(threads)
        if device == "auto" and not torch.cuda.is_available():
            import sys

            print("iqray: this actor holds a GPU reservation but its process sees no CUDA "
                  "device; scoring on CPU (use --device cuda to fail instead)", file=sys.stderr)
        from iqray.model.fastpath import apply_precision, compile_towers

        self.model = apply_precision(spec.load(device, prompt_cache_size), precision)
        if compile:
            compile_towers(self.model)  # compiles on the first batch
        self.pin = self.model.device.type == "cuda"
        self.crops = crop_transform(spec.config.image_size, spec.config.fine_resize)
        self.on_device: dict[int, torch.Tensor] = {}
        self.node = node_id()

    def pixels(self, batch: dict[str, np.ndarray], index: np.ndarray) -> torch.Tensor:
        pixels = torch.from_numpy(np.ascontiguousarray(batch[R.PIXELS][index]))
        if self.pin:
            pixels = pixels.pin_memory()
        if not self.on_device:
            return pixels
        # rows the actor decoded itself are already on the device; the rest move there
        pixels = pixels.to(self.model.device, non_blocking=True)
        for row, i in enumerate(index):
            if i in self.on_device:
                pixels[row] = self.on_device[i]
        return pixels

    def decode_on_device(self, batch: dict[str, np.ndarray]) -> None:
        """Decode the JPEG rows the decode tasks left encoded (``--decode device``), on the
        model's device: one batched ``decode_jpeg`` call (nvJPEG on a GPU), then the same
        crops as the CPU path. A batch that fails is retried row by row, so one corrupt
        file becomes one error row."""
        self.on_device = {}
        encoded = batch.pop(R.ENCODED, None)
        if encoded is None:
            return
        rows = [i for i, data in enumerate(encoded) if isinstance(data, bytes)]
        if not rows:
            return
        device = self.model.device

        def decode(items):
            return decode_jpegs([encoded[i] for i in items], device)

        batch[R.ERROR] = np.array(batch[R.ERROR], dtype=object)  # writable copies
        batch[R.ERROR_KIND] = np.array(batch[R.ERROR_KIND], dtype=object)
        try:
            decoded = dict(zip(rows, decode(rows), strict=True))
        except RuntimeError:
            decoded = {}
            for i in rows:
                try:
                    decoded[i] = decode([i])[0]
                except RuntimeError as exc:
                    batch[R.ERROR][i] = f"{row_label(batch, i)}: cannot decode JPEG: {exc}"
                    batch[R.ERROR_KIND][i] = "decode"
        for i, image in decoded.items():
            self.on_device[i] = self.crops.crop_tensor(image)

    def process(self, batch: dict[str, np.ndarray], ok: np.ndarray) -> None:
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        count = len(batch[R.PIXELS])
        self.decode_on_device(batch)
        ok = np.array([is_missing(e) for e in batch[R.ERROR]], dtype=bool)
        self.process(batch, ok)
        self.on_device = {}
        del batch[R.PIXELS]
        batch[R.STATUS] = np.where(ok, R.STATUS_OK, R.STATUS_ERROR).astype(object)
        batch[R.PUBLIC_ERROR] = _strings(batch.pop(R.ERROR))
        batch[R.PUBLIC_ERROR_KIND] = _strings(batch.pop(R.ERROR_KIND))
        batch[R.MODEL_S] = np.full(count, (time.perf_counter() - started) / max(count, 1))
        batch[R.MODEL_NODE] = np.full(count, self.node, dtype=object)
        restore_nulls(batch, skip=SCORE_NUMBERS | set(getattr(self.model, "output_names", ())))
        return self.public_table(batch) if self.public else batch

    def public_table(self, batch: dict[str, np.ndarray]):
        """The user's columns as Ray Data would convert them, then iqray's with fixed types
        (a column that is all None in one block is still a string column)."""
        import pyarrow as pa
        from ray.data.block import BlockAccessor

        for name in R.PRIVATE:
            batch.pop(name, None)
        typed = {name: pa.float32() for name in getattr(self.model, "output_names", ())}
        typed.update({R.IMAGE_SHA256: pa.string(), R.STATUS: pa.string(),
                      R.PUBLIC_ERROR: pa.string(), R.PUBLIC_ERROR_KIND: pa.string(),
                      R.PROMPT_TRUNCATED: pa.bool_()})
        theirs = {k: v for k, v in batch.items() if k not in typed}
        count = len(batch[R.STATUS])
        table = (BlockAccessor.batch_to_block(theirs) if theirs
                 else pa.table({"__rows": pa.nulls(count)}).drop_columns(["__rows"]))
        for name, kind in typed.items():
            if name in batch:
                values = batch[name]
                table = table.append_column(name, pa.array(
                    values.tolist() if values.dtype == object else values, kind))
        return table


class Scorer(ModelStage):
    """The model's outputs (``model.output_names``) for every decodable row."""

    def _score(self, pixels: torch.Tensor, prompts: list) -> dict[str, np.ndarray]:
        return self.model.score(pixels, prompts, batch_size=max(len(prompts), 1))

    def process(self, batch: dict[str, np.ndarray], ok: np.ndarray) -> None:
        count = len(ok)
        outputs = {name: np.full(count, np.nan, np.float32) for name in self.model.output_names}
        truncated = np.zeros(count, bool)
        index = np.flatnonzero(ok)
        if index.size:
            column = batch.get(self.prompt_column) if self.prompt_column else None
            prompts = [_prompt(column[i]) if column is not None else None for i in index]
            scores = split_on_oom(self._score, self.pixels(batch, index), prompts)
            for name, values in outputs.items():
                values[index] = scores[name]
            if "prompt_truncated" in scores:
                truncated[index] = scores["prompt_truncated"]
        batch.update(outputs)
        if self.model.config.prompt_aware:
            batch["prompt_truncated"] = truncated


def _strings(values: np.ndarray) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = [None if is_missing(v) else str(v) for v in values]
    return out


def _prompt(value: Any) -> str | None:
    return value if isinstance(value, str) else None
