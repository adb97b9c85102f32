"""`iqray train`: embed (cached) -> fit the heads on train rows -> select on val rows.

Glue only: tables are read here, embeddings come from :mod:`iqray.pipeline.embed`, the
optimisation is :func:`iqray.model.training.fit_heads`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.compute as pc
import torch
from pydantic import Field, model_validator

from iqray.jobs.console import bars, log
from iqray.jobs.labelled import (
    Labelled,
    LabelledDataConfig,
    check_validation_ratings,
    embed_table,
    groups_for,
    head_data,
    image_rows,
    labelled_rows,
    normalised_targets,
)
from iqray.model.registry import architecture
from iqray.model.training import DISTORTION_CLASSES, TrainSettings
from iqray.pipeline.io.storage import StorageConfig
from iqray.pipeline.io.tables import read_table


class TrainConfig(LabelledDataConfig, TrainSettings):
    """`iqray train`: fit a model's trainable part on human ratings (MST-CLIPIQA: fusion and
    heads; BPCLIP: gated pooling, bottom-up blocks and quality layer, --model bpclip...)."""

    val: str | None = Field(default=None, description="validation table (else --split-column)")
    split_column: str | None = Field(
        default=None, description="column naming each row's split; only 'train' and 'val' "
        "rows are ever read")
    output: str = Field(default="runs/train", description="checkpoint directory to write")
    repeats: int = Field(default=1, gt=0, description="seeds to train; reports mean +- std")
    seed: int = Field(default=0, description="seed of the first repeat (repeat k uses seed + "
                      "k: towers from scratch, heads, batch order, flips)")
    towers: Literal["frozen", "finetune"] = Field(
        default="frozen", description="frozen: heads from cached embeddings; finetune: towers "
        "and heads end to end from images (small towers trained from scratch)")
    tower_lr: float = Field(default=3e-4, gt=0, description="learning rate of the towers")
    fine_crops: Literal["centre", "random"] = Field(
        default="centre", description="finetune, two-view models: train the fine tower on the "
        "centre crop (as scored) or on random crops of the fine area")
    weights_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        default="float32", description="dtype the checkpoint stores (float16 halves it)")
    quality_range: tuple[float, float] | None = Field(
        default=None, description="MOS scale of quality (default: min/max of train)")
    alignment_range: tuple[float, float] | None = Field(
        default=None, description="MOS scale of alignment (default: min/max of train)")

    def label_ranges(self, heads: tuple[str, ...]
                     ) -> dict[str, tuple[tuple[float, float] | None, str]]:
        """Each head's given MOS scale and the flag that gives it, by position (as
        :meth:`label_columns`): --quality-range for the first head, --alignment-range the
        second."""
        given = ((self.quality_range, "--quality-range"),
                 (self.alignment_range, "--alignment-range"))
        return dict(zip(heads, given, strict=False))

    @model_validator(mode="after")
    def _splits(self) -> TrainConfig:
        if (self.val is None) == (self.split_column is None):
            raise ValueError("give either --val (a separate validation table) or "
                             "--split-column (train/val rows in one table)")
        if self.pretrain_distortions and self.towers != "finetune":
            raise ValueError("--pretrain-distortions trains the image towers: it needs "
                             "--towers finetune")
        return self


def split_tables(config: TrainConfig, storage: StorageConfig, workdir: Path
                 ) -> dict[str, str]:
    """URLs of the train and val tables; with a split column, only those rows are copied
    out, so nothing downstream can ever read another split's images."""
    if config.split_column is None:
        return {"train": config.input, "val": config.val}
    table = read_table(config.input, storage)
    if config.split_column not in table.column_names:
        raise ValueError(f"{config.input}: no split column {config.split_column!r}")
    out = {}
    for split in ("train", "val"):
        rows = table.filter(pc.equal(table[config.split_column], split))
        if rows.num_rows == 0:
            raise ValueError(f"{config.input}: no rows with {config.split_column} == {split!r}")
        path = workdir / f"{split}.parquet"
        import pyarrow.parquet as pq

        pq.write_table(rows, path)
        out[split] = str(path)
    return out


