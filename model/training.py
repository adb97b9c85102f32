"""Training the trainable part of a model on tensors (torch only, no Ray, no files):
MST-CLIPIQA's fusion and heads from cached tower embeddings (or end to end), BPCLIP's gated
pooling, bottom-up blocks and quality layer from precomputed level features.

Loss per head: MSE on MOS normalised to [0, 1] plus ``rank_weight`` times a pairwise hinge
over every pair in the batch whose MOS differ (the higher-rated image must be predicted at
least ``margin`` higher). Heads are weighted; rows without a target for a head (no prompt,
no alignment MOS) do not count for that head. AdamW with a cosine schedule; the epoch kept is
the one with the best validation SRCC -- validation data only, never a test split.

Optional auxiliary loss (``group_weight`` > 0): a training-only linear classifier predicts
each training row's group (e.g. the generator read from the file name) from the fused
embedding. Small towers trained from scratch learn "which generator made this" slowly from
MOS alone, and on AGIQA-3K the generator explains much of the MOS; the classifier is thrown
away after training and never sees validation labels.

Optional weight averaging (``ema_decay`` > 0): an exponential moving average of the weights
is what gets validated, selected and saved; training itself takes exactly the same steps.
With a few thousand images, validation SRCC swings from epoch to epoch and seed to seed.

Optional distortion pretraining (``pretrain_distortions`` > 0 epochs, end to end only): before
the MOS loss, each image tower learns to name which synthetic distortion (clean, or one of
:mod:`iqray.model.distortions`' 5 kinds x 5 levels) was applied to the training images' own
views. Towers trained from scratch on ~2k rated images otherwise learn mostly content and
generator; naming blur, noise, JPEG, contrast and colour casts teaches them the low-level
cues quality depends on, from labels that cost nothing. The distortions are PIL work on the
CPU: a thread pool applies them ahead of the towers (``distortion_workers``), and every random
choice is drawn beforehand in one order, so the result does not depend on the thread count.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from iqray.model.bpclip import BPCLIP, LevelFeatures
from iqray.model.distortions import KINDS, LEVELS, distort
from iqray.model.metrics import srcc
from iqray.model.mst_clipiqa import MSTClipIQA

HEADS = ("quality", "alignment")  # MST-CLIPIQA's; other models: model_heads(model)


def model_heads(model) -> tuple[str, ...]:
    """What ``model`` learns from ratings, in its architecture's order (the first is what
    --quality-column rates, the second what --alignment-column rates)."""
    from iqray.model.registry import architecture

    return architecture(model).heads


def head_weights(settings: TrainSettings, heads: tuple[str, ...]) -> dict[str, float]:
    """Loss weight per head: --quality-weight for the first, --alignment-weight the second."""
    return dict(zip(heads, (settings.quality_weight, settings.alignment_weight), strict=False))
Item = TypeVar("Item")


class TrainSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    group_title: ClassVar[str] = "training"  # its --help section in `iqray train`

    epochs: int = Field(default=40, gt=0, description="passes over the training rows")
    train_batch_size: int = Field(default=64, gt=1, description="rows per optimiser step")
    lr: float = Field(default=1e-3, gt=0, description="AdamW learning rate (heads from scratch)")
    weight_decay: float = Field(default=1e-4, ge=0, description="AdamW weight decay")
    rank_weight: float = Field(default=1.0, ge=0, description="lambda of the ranking hinge")
    margin: float = Field(default=0.1, ge=0, description="hinge margin, normalised MOS units")
    quality_weight: float = Field(default=1.0, ge=0, description="weight of the quality head "
                                  "(another model's first head)")
    alignment_weight: float = Field(default=1.0, ge=0, description="weight of the alignment "
                                    "head (another model's second head)")
    seed: int = Field(default=0, description="seed of the first repeat")
    group_weight: float = Field(
        default=0.0, ge=0, description="weight of the auxiliary group-classification loss "
        "(needs --group-column or --group-pattern; 0 = off)")
    ema_decay: float = Field(
        default=0.0, ge=0, lt=1, description="exponential moving average of the weights "
        "(e.g. 0.99): validation, epoch selection and the checkpoint use the averaged weights; "
        "0 = off")
    pretrain_distortions: int = Field(
        default=0, ge=0, description="towers finetune: epochs of pretraining the image towers "
        "to name a synthetic distortion of the training images (clean or 5 kinds x 5 levels) "
        "before the MOS loss, at --lr, --weight-decay and --train-batch-size; 0 = off")
    distortion_workers: int | None = Field(
        default=None, ge=0, description="threads that distort pretraining views ahead of the "
        "towers (default: CPUs - 1, at most 8; 0 = in the training loop); every random choice "
        "is drawn in order beforehand, so the result does not depend on it")


@dataclass
class HeadData:
    """Rows for the heads: tower embeddings (one tensor per tower role: MST-CLIPIQA's coarse
    and fine), prompts, normalised targets (NaN = none)."""

    embeddings: tuple[torch.Tensor, ...]
    prompts: list[str | None]
    targets: dict[str, torch.Tensor]
    groups: torch.Tensor | None = None  # int64 class per row (auxiliary loss), -1 = none

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, index: torch.Tensor) -> HeadData:
        rows = index.tolist()
        return HeadData(tuple(e[index] for e in self.embeddings), [self.prompts[i] for i in rows],
                        {k: v[index] for k, v in self.targets.items()},
                        None if self.groups is None else self.groups[index])


# Spearman's rank correlation needs at least 3 rows to say anything about an order.
MIN_VALIDATION_ROWS = 3


class ValidationUndefined(ValueError):
    """Validation cannot choose a model (too few rows, or a metric undefined in every
    epoch): training ends without one rather than save a state it never selected."""


@dataclass
class TrainResult:
    seed: int
    best_epoch: int
    best_val: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    pretrain_history: list[dict[str, float]] = field(default_factory=list)


def ranking_hinge(pred: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean over ordered pairs (target_i > target_j) of relu(margin - (pred_i - pred_j))."""
    diff_target = target[:, None] - target[None, :]
    diff_pred = pred[:, None] - pred[None, :]
    pairs = diff_target > 0
    if not pairs.any():
        return pred.sum() * 0.0
    return torch.relu(margin - diff_pred[pairs]).mean()


