"""`iqray eval`: agreement of a checkpoint with human scores, overall and per group, beside
trivial baselines on the same rows: Laplacian-variance sharpness, file size and, given a
prior table (the training split), each group's mean MOS there -- how far knowing only the
group (e.g. AGIQA-3K's generator) gets. Each baseline is compared with the model by a paired
bootstrap of the SRCC difference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pydantic import Field

from iqray.jobs.console import log
from iqray.jobs.labelled import (
    LabelledDataConfig,
    embed_table,
    groups_for,
    head_data,
    image_rows,
    labelled_rows,
)
from iqray.model.registry import architecture
from iqray.model.training import model_heads
from iqray.pipeline import rows as R


class EvalConfig(LabelledDataConfig):
    """`iqray eval`: SRCC/KRCC/PLCC (raw and logistic) of a checkpoint on labelled data."""

    output: str = Field(default="runs/eval", description="folder for eval.json and scatter.png")
    bootstrap: int = Field(default=1000, ge=0, description="bootstrap samples for the SRCC CI")
    baselines: bool = Field(default=True, description="also score Laplacian variance, file size")
    prior_table: str | None = Field(
        default=None, description="table with the same MOS and group columns (usually the "
        "training split): adds the baseline that predicts each row's group mean MOS there "
        "(groups from --group-column/--group-pattern; unseen groups get the overall mean)")


def laplacian_variance(image_bytes: bytes) -> float:
    """Variance of the Laplacian of the grey image: the classic sharpness proxy."""
    from scipy import ndimage

    from iqray.model.preprocess import open_image

    grey = np.asarray(open_image(image_bytes).convert("L"), dtype=np.float32)
    return float(ndimage.laplace(grey).var())


def baseline_scores(config: EvalConfig, rows: list[int]) -> dict[str, np.ndarray]:
    from iqray.pipeline.io.discovery import discover_shards
    from iqray.pipeline.io.read import read_shard

    read, storage = config.read_config(), config.storage_config()
    (shard,) = discover_shards(config.input, read, storage)
    sharpness, size = {}, {}
    for batch in read_shard(shard, read, storage, []):
        for row, image in zip(batch[R.SOURCE_ROW], batch[R.IMAGE], strict=True):
            if image is not None:
                size[row] = float(len(image))
                sharpness[row] = laplacian_variance(image)
    return {"laplacian_variance": np.array([sharpness.get(r, np.nan) for r in rows]),
            "file_size": np.array([size.get(r, np.nan) for r in rows])}


def group_prior_scores(config: EvalConfig, groups: np.ndarray, heads: tuple[str, ...]
                       ) -> dict[str, np.ndarray]:
    """Per head, each row's group mean MOS in ``config.prior_table``."""
    from iqray.pipeline.io.tables import read_table

    if config.group_column is None and config.group_pattern is None:
        raise ValueError("--prior-table needs groups: give --group-column or --group-pattern")
    prior = read_table(config.prior_table, config.storage_config())
    prior_groups = np.array(groups_for(config, config.prior_table, list(range(prior.num_rows)),
                                       table=prior))
    out = {}
    for head, column in config.label_columns(heads).items():
        if column is None:
            continue
        if column not in prior.column_names:
            raise ValueError(f"{config.prior_table}: no MOS column {column!r}")
        mos = prior[column].to_numpy(zero_copy_only=False).astype(float)
        known = np.isfinite(mos)
        means = {g: float(mos[known & (prior_groups == g)].mean())
                 for g in set(prior_groups[known].tolist())}
        overall = float(mos[known].mean())
        out[head] = np.array([means.get(g, overall) for g in groups])
    return out


def group_breakdown(pred: np.ndarray, mos: np.ndarray, groups: np.ndarray) -> dict:
    """Agreement within each group, with the group's mean prediction and mean MOS."""
    from iqray.model.metrics import agreement

    out = {}
    for group in sorted(set(groups.tolist())):
        mask = groups == group
        out[group] = {**agreement(pred[mask], mos[mask]),
                      "mean_prediction": float(np.nanmean(pred[mask])),
                      "mean_mos": float(np.nanmean(mos[mask]))}
    return out