def pixel_data(rows: Labelled, scales: dict[str, tuple[float, float]]):
    from iqray.model.training import ImageRows

    return ImageRows(rows.pixels, rows.prompts, normalised_targets(rows, scales),
                     fine_areas=rows.fine_areas)


def level_rows(model, rows: Labelled, scales: dict[str, tuple[float, float]],
               progress: bool, split: str):
    """BPCLIP: frozen level features of every row, computed once, and normalised targets."""
    from iqray.model.training import LevelRows, level_features

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(rows.shas), desc=f"features ({split})", unit="img",
                   dynamic_ncols=True)
    features = level_features(model, rows.pixels, on_batch=bar.update if bar else None)
    if bar is not None:
        bar.close()
    return LevelRows(features, normalised_targets(rows, scales))


def data_hash(heads: tuple[str, ...], *splits: Labelled) -> str:
    """What the model was trained on: every row's image and ratings, head by head."""
    digest = hashlib.sha256()
    for rows in splits:
        for i, sha in enumerate(rows.shas):
            ratings = ":".join(f"{rows.mos[head][i]:.6f}" for head in heads)
            digest.update(f"{sha}:{ratings}\n".encode())
    return digest.hexdigest()


def default_scale(values: np.ndarray, given: tuple[float, float] | None, head: str,
                  flag: str) -> tuple[float, float]:
    if given is not None:
        return float(given[0]), float(given[1])
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0  # no targets for this head: its scale is unused
    if np.ptp(finite) == 0:
        raise ValueError(f"all {head} MOS values are equal; set {flag}")
    return float(finite.min()), float(finite.max())