def head_loss(pred: torch.Tensor, target: torch.Tensor, margin: float,
              rank_weight: float) -> torch.Tensor:
    valid = torch.isfinite(target) & torch.isfinite(pred)
    if valid.sum() < 1:
        return pred.nan_to_num().sum() * 0.0
    pred, target = pred[valid], target[valid]
    return torch.mean((pred - target) ** 2) + rank_weight * ranking_hinge(pred, target, margin)


@dataclass
class LevelRows:
    """BPCLIP rows: frozen level features (kept in float16), normalised targets."""

    features: LevelFeatures
    targets: dict[str, torch.Tensor]
    groups: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.features)

    def subset(self, index: torch.Tensor) -> LevelRows:
        return LevelRows(self.features.subset(index), {k: v[index] for k, v in
                                                       self.targets.items()},
                         None if self.groups is None else self.groups[index])


def level_features(model: BPCLIP, pixels: torch.Tensor, batch_size: int = 64,
                   on_batch: Callable[[int], None] | None = None) -> LevelFeatures:
    """The frozen backbone's level features of uint8 crops, computed once (float16): every
    epoch then runs only the trainable part."""
    model.eval()
    parts: list[LevelFeatures] = []
    with torch.inference_mode():
        for start in range(0, len(pixels), batch_size):
            chunk = model.transform.normalize(pixels[start:start + batch_size])
            parts.append(model.encode_levels(chunk).to("cpu", torch.float16))
            if on_batch is not None:
                on_batch(len(chunk))
    if not parts:
        raise ValueError("no images to compute features of")
    return LevelFeatures.cat(parts)


