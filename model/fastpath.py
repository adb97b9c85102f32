"""Faster ways to run the frozen image towers: ``--precision int8`` and ``--compile``.

Chosen by measurement on this machine (2 cores, AVX-512 with VNNI; `iqray bench` keeps the
figures): int8 dynamic quantisation of the image towers' Linear layers ran the full-size
ViT-B-32 2.2x and ViT-B-16 1.8x faster than fp32, while bf16 autocast on this CPU was 3.4x
*slower*, and torch.compile (inductor) gained 1.13x on ViT-B-16, 0.96x on ViT-B-32 (about
1.09x for the model, after 37 s of compiling per actor) and nothing on the int8 towers, so
int8 is the CPU path and compile is opt-in, never combined with int8. On GPUs the towers
already run in bf16 autocast; ``--compile`` adds CUDA graphs there.
A path is only offered if its scores keep Spearman >= 0.999 against fp32 on the sample
(checked by `iqray bench`, and by the tests on tiny towers).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

PRECISIONS = ("fp32", "int8")
MIN_SPEARMAN = 0.999  # a fast path must keep the ranking this well against fp32


def image_towers(model) -> list[nn.Module]:
    """The image sides of a model's frozen towers (text sides stay fp32: prompts are
    encoded once per distinct prompt and cached, so they cost little)."""
    if hasattr(model, "fine_visual"):
        return [model.coarse.visual, model.fine_visual]
    return [model.backbone.visual]


def _require_frozen(model, what: str) -> None:
    if any(p.requires_grad for t in image_towers(model) for p in t.parameters()):
        raise ValueError(f"{what} are for scoring; they cannot be trained")


def apply_precision(model, precision: str):
    """Convert ``model``'s image towers in place for ``precision``; returns the model."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return model
    if model.device.type != "cpu":
        raise ValueError("--precision int8 is a CPU path (dynamic quantisation); on a GPU the "
                         "towers already run in bf16 autocast")
    from iqray.model.registry import architecture

    architecture(model).require("int8", "--precision int8")
    _require_frozen(model, "int8 towers")
    with warnings.catch_warnings():
        # torch 2.14 points eager quantisation at torchao; the API still works and torchao
        # is not a dependency of iqray.
        warnings.simplefilter("ignore")
        for tower in image_towers(model):
            torch.ao.quantization.quantize_dynamic(tower, {nn.Linear}, dtype=torch.qint8,
                                                   inplace=True)
    model.precision = precision
    return model


def fidelity_report(reference: dict[str, np.ndarray], fast: dict[str, np.ndarray],
                    names: list[str]) -> dict:
    """Per output: Spearman of the fast path's scores against the fp32 ones, and the max
    absolute difference; ``passes`` when every output with a ranking keeps MIN_SPEARMAN."""
    from iqray.model.metrics import srcc

    report: dict = {}
    for name in names:
        a = np.asarray(reference[name], float)
        b = np.asarray(fast[name], float)
        keep = np.isfinite(a) & np.isfinite(b)
        if keep.sum() < 3 or np.ptp(a[keep]) == 0:
            continue  # no ranking to keep (e.g. no prompts: alignment is all NaN)
        report[name] = {"spearman": float(srcc(b[keep], a[keep])),
                        "max_abs_diff": float(np.abs(a[keep] - b[keep]).max())}
    report["passes"] = all(v["spearman"] >= MIN_SPEARMAN for k, v in report.items())
    return report


def compile_towers(model):
    """``torch.compile`` the image towers in place; returns the model.

    On a GPU with ``mode="reduce-overhead"``: inductor kernels replayed as CUDA graphs, one
    graph per batch shape (the last, shorter batch of a shard records its own). On a CPU the
    default mode (measured here: 1.09x for the full-size model after about 37 s of compiling
    per process). Shapes are static (``dynamic=False``) because batches are. The text tower
    stays eager: prompts are encoded once per distinct prompt and cached.
    """
    from iqray.model.registry import architecture

    architecture(model).require("compile", "--compile")
    if getattr(model, "precision", "fp32") != "fp32":
        raise ValueError("--compile with --precision int8 is not offered: on this CPU it ran "
                         "the ViT-B-16 tower 0.98x as fast and moved outputs by up to 0.06")
    _require_frozen(model, "compiled towers")
    mode = "reduce-overhead" if model.device.type == "cuda" else None
    model.coarse.visual = torch.compile(model.coarse.visual, mode=mode, dynamic=False)
    model.fine_visual = torch.compile(model.fine_visual, mode=mode, dynamic=False)
    model.compiled = True
    return model