def run_train(config: TrainConfig, log=log) -> dict:
    import iqray.model
    from iqray.model.checkpoint import save_checkpoint
    from iqray.model.config import ScoreScale
    from iqray.model.metrics import json_ready, mean_std
    from iqray.model.training import (
        embed_rows,
        fit_bpclip,
        fit_end_to_end,
        fit_heads,
        reference_stats,
    )

    storage = config.storage_config()
    image_root = config.image_root or _default_root(config.input)
    model = iqray.model.load(config.model, device="cpu", allow_download=False, mode=config.mode)
    arch = architecture(model)
    if arch.training is None:
        raise ValueError(f"{arch.name} models have nothing `iqray train` fits")
    if config.towers == "finetune":
        arch.require("finetune", "--towers finetune")
    # Architectures whose frozen features are level taps keep them in memory (no cache).
    levels = arch.training == "heads-on-level-features"
    finetune = config.towers == "finetune"
    if model.config.full_reference and config.reference_column is None \
            and config.reference_template is None:
        raise ValueError("--mode fr trains on (image, reference) rows: give "
                         "--reference-column or --reference-template")
    settings = TrainSettings.model_validate(config.model_dump(
        include=set(TrainSettings.model_fields)))
    with tempfile.TemporaryDirectory(prefix="iqray-train-") as workdir:
        tables = split_tables(config, storage, Path(workdir))
        check_validation_ratings(config, tables["val"], arch.heads)
        if finetune or levels:
            random_crops = config.fine_crops == "random"
            splits = {split: image_rows(config, url, image_root, model,
                                        with_fine_areas=random_crops and split == "train")
                      for split, url in tables.items()}
        else:
            splits = {}
            for split, url in tables.items():
                cache = embed_table(config, url, image_root, log=lambda *a: None)
                splits[split] = labelled_rows(config, url, cache, arch.heads)
        for split, rows in splits.items():
            log(f"{split}: {len(rows.shas)} rows"
                + (f", {rows.dropped} dropped (unreadable)" if rows.dropped else ""))
        train_groups = (groups_for(config, tables["train"], splits["train"].rows)
                        if config.group_weight > 0 else None)
    scales = {head: default_scale(splits["train"].mos[head], given, head, flag)
              for head, (given, flag) in config.label_ranges(arch.heads).items()}
    # Each head's scale is its config's `<head>_scale` (MST-CLIPIQA: quality_scale, ...).
    model.config = model.config.model_copy(update={"trained": True, **{
        f"{head}_scale": ScoreScale(low=low, high=high) for head, (low, high) in scales.items()}})
    if levels:
        train, val = (level_rows(model, splits[s], scales, bars(config.progress), s)
                      for s in ("train", "val"))
    elif finetune:
        train, val = (pixel_data(splits[s], scales) for s in ("train", "val"))
    else:
        train = head_data(cache, splits["train"], scales)
        val = head_data(cache, splits["val"], scales)
        if model.config.prompt_aware:
            model.prime_prompt_cache(cache.load_prompts(
                {p for p in train.prompts + val.prompts if p}))
    if train_groups is not None:  # auxiliary labels come from the training rows only
        group_names = sorted(set(train_groups))
        train.groups = torch.as_tensor([group_names.index(n) for n in train_groups])
        log(f"auxiliary groups ({len(group_names)}): {', '.join(group_names)}")
    results = []
    for repeat in range(config.repeats):
        seed = config.seed + repeat
        # --pretrain-distortions implies --towers finetune (the config refuses anything else)
        bar = _EpochBar(config.epochs, f"seed {seed}", bars(config.progress), _mos_postfix,
                        start=not config.pretrain_distortions, log=log)
        if levels:
            result = fit_bpclip(model, train, val, settings, seed=seed,
                                on_epoch=bar.update_epoch)
        elif finetune:
            pretrain_bar = _EpochBar(config.pretrain_distortions,
                                     f"seed {seed} distortion pretraining", bars(config.progress),
                                     _pretrain_postfix, then=bar, log=log)
            result = fit_end_to_end(model, train, val, settings, seed=seed,
                                    tower_lr=config.tower_lr, on_epoch=bar.update_epoch,
                                    on_pretrain_epoch=pretrain_bar.update_epoch)
            pretrain_bar.close()
            if result.pretrain_history:
                last, count = result.pretrain_history[-1], len(result.pretrain_history)
                log(f"seed {seed}: distortion pretraining, {count} epoch"
                    f"{'' if count == 1 else 's'}, train accuracy coarse "
                    f"{last['accuracy_coarse']:.2f}, fine "
                    f"{last['accuracy_fine']:.2f} (chance {1 / DISTORTION_CLASSES:.2f})")
        else:
            result = fit_heads(model, train, val, settings, seed=seed,
                               on_epoch=bar.update_epoch)
        bar.close()
        log(f"seed {seed}: best epoch {result.best_epoch}, val SRCC "
            + ", ".join(f"{k} {v:.3f}" for k, v in result.best_val.items()))
        results.append(result)

    best = max(results, key=lambda r: r.best_val["mean"])  # chosen on validation only
    model.load_state_dict(best.state, strict=False)
    if finetune:
        model.refresh_grade_text()
    reference = reference_stats(model, embed_rows(model, train) if finetune else train,
                                name=f"train rows of {config.input}")
    model.config = model.config.model_copy(update={"score_reference": reference})
    summary = {head: mean_std([r.best_val[head] for r in results])
               for head in (*arch.heads, "mean") if head in best.best_val}
    metrics = {"val_srcc": summary, "repeats": [
        {"seed": r.seed, "best_epoch": r.best_epoch, "val_srcc": r.best_val} for r in results],
        "selected_seed": best.seed, "rows": {k: len(v.shas) for k, v in splits.items()},
        "settings": settings.model_dump()}
    output = Path(config.output)
    save_checkpoint(model, output, metrics=metrics, include_towers=finetune,
                    weights_dtype=config.weights_dtype,
                    data_hash=data_hash(arch.heads, splits["train"], splits["val"]),
                    extra={"training": {"train": tables["train"] if config.val else config.input,
                                        "val": config.val, "split_column": config.split_column,
                                        "cache": config.cache, "towers": config.towers}})
    histories = {"history": {r.seed: r.history for r in results}}
    if any(r.pretrain_history for r in results):
        histories["pretrain_history"] = {r.seed: r.pretrain_history for r in results}
    (output / "metrics.json").write_text(json.dumps(json_ready({**metrics, **histories}),
                                                    indent=2, allow_nan=False) + "\n")
    plot_training_curves(results, output / "training_curves.png")
    log("val SRCC (mean +- std over seeds): " + ", ".join(
        f"{k} {v['mean']:.3f} +- {v['std']:.3f}" for k, v in summary.items()))
    log(f"wrote {output}/ (model.safetensors, config.json, metrics.json, training_curves.png)")
    return metrics