def forward_cached(model, embeddings: tuple[torch.Tensor, ...], prompts: list[str | None],
                   group_classifier: torch.nn.Module | None = None, grad: bool = False
                   ) -> dict[str, torch.Tensor]:
    """The heads on cached embeddings (normalised predictions); prompts are encoded only for
    models whose heads read them."""
    encoded = model.encode_prompts(prompts, grad=grad) if model.config.prompt_aware else None
    return model.forward_heads(*embeddings, encoded, group_classifier=group_classifier)


def predict(model: MSTClipIQA | BPCLIP, data: HeadData | LevelRows, batch_size: int = 256
            ) -> dict[str, np.ndarray]:
    """Normalised predictions of the model's heads for every row."""
    if isinstance(data, LevelRows):
        model.eval()
        parts: list[np.ndarray] = []
        with torch.inference_mode():
            for start in range(0, len(data), batch_size):
                rows = torch.arange(start, min(start + batch_size, len(data)))
                parts.append(model.forward_heads(data.features.subset(rows))["quality"]
                             .cpu().numpy())
        return {"quality": np.concatenate(parts) if parts else np.zeros(0)}
    model.eval()
    heads = model_heads(model)
    out: dict[str, list[np.ndarray]] = {h: [] for h in heads}
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            rows = slice(start, start + batch_size)
            pred = forward_cached(model, tuple(e[rows] for e in data.embeddings),
                                  data.prompts[rows])
            for head in heads:
                out[head].append(pred[head].cpu().numpy())
    return {h: np.concatenate(v) if v else np.zeros(0) for h, v in out.items()}


def validation_srcc(model: MSTClipIQA | BPCLIP, data: HeadData | LevelRows
                    ) -> dict[str, float]:
    pred = predict(model, data)
    heads = model_heads(model)
    scores = {}
    for head in heads:
        if head not in pred:
            continue
        target = data.targets[head].numpy()
        if np.isfinite(target).sum() >= 3:
            scores[head] = srcc(pred[head], target)
    scores["mean"] = float(np.mean([scores[h] for h in heads if h in scores]))
    return scores


@dataclass
class ImageRows:
    """Rows for end-to-end training: uint8 crops at the towers' input size, prompts, targets."""

    pixels: torch.Tensor
    prompts: list[str | None]
    targets: dict[str, torch.Tensor]
    groups: torch.Tensor | None = None  # int64 class per row (auxiliary loss), -1 = none
    fine_areas: torch.Tensor | None = None  # two-view models: where fine crops are drawn from

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, index: torch.Tensor) -> ImageRows:
        rows = index.tolist()
        return ImageRows(self.pixels[index], [self.prompts[i] for i in rows],
                         {k: v[index] for k, v in self.targets.items()},
                         None if self.groups is None else self.groups[index],
                         None if self.fine_areas is None else self.fine_areas[index])


def embed_rows(model: MSTClipIQA, rows: ImageRows, batch_size: int = 128) -> HeadData:
    """Tower embeddings of image rows (eval mode, centre views), as cached rows are."""
    model.eval()
    parts: list[tuple[torch.Tensor, ...]] = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            parts.append(tuple(model.encode_images(model.transform.normalize(
                rows.pixels[start : start + batch_size]))))
    return HeadData(tuple(torch.cat(role) for role in zip(*parts, strict=True)), rows.prompts,
                    rows.targets)


def reference_stats(model: MSTClipIQA | BPCLIP, data: HeadData | LevelRows, name: str
                    ) -> dict[str, dict]:
    """Mean and std of the model's own scores (its output scale) on a fixed set: what
    z-scores are measured against, so a threshold keeps its meaning across batches."""
    normalised = predict(model, data)
    scaled = model.to_score_scale({h: torch.as_tensor(v) for h, v in normalised.items()})
    stats = {}
    for head, values in scaled.items():
        values = values.numpy()
        values = values[np.isfinite(values)]
        if values.size >= 2:
            stats[head] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)),
                           "n": int(values.size), "set": name}
    return stats


