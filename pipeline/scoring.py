"""Model stage: a :class:`~iqray.pipeline.stages.Stage` per actor (or in the driver, run in
process), built from the weights the driver staged once (:mod:`iqray.pipeline.staging`):
scores (``Scorer``) or embeddings (``Embedder``)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from iqray.pipeline import rows as R
from iqray.pipeline.decode import (
    crop_transform,
    decode_jpegs,
    node_id,
    row_label,
)
from iqray.pipeline.io.storage import StorageConfig
from iqray.pipeline.stages import Stage
from iqray.pipeline.staging import ModelSpec


def check_precision(spec: ModelSpec, shards: list, read, storage: StorageConfig,
                    precision: str, rows: int = 32) -> dict[str, Any]:
    """Gate a fast path on the user's own data: score the first ``rows`` readable images
    with fp32 and with ``precision`` on the driver; refuse the run when the ranking moves
    (Spearman below MIN_SPEARMAN on any output)."""
    from iqray.model.fastpath import apply_precision, fidelity_report

    reference = spec.load("cpu")
    chosen = list(itertools.islice(_readable(shards, read, storage, reference.transform),
                                   rows))
    pixels = [crop for _, _, crop in chosen]
    prompts = [prompt for _, prompt, _ in chosen]
    if len(pixels) < 3:
        raise ValueError(f"--precision {precision}: fewer than 3 readable images to check "
                         "its scores against fp32")
    batch = torch.stack(pixels)
    fast = apply_precision(spec.load("cpu"), precision)
    report = fidelity_report(reference.score(batch, prompts), fast.score(batch, prompts),
                             reference.output_names)
    report["images"] = len(pixels)
    return refuse_if_ranking_moved(report, f"--precision {precision}", "fp32",
                                   "score with fp32")


def check_decode(spec: ModelSpec, shards: list, read, storage: StorageConfig,
                 rows: int = 32) -> dict[str, Any]:
    """Gate ``--decode fast`` on the user's own data: score the first ``rows`` readable images
    decoded in full and at reduced DCT scale; refuse the run when the ranking moves. The
    report says how many of them were large enough to be decoded at reduced scale."""
    from iqray.model.fastpath import fidelity_report
    from iqray.model.images import CropViews, ImageDecodeError, decodes_reduced, open_image

    if spec.config.full_reference:
        raise ValueError("--decode fast is not offered for full-reference models yet")
    model = spec.load("cpu")
    views = CropViews(spec.config.image_size, spec.config.fine_resize)
    least = max(views.resizes)

    def with_fast_crops(readable):
        for image, prompt, crop in readable:
            try:
                fast = torch.from_numpy(views(open_image(image, min_short_side=least)))
            except ImageDecodeError:
                continue
            yield image, prompt, crop, fast

    chosen = list(itertools.islice(with_fast_crops(
        _readable(shards, read, storage, model.transform)), rows))
    full = [crop for _, _, crop, _ in chosen]
    fast = [crop for _, _, _, crop in chosen]
    prompts = [prompt for _, prompt, _, _ in chosen]
    reduced = sum(decodes_reduced(image, least) for image, _, _, _ in chosen)
    if len(full) < 3:
        raise ValueError("--decode fast: fewer than 3 readable images to check its scores "
                         "against full decode")
    report = fidelity_report(model.score(torch.stack(full), prompts),
                             model.score(torch.stack(fast), prompts), model.output_names)
    report.update(images=len(full), reduced=int(reduced))
    return refuse_if_ranking_moved(report, "--decode fast", "full decode", "use --decode cpu")


def _readable(shards: list, read, storage: StorageConfig, transform):
    """(encoded bytes, prompt, uint8 crop) of the shards' readable images, in order, decoded
    on the driver: what the fast-path gates score both ways."""
    from iqray.pipeline.decode import iter_crops

    for shard in shards:
        for _, image, prompt, _, crop in iter_crops(shard, read, storage, transform):
            if crop is not None:
                yield image, _prompt(prompt), crop


def refuse_if_ranking_moved(report: dict[str, Any], path: str, against: str, instead: str
                            ) -> dict[str, Any]:
    """``report`` (a fast path's fidelity on the first images) when it passes; else the
    ValueError that refuses the run in one line."""
    from iqray.model.fastpath import MIN_SPEARMAN

    if not report["passes"]:
        worst = ", ".join(f"{k} {v['spearman']:.4f}" for k, v in report.items()
                          if isinstance(v, dict))
        raise ValueError(f"{path} changes this model's ranking of the first "
                         f"{report['images']} images (Spearman against {against}: {worst}; "
                         f"needs >= {MIN_SPEARMAN}); {instead}")
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


class ModelStage(Stage):
    """The model stage (an actor pool on Ray, in process otherwise): one model per process,
    loaded once in :meth:`setup` from the weights the driver staged.

    Subclasses turn the decoded rows that have no error into model outputs
    (:meth:`add_outputs`); this base class owns loading, device decode, the status/error
    columns and per-row timing."""

    contract = "model"

    def __init__(self, spec: ModelSpec, device: str = "auto", threads: int | None = None,
                 prompt_cache_size: int = 4096, precision: str = "fp32",
                 compile: bool = False, prompt_column: str | None = R.PROMPT,
                 public: bool = False, commit_to: list | None = None):
        # public: the last stage of a user's pipeline (score_dataset): private columns are
        # dropped and the output is an Arrow table with the contract's types.
        # commit_to: --commit actors; rows go to these commit actors, tally rows to Ray Data.
        self.spec, self.device, self.threads = spec, device, threads
        self.prompt_cache_size, self.precision, self.compile = (prompt_cache_size, precision,
                                                                compile)
        self.prompt_column, self.public, self.commit_to = prompt_column, public, commit_to
        self.from_dataset = public

    def setup(self) -> None:
        from iqray.model.fastpath import apply_precision, compile_towers
        from iqray.pipeline.commit import CommitRouter

        self.router = CommitRouter(self.commit_to) if self.commit_to else None
        if self.threads:
            torch.set_num_threads(self.threads)
        if self.device == "auto" and not torch.cuda.is_available():
            import sys

            print("iqray: this actor holds a GPU reservation but its process sees no CUDA "
                  "device; scoring on CPU (use --device cuda to fail instead)", file=sys.stderr)
        self.model = apply_precision(self.spec.load(self.device, self.prompt_cache_size),
                                     self.precision)
        if self.compile:
            compile_towers(self.model)  # compiles on the first batch
        self.pin = self.model.device.type == "cuda"
        self.crops = crop_transform(self.spec.config.image_size, self.spec.config.fine_resize)
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

    def add_outputs(self, batch: dict[str, np.ndarray], ok: np.ndarray) -> None:
        raise NotImplementedError

    def process(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return self._call(batch)
        except Exception as exc:  # nothing here is about bad data: a bug stops the run
            from iqray.pipeline.decode import batch_where
            from iqray.pipeline.failures import StageBug

            raise StageBug.of("model", batch_where(batch), exc) from exc

    def _call(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        count = len(batch[R.PIXELS])
        self.decode_on_device(batch)
        ok = np.array([e is None for e in batch[R.ERROR]], dtype=bool)
        self.add_outputs(batch, ok)
        self.on_device = {}
        del batch[R.PIXELS]
        batch[R.STATUS] = np.where(ok, R.STATUS_OK, R.STATUS_ERROR).astype(object)
        batch[R.PUBLIC_ERROR] = _strings(batch.pop(R.ERROR))
        batch[R.PUBLIC_ERROR_KIND] = _strings(batch.pop(R.ERROR_KIND))
        batch[R.MODEL_S] = np.full(count, (time.perf_counter() - started) / max(count, 1))
        batch[R.MODEL_NODE] = np.full(count, self.node, dtype=object)
        return batch

    def emit(self, batch: dict[str, np.ndarray]):
        if self.router is not None:
            return self.router.route(batch)
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

    name = "Scorer"

    def output_names(self) -> tuple[str, ...]:
        return tuple(self.spec.config.output_names)

    def _score(self, pixels: torch.Tensor, prompts: list) -> dict[str, np.ndarray]:
        return self.model.score(pixels, prompts, batch_size=max(len(prompts), 1))

    def add_outputs(self, batch: dict[str, np.ndarray], ok: np.ndarray) -> None:
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
    out[:] = [None if v is None else str(v) for v in values]
    return out


def _prompt(value: Any) -> str | None:
    return value if isinstance(value, str) else None