def _default_root(table_url: str) -> str:
    return table_url.rsplit("/", 1)[0] if "/" in table_url else os.curdir


class _EpochBar:
    """One seed's epochs as a progress bar. ``start=False`` shows it only when ``open()`` is
    called or the first epoch ends; ``then`` is opened when this bar's last epoch ends (the
    MOS bar after the pretraining bar, so only one bar moves at a time). With bars off
    (``--no-progress``, or stderr not a terminal: batch jobs, cluster logs) each epoch is one
    ``log`` line instead, so an hour-long run still shows where it is."""

    def __init__(self, total: int, desc: str, enabled: bool,
                 postfix: Callable[[dict], dict[str, str]], start: bool = True,
                 then: _EpochBar | None = None, log: Callable[[str], None] | None = None):
        self.total, self.desc, self.enabled, self.postfix, self.then = (total, desc, enabled,
                                                                        postfix, then)
        self.log = None if enabled else log
        self.bar = None
        if start:
            self.open()

    def open(self) -> None:
        if self.enabled and self.total and self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=self.desc, unit="epoch", dynamic_ncols=True)

    def update_epoch(self, record: dict) -> None:
        self.open()
        if self.bar is not None:
            self.bar.set_postfix(**self.postfix(record))
            self.bar.update(1)
        elif self.log is not None:
            self.log(f"{self.desc}: epoch {record['epoch']}/{self.total}, " + ", ".join(
                f"{name} {value}" for name, value in self.postfix(record).items()))
        if self.then is not None and record["epoch"] == self.total:
            self.close()
            self.then.open()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.enabled = False  # a closed bar stays closed


def _val_srcc_heads(record: dict) -> list[str]:
    """The heads an epoch record has a validation SRCC of, in order."""
    return [key.removeprefix("val_srcc_") for key in record
            if key.startswith("val_srcc_") and key != "val_srcc_mean"]


def _mos_postfix(record: dict) -> dict[str, str]:
    heads = {h[0]: record[f"val_srcc_{h}"]
             for h in _val_srcc_heads(record)}  # q=..., a=...: each head's val SRCC
    return {"loss": f"{record['train_loss']:.4f}",
            "val_srcc": "/".join(f"{k} {v:.3f}" for k, v in heads.items())}


def _pretrain_postfix(record: dict) -> dict[str, str]:
    return {"loss": f"{record['loss']:.3f}",
            "accuracy": f"{record['accuracy_coarse']:.2f}/{record['accuracy_fine']:.2f}"}


def plot_training_curves(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pretrained = any(r.pretrain_history for r in results)
    fig, axes = plt.subplots(1, 3 if pretrained else 2, figsize=(15 if pretrained else 10, 4))
    loss_ax, srcc_ax = axes[:2]
    if pretrained:  # how well each tower learned to name the distortions, per seed
        for result in results:
            epochs = [h["epoch"] for h in result.pretrain_history]
            for tower, style in (("coarse", "-"), ("fine", "--")):
                axes[2].plot(epochs, [h[f"accuracy_{tower}"] for h in result.pretrain_history],
                             style, marker="o", markersize=3, label=f"{tower}, seed {result.seed}")
        axes[2].axhline(1 / DISTORTION_CLASSES, color="grey", alpha=0.3)
        axes[2].set(title="distortion pretraining: train accuracy (grey: chance)",
                    xlabel="pretraining epoch")
        axes[2].legend(fontsize=7)
    for result in results:
        epochs = [h["epoch"] for h in result.history]
        loss_ax.plot(epochs, [h["train_loss"] for h in result.history], label=f"seed {result.seed}")
        for head, style in zip(_val_srcc_heads(result.history[0]), ("-", "--", ":", "-."),
                               strict=False):
            srcc_ax.plot(epochs, [h[f"val_srcc_{head}"] for h in result.history], style,
                         label=f"{head}, seed {result.seed}")
        srcc_ax.axvline(result.best_epoch, color="grey", alpha=0.3)
    loss_ax.set(title="train loss", xlabel="epoch")
    srcc_ax.set(title="validation SRCC (grey: selected epoch)", xlabel="epoch")
    loss_ax.legend(fontsize=7)
    srcc_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