def group_classifier(model: MSTClipIQA, train, settings: TrainSettings, seed: int
                     ) -> torch.nn.Linear | None:
    """The training-only auxiliary classifier, or None when the loss is off."""
    if settings.group_weight == 0:
        return None
    if train.groups is None or int(train.groups.max()) < 1:
        raise ValueError("group_weight > 0 needs at least two groups in the training rows "
                         "(--group-column or --group-pattern)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        return torch.nn.Linear(model.config.embedding_dim, int(train.groups.max()) + 1).to(
            model.device)


def fit_heads(model: MSTClipIQA, train: HeadData, val: HeadData, settings: TrainSettings,
              seed: int, on_epoch: Callable[[dict[str, float]], None] | None = None
              ) -> TrainResult:
    """Train fresh heads (seeded) on cached embeddings; keep the best val-SRCC epoch."""
    model.config = model.config.model_copy(update={"trained": True})
    model.reset_heads(seed)
    classifier = group_classifier(model, train, settings, seed)
    params = [{"params": [p for p in model.parameters() if p.requires_grad]
               + _params(classifier), "lr": settings.lr}]

    def forward(batch: HeadData) -> dict[str, torch.Tensor]:
        return forward_cached(model, batch.embeddings, batch.prompts,
                              group_classifier=classifier)

    return _fit(model, train, val, settings, seed, params, forward,
                lambda: validation_srcc(model, val), model.trainable_state_dict, on_epoch)


DISTORTION_CLASSES = 1 + len(KINDS) * LEVELS  # 0 = clean, then kind-major, level 1..5


def distortion_class(label: int) -> tuple[str, int] | None:
    """(kind, level) of a pretraining class; None for class 0 (clean)."""
    if not 0 <= label < DISTORTION_CLASSES:
        raise ValueError(f"distortion class must be 0..{DISTORTION_CLASSES - 1}, got {label}")
    if label == 0:
        return None
    return KINDS[(label - 1) // LEVELS], (label - 1) % LEVELS + 1


def distorted_view(view: torch.Tensor, label: int, seed: int) -> torch.Tensor:
    """A uint8 (3, H, W) view with pretraining class ``label``'s distortion applied."""
    which = distortion_class(label)
    if which is None:
        return view
    from PIL import Image

    image = Image.fromarray(view.permute(1, 2, 0).numpy())
    out = distort(image, *which, seed=seed)
    return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1)


@dataclass(frozen=True)
class DistortionDraw:
    """The random part of one pretraining batch: per view a class, a distortion seed and
    whether to flip it horizontally."""

    labels: np.ndarray  # int64 (N,)
    seeds: list[int]
    flips: np.ndarray  # bool (N,)


def draw_distortions(count: int, rng: np.random.Generator) -> DistortionDraw:
    """Draw a batch's classes, seeds and flips from ``rng`` (the cheap, sequential part;
    applying them is :func:`apply_distortions`, which may run on another thread)."""
    labels = rng.integers(0, DISTORTION_CLASSES, count)
    seeds = [int(rng.integers(1 << 30)) for _ in range(count)]
    return DistortionDraw(labels, seeds, rng.random(count) < 0.5)