def run_eval(config: EvalConfig, log=log) -> dict:
    import iqray.model
    from iqray.model.metrics import (
        agreement,
        bootstrap_srcc_ci,
        bootstrap_srcc_difference,
        json_ready,
        srcc,
        within_groups_srcc,
    )

    image_root = config.image_root or (config.input.rsplit("/", 1)[0]
                                       if "/" in config.input else ".")
    model = iqray.model.load(config.model, device="cpu", allow_download=False, mode=config.mode)
    heads = model_heads(model)
    if not architecture(model).embedding_cache:  # scores from images
        labelled = image_rows(config, config.input, image_root, model)
        scores = model.score(labelled.pixels, batch_size=64)
    else:
        cache = embed_table(config, config.input, image_root, log=lambda *a: None)
        labelled = labelled_rows(config.model_copy(update={"image_root": image_root}),
                                 config.input, cache, heads)
        if model.config.prompt_aware:
            model.prime_prompt_cache(cache.load_prompts({p for p in labelled.prompts if p}))
        data = head_data(cache, labelled, {h: (0.0, 1.0) for h in heads})
        scores = model.score_embeddings(*data.embeddings, labelled.prompts)
    rows = labelled.rows
    groups = np.array(groups_for(config, config.input, rows))
    report: dict = {"model": config.model, "data": config.input, "rows": len(rows),
                    "mode": model.mode, "heads": {}}
    baselines = baseline_scores(config.model_copy(update={"image_root": image_root}), rows) \
        if config.baselines else {}
    prior = group_prior_scores(config, groups, heads) if config.prior_table else {}
    for head in heads:
        mos = labelled.mos[head]
        if head not in scores or np.isfinite(mos).sum() < 3:
            continue
        pred = scores[head]
        result = agreement(pred, mos)
        if config.bootstrap:
            result["srcc_ci95"] = list(bootstrap_srcc_ci(pred, mos, samples=config.bootstrap))
        result["groups"] = group_breakdown(pred, mos, groups)
        # Each row scored by its group's mean prediction: how well the model orders the
        # groups alone (compare group_prior), apart from ranking within them.
        result["between_groups_srcc"] = srcc(
            np.array([result["groups"][g]["mean_prediction"] for g in groups]), mos)
        head_baselines = {**baselines, **({"group_prior": prior[head]} if head in prior
                                          else {})}
        # Ranking inside each group (one generator), where a group prior ranks nothing.
        result["within_groups"] = within_groups_srcc(pred, mos, groups)
        result["baselines"] = {
            name: {**agreement(values, mos), "within_groups": within_groups_srcc(values, mos,
                                                                                 groups)}
            for name, values in head_baselines.items()}
        if config.bootstrap:
            for name, values in head_baselines.items():
                result["baselines"][name]["model_minus_baseline"] = bootstrap_srcc_difference(
                    pred, values, mos, samples=config.bootstrap)
        report["heads"][head] = result
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    # Undefined metrics (NaN in ``report``) are written as null.
    (output / "eval.json").write_text(json.dumps(json_ready(report), indent=2,
                                                 allow_nan=False) + "\n")
    plot_scatter(scores, labelled.mos, groups, report, output / "scatter.png")
    for head, result in report["heads"].items():
        low, high = result.get("srcc_ci95", [float("nan")] * 2)
        base = ", ".join(f"{k} {v['srcc']:.3f}" + (
            f" (model better in {v['model_minus_baseline']['p_better']:.0%} of resamples)"
            if "model_minus_baseline" in v else "") for k, v in result["baselines"].items())
        log(f"{head}: SRCC {result['srcc']:.3f} [{low:.3f}, {high:.3f}], KRCC "
            f"{result['krcc']:.3f}, PLCC {result['plcc']:.3f}, PLCC (logistic) "
            f"{result['plcc_logistic']:.3f} on {result['n']} rows"
            + (f"; baselines SRCC: {base}" if base else ""))
        if result["within_groups"]["groups"] > 1:
            inside = ", ".join(
                f"{k} {v['within_groups']['srcc']:.3f}" if v["within_groups"]["groups"]
                else f"{k} none (constant inside each group)"
                for k, v in result["baselines"].items())
            log(f"{head} within groups (mean SRCC inside each of "
                f"{result['within_groups']['groups']} groups): model "
                f"{result['within_groups']['srcc']:.3f}" + (f", {inside}" if inside else ""))
    log(f"wrote {output}/eval.json and scatter.png")
    return report


def plot_scatter(scores, mos, groups, report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = list(report["heads"])
    fig, axes = plt.subplots(1, max(len(heads), 1), figsize=(5.5 * max(len(heads), 1), 4.5),
                             squeeze=False)
    names = sorted(set(groups))
    colours = plt.get_cmap("tab10")
    for ax, head in zip(axes[0], heads, strict=False):
        for i, group in enumerate(names):
            mask = np.array(groups) == group
            ax.scatter(scores[head][mask], mos[head][mask], s=10, alpha=0.7,
                       color=colours(i % 10), label=group)
        result = report["heads"][head]
        ax.set(title=f"{head}: SRCC {result['srcc']:.3f}, PLCC {result['plcc_logistic']:.3f}",
               xlabel="prediction", ylabel="MOS")
        ax.legend(fontsize=7, markerscale=1.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