def apply_distortions(views: torch.Tensor, draw: DistortionDraw
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 3, H, W) views with ``draw`` applied. Returns (views, int64 labels)."""
    out = torch.stack([distorted_view(view, int(label), seed)
                       for view, label, seed in zip(views, draw.labels, draw.seeds,
                                                    strict=True)])
    flip = torch.from_numpy(draw.flips)
    return (torch.where(flip[:, None, None, None], out.flip(-1), out),
            torch.from_numpy(draw.labels))


def distortion_batch(views: torch.Tensor, rng: np.random.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """A pretraining batch from uint8 (N, 3, H, W) views: each view gets a random class, its
    own distortion seed and a random horizontal flip. Returns (views, int64 labels)."""
    return apply_distortions(views, draw_distortions(len(views), rng))


def distortion_threads(settings: TrainSettings) -> int:
    """Threads that distort pretraining views ahead of the towers (0 = in the loop)."""
    if settings.distortion_workers is not None:
        return settings.distortion_workers
    return min(8, max(1, (os.cpu_count() or 2) - 1))


def in_order_ahead(work: Callable[[int], Item], count: int, threads: int
                   ) -> Iterator[Item]:
    """``work(0)``, ..., ``work(count - 1)`` in order, computed up to ``threads`` items ahead
    on a thread pool (PIL and numpy release the GIL while the towers train); inline when
    ``threads`` is 0."""
    if threads == 0:
        yield from (work(i) for i in range(count))
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads, thread_name_prefix="iqray-distort") as pool:
        pending = deque(pool.submit(work, i) for i in range(min(threads, count)))
        for following in range(threads, count + threads):
            ready = pending.popleft().result()
            if following < count:
                pending.append(pool.submit(work, following))
            yield ready


def _distorted_epoch(pixels: torch.Tensor, views_of: list[slice], batch_size: int,
                     rng: np.random.Generator, threads: int
                     ) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """One pretraining epoch in shuffled batches: per batch, (views, labels) for each tower's
    channels in ``views_of``. Every random choice is drawn now, in the order one loop would
    draw it, so the batches do not depend on how many threads apply them."""
    order = rng.permutation(len(pixels))
    batches = [order[start:start + batch_size] for start in range(0, len(pixels), batch_size)]
    draws = [[draw_distortions(len(index), rng) for _ in views_of] for index in batches]

    def prepared(i: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [apply_distortions(pixels[batches[i], views], draw)
                for views, draw in zip(views_of, draws[i], strict=True)]

    return in_order_ahead(prepared, len(batches), threads)


def pretrain_on_distortions(model: MSTClipIQA, pixels: torch.Tensor, settings: TrainSettings,
                            seed: int,
                            on_epoch: Callable[[dict[str, float]], None] | None = None
                            ) -> list[dict[str, float]]:
    """Train both image towers for ``settings.pretrain_distortions`` epochs to classify which
    distortion each of their views carries (uint8 crops as in :class:`ImageRows`: 3 channels
    for both towers, or 6 = coarse view, fine view). Every view gets its own random class,
    distortion seed and horizontal flip; one linear classifier per tower is thrown away
    afterwards. AdamW at ``settings.lr`` / ``weight_decay``, cosine schedule. Returns one
    record per epoch: mean loss and each tower's training accuracy (chance is
    1 / ``DISTORTION_CLASSES``)."""
    epochs, batch_size = settings.pretrain_distortions, settings.train_batch_size
    rng = np.random.default_rng(seed + 7)
    threads = distortion_threads(settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7)
        classifiers = torch.nn.ModuleList(
            torch.nn.Linear(model.config.heads.embed_dim, DISTORTION_CLASSES) for _ in range(2))
    classifiers.to(model.device)
    towers = [model.coarse.visual, model.fine_visual]
    tower_params = [p for t in towers for p in t.parameters()]
    trainable = [p.requires_grad for p in tower_params]
    params = tower_params + list(classifiers.parameters())
    for tower in towers:
        tower.requires_grad_(True)
        tower.train()
    optimiser = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimiser, T_max=max(1, epochs * math.ceil(len(pixels) / batch_size)))
    views_of = [slice(0, 3), slice(0, 3) if pixels.shape[1] == 3 else slice(3, 6)]
    history = []
    try:
        for epoch in range(1, epochs + 1):
            losses, correct = [], [0, 0]
            for batch in _distorted_epoch(pixels, views_of, batch_size, rng, threads):
                loss = torch.zeros((), device=model.device)
                for role, (tower, classifier) in enumerate(zip(towers, classifiers, strict=True)):
                    views, target = batch[role]
                    with model._autocast():
                        features = tower(model.transform.normalize(views).to(model.device))
                    logits = classifier(features.float())
                    target = target.to(model.device)
                    loss = loss + torch.nn.functional.cross_entropy(logits, target)
                    correct[role] += int((logits.argmax(-1) == target).sum())
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                losses.append(float(loss.detach()))
            record = {"epoch": epoch, "loss": float(np.mean(losses)),
                      "accuracy_coarse": correct[0] / len(pixels),
                      "accuracy_fine": correct[1] / len(pixels)}
            history.append(record)
            if on_epoch is not None:
                on_epoch(record)
    finally:
        for p, was in zip(tower_params, trainable, strict=True):
            p.requires_grad_(was)
        model.train(False)
    return history


def fit_end_to_end(model: MSTClipIQA, train: ImageRows, val: ImageRows,
                   settings: TrainSettings, seed: int, tower_lr: float,
                   on_epoch: Callable[[dict[str, float]], None] | None = None,
                   on_pretrain_epoch: Callable[[dict[str, float]], None] | None = None
                   ) -> TrainResult:
    """Train towers and heads together; random-init towers are re-initialised from ``seed``
    (small towers from scratch), the text tower learns too, images are flipped at random.

    With ``train.fine_areas`` (two-view models) each step's fine view is a random crop of the
    image's fine area rather than its centre: blur and noise do not depend on where one
    looks, and a 512 px area holds many 160 px crops, so the fine tower sees far more
    distinct inputs than there are images. Validation uses the centre, as scoring does.

    With ``settings.pretrain_distortions`` the image towers first learn to name synthetic
    distortions of the training views (:func:`pretrain_on_distortions`).
    """
    model.config = model.config.model_copy(update={"trained": True})
    if model.config.coarse.pretrained is None and model.config.fine.pretrained is None:
        model.reset_towers(seed)  # from scratch: each repeat gets its own towers
    pretrain_history = (pretrain_on_distortions(model, train.pixels, settings, seed,
                                                on_pretrain_epoch)
                        if settings.pretrain_distortions else [])
    model.reset_heads(seed)
    classifier = group_classifier(model, train, settings, seed)
    model.set_towers_trainable(True)
    tower_params = [p for t in model.towers() for p in t.parameters()]
    head_params = [p for n, p in model.named_parameters()
                   if n in model.trainable_state_dict()] + _params(classifier)
    params = [{"params": tower_params, "lr": tower_lr},
              {"params": head_params, "lr": settings.lr}]
    flips = torch.Generator().manual_seed(seed + 1)

    def forward(batch: ImageRows) -> dict[str, torch.Tensor]:
        pixels = batch.pixels
        if batch.fine_areas is not None:
            size, area = pixels.shape[-1], batch.fine_areas.shape[-1]
            corners = torch.randint(0, area - size + 1, (len(batch), 2), generator=flips)
            fine = torch.stack([batch.fine_areas[i, :, y:y + size, x:x + size]
                                for i, (y, x) in enumerate(corners.tolist())])
            pixels = torch.cat([pixels[:, :3], fine], dim=1)
        flip = torch.rand(len(batch), generator=flips) < 0.5
        pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
        coarse, fine = model.encode_images(model.transform.normalize(pixels))
        return model.forward_heads(coarse, fine, model.encode_prompts(batch.prompts, grad=True),
                                   group_classifier=classifier)

    def validate() -> dict[str, float]:
        model.refresh_grade_text()
        return validation_srcc(model, embed_rows(model, val))

    def state() -> dict[str, torch.Tensor]:
        return model.state_dict()

    try:
        result = _fit(model, train, val, settings, seed, params, forward, validate, state,
                      on_epoch)
    finally:
        model.set_towers_trainable(False)
    result.pretrain_history = pretrain_history
    return result


def fit_bpclip(model: BPCLIP, train: LevelRows, val: LevelRows, settings: TrainSettings,
               seed: int, on_epoch: Callable[[dict[str, float]], None] | None = None
               ) -> TrainResult:
    """Train BPCLIP's gated pooling, bottom-up blocks and quality layer (seeded fresh) on
    precomputed level features; keep the best val-SRCC epoch."""
    model.config = model.config.model_copy(update={"trained": True})
    model.reset_heads(seed)
    params = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": settings.lr}]

    def forward(batch: LevelRows) -> dict[str, torch.Tensor]:
        return model.forward_heads(batch.features)

    return _fit(model, train, val, settings, seed, params, forward,
                lambda: validation_srcc(model, val), model.trainable_state_dict, on_epoch)


class WeightAverage:
    """Exponential moving average of the floating-point tensors a model saves (parameters and
    norm statistics). On a few thousand images the weights after any one step are noisy and
    the best epoch by val SRCC swings with them; the average is what gets validated and kept.

    The decay warms up as ``min(decay, (1 + t) / (10 + t))`` after ``t`` updates, so the
    average is not dominated by the random initial weights."""

    def __init__(self, model: torch.nn.Module, names: set[str], decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()
                       if k in names and v.is_floating_point()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        decay = self.current_decay()
        live = model.state_dict()
        for name, average in self.shadow.items():
            average.lerp_(live[name].detach(), 1.0 - decay)
        self.updates += 1

    @contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[None]:
        """The model holds the averaged weights inside the block and its own ones after it,
        so the average only observes training and never steers it."""
        live = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.shadow}
        model.load_state_dict(self.shadow, strict=False)
        try:
            yield
        finally:
            model.load_state_dict(live, strict=False)


def _params(module: torch.nn.Module | None) -> list[torch.nn.Parameter]:
    return [] if module is None else list(module.parameters())


def _fit(model: MSTClipIQA | BPCLIP, train, val, settings: TrainSettings, seed: int, params: list,
         forward: Callable, validate: Callable[[], dict[str, float]],
         state: Callable[[], dict[str, torch.Tensor]],
         on_epoch: Callable[[dict[str, float]], None] | None) -> TrainResult:
    optimiser = torch.optim.AdamW(params, weight_decay=settings.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(train) / settings.train_batch_size))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimiser, T_max=settings.epochs * steps_per_epoch)
    weights = head_weights(settings, model_heads(model))
    generator = torch.Generator().manual_seed(seed)
    average = (WeightAverage(model, set(state()), settings.ema_decay)
               if settings.ema_decay > 0 else None)
    if len(val) < MIN_VALIDATION_ROWS:
        raise ValidationUndefined(
            f"{len(val)} validation rows: SRCC needs at least {MIN_VALIDATION_ROWS} to choose "
            "an epoch; give more validation rows (--val or --split-column)")
    result = TrainResult(seed=seed, best_epoch=-1, best_val={"mean": -math.inf})
    for epoch in range(1, settings.epochs + 1):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        losses = []
        for start in range(0, len(train), settings.train_batch_size):
            batch = train.subset(order[start : start + settings.train_batch_size])
            pred = forward(batch)
            loss = sum(weight * head_loss(pred[h], batch.targets[h].to(model.device),
                                              settings.margin, settings.rank_weight)
                       for h, weight in weights.items() if weight > 0 and h in pred)
            if "group_logits" in pred:
                loss = loss + settings.group_weight * torch.nn.functional.cross_entropy(
                    pred["group_logits"], batch.groups.to(model.device), ignore_index=-1)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            if average is not None:
                average.update(model)
            losses.append(float(loss.detach()))
        with average.applied(model) if average is not None else nullcontext():
            val_scores = validate()
            if val_scores["mean"] > result.best_val["mean"]:
                result.best_epoch, result.best_val = epoch, val_scores
                result.state = copy.deepcopy(state())
        record = {"epoch": epoch, "train_loss": float(np.mean(losses)),
                  **{f"val_srcc_{k}": v for k, v in val_scores.items()}}
        result.history.append(record)
        if on_epoch is not None:
            on_epoch(record)
    if result.best_epoch < 0:  # NaN never beats -inf: no epoch was ever chosen
        raise ValidationUndefined(
            f"validation SRCC was undefined in all {settings.epochs} epochs of seed {seed} "
            f"(constant predictions or constant ratings on the {len(val)} validation rows), "
            "so no epoch could be chosen and nothing is saved")
    model.load_state_dict(result.state, strict=False)
    model.eval()
    return result
