"""A self-contained HTML report of a score run: one file, no network needed to view it.

Plots are matplotlib figures embedded as PNG data URIs; image grids are JPEG thumbnails
embedded the same way. The scores shown are the outputs the run's footer lists (any
architecture: MST-CLIPIQA's quality and alignment, BPCLIP's quality and its dimensions); the
first is the primary score. Sections (element ids): ``summary`` (counts and each score's mean
per group), ``histograms`` (every score, overall and per group), ``scatter`` (the primary score
against each other score, by group), ``meaning`` (each score's range, direction and how it is
made, from the run's footer), ``grids`` (best and worst images by the primary score per group,
and the worst by each score that reads the prompt, captioned with every score),
``errors`` (counts by kind with examples).

Imports neither torch nor Ray (thumbnails decode through :mod:`iqray.model.images`).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from collections import Counter

import numpy as np
import pyarrow as pa

from iqray.pipeline.tables.runs import score_values, table_outputs


def score_names(table: pa.Table, metadata: dict) -> list[str]:
    """The score columns of a run, in the order its footer lists them (the first is the
    primary score); only those the table holds."""
    return table_outputs(table, metadata).names


def _png(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def thumbnail(image: bytes, size: int = 160) -> str:
    from PIL import Image

    from iqray.model.images import open_image

    picture = open_image(image)
    picture.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _axes(count: int, height: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(count, 3)
    rows = -(-count // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(14, height * rows), squeeze=False)
    for axis in axes.flat[count:]:
        axis.set_visible(False)
    return plt, figure, list(axes.flat[:count])


def histograms(table: pa.Table, groups: np.ndarray, scores: list[str]) -> str:
    names = sorted(set(groups))
    plt, figure, axes = _axes(len(scores), 3.8)
    for axis, score in zip(axes, scores, strict=True):
        values = score_values(table, score)
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            axis.set_title(f"{score}: no scores")
            continue
        bins = np.linspace(finite.min(), finite.max() + 1e-9, 25)
        axis.hist(finite, bins=bins, color="0.8", label="all")
        if len(names) > 1:
            for i, name in enumerate(names):
                member = values[(groups == name) & np.isfinite(values)]
                axis.hist(member, bins=bins, histtype="step", linewidth=1.5,
                          color=plt.cm.tab10(i % 10), label=name)
        axis.set_xlabel(score)
        axis.set_ylabel("images")
        axis.set_title(f"{score} (n={finite.size})")
    axes[0].legend(fontsize=7, frameon=False)
    return _png(figure)


def scatter(table: pa.Table, groups: np.ndarray, scores: list[str]) -> str | None:
    """The primary score against each other score, coloured by group; None with one score."""
    primary, others = scores[0], scores[1:]
    if not others:
        return None
    plt, figure, axes = _axes(len(others), 5.0 if len(others) == 1 else 4.0)
    x = score_values(table, primary)
    for axis, other in zip(axes, others, strict=True):
        y = score_values(table, other)
        for i, name in enumerate(sorted(set(groups))):
            member = (groups == name) & np.isfinite(x) & np.isfinite(y)
            axis.scatter(x[member], y[member], s=10, alpha=0.7,
                         color=plt.cm.tab10(i % 10), label=name)
        axis.set_xlabel(primary)
        axis.set_ylabel(other)
        axis.set_title(f"{primary} vs {other}")
    if len(set(groups)) > 1:
        axes[0].legend(fontsize=7, frameon=False, markerscale=2)
    return _png(figure)


def build_report(table: pa.Table, groups: np.ndarray, images: dict[int, bytes],
                 grid_rows: dict[str, dict[str, list[int]]], metadata: dict,
                 title: str) -> str:
    """The HTML document. ``grid_rows[group][side]`` are row indices to show; ``images``
    holds their bytes."""
    scores = score_names(table, metadata)
    values = {name: score_values(table, name) for name in scores}
    status = np.array(table["status"].to_pylist())
    prompts = table["prompt"].to_pylist() if "prompt" in table.column_names else \
        [None] * table.num_rows
    keys = [str(k) for k in table["key"].to_pylist()]
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p class=meta>model <code>{html.escape(str(metadata.get('model')))}</code>, "
             f"{table.num_rows} rows, built "
             f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC by iqray report</p>"]

    rows = []
    for name, member in [(n, groups == n) for n in sorted(set(groups))] + \
            [("all", np.ones(table.num_rows, bool))]:
        rows.append((name, int(member.sum()), int((status[member] == "ok").sum()),
                     int((status[member] != "ok").sum()),
                     [_mean(values[score][member]) for score in scores]))
    header = "".join(f"<th>mean {html.escape(score)}</th>" for score in scores)
    parts.append("<section id=summary><h2>Counts</h2><table><tr><th>group</th><th>rows</th>"
                 f"<th>scored</th><th>errors</th>{header}</tr>" + "".join(
                     f"<tr><td>{html.escape(n)}</td><td>{r}</td><td>{ok}</td><td>{e}</td>"
                     + "".join(f"<td>{m}</td>" for m in means) + "</tr>"
                     for n, r, ok, e, means in rows)
                 + "</table></section>")
    parts.append(_meaning(metadata))
    parts.append(f"<section id=histograms><h2>Score distributions</h2>"
                 f"<img alt='histograms' src='{histograms(table, groups, scores)}'></section>")
    pairs = scatter(table, groups, scores)
    parts.append("<section id=scatter><h2>" + html.escape(
        f"{scores[0]} against the other scores") + "</h2>" + (
        f"<img alt='scatter' src='{pairs}'>" if pairs else
        f"<p>The run has one score ({html.escape(scores[0])}).</p>") + "</section>")

    grids = ["<section id=grids><h2>Best and worst images</h2>"
             f"<p>Per group: the best and worst by {html.escape(scores[0])}"
             + "".join(f", and the worst by {html.escape(name)}"
                       for name in table_outputs(table, metadata).prompt_scores
                       if name != scores[0]) + ".</p>"]
    for name, sides in grid_rows.items():
        grids.append(f"<h3>{html.escape(name)}</h3>")
        for side, indices in sides.items():
            if not indices:
                continue
            cells = "".join(
                f"<figure><img alt='{html.escape(keys[i])}' src='{thumbnail(images[i])}'>"
                f"<figcaption>{_caption(scores, values, i)}<br>"
                f"{html.escape((prompts[i] or '')[:120])}<br><small>"
                f"{html.escape(keys[i])}</small></figcaption></figure>"
                for i in indices if i in images)
            grids.append(f"<div class=side><h4>{html.escape(side)}</h4><div class=grid>"
                         f"{cells}</div></div>")
    grids.append("</section>")
    parts.append("".join(grids))

    kinds = Counter(k for k in (table["error_kind"].to_pylist() if "error_kind" in
                                table.column_names else []) if k)
    examples: dict[str, str] = {}
    if "error" in table.column_names:
        for kind, message in zip(table["error_kind"].to_pylist(), table["error"].to_pylist(),
                                 strict=True):
            if kind and kind not in examples:
                examples[kind] = message or ""
    error_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{n}</td><td><small>"
                         f"{html.escape(examples.get(k, '')[:200])}</small></td></tr>"
                         for k, n in kinds.most_common())
    parts.append("<section id=errors><h2>Errors</h2>" + (
        f"<table><tr><th>kind</th><th>rows</th><th>example</th></tr>{error_rows}</table>"
        if kinds else "<p>No errors.</p>") + "</section>")
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}"
             "section>img{width:100%;height:auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:right}td:first-child,th:first-child{text-align:left}"
             ".grid{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;width:170px;"
             "font-size:12px}figure img{width:160px;height:auto;border-radius:4px}"
             ".meta{color:#666}section{margin-bottom:2em}figcaption small{word-break:break-all}")
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            f"<title>{html.escape(title)}</title><style>{style}</style></head><body>"
            + "".join(parts) + "</body></html>")


def _meaning(metadata: dict) -> str:
    """What each score column means: its range and direction as the scoring run recorded
    them (``score_range`` in the output footer), and how the model made it."""
    ranges = metadata.get("score_range") or {}
    if not ranges:
        return ("<section id=meaning><h2>What the scores mean</h2><p>This score run predates "
                "recorded score ranges; <code>iqray info --model MODEL</code> describes "
                "them.</p></section>")
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{spec['low']:g} – {spec['high']:g}</td>"
        f"<td>{'higher' if spec['higher_better'] else 'lower'} is better</td>"
        f"<td>{html.escape(spec['description'])}</td></tr>" for name, spec in ranges.items())
    mode = metadata.get("score_mode")
    note = (" Zero-shot scores compare images with text prompts; they rank, but their scale "
            "is not a human rating." if mode == "zero-shot" else
            " Trained scores are on the scale of the ratings the model was trained on.")
    return ("<section id=meaning><h2>What the scores mean</h2>"
            f"<p>Model <code>{html.escape(str(metadata.get('model')))}</code>, "
            f"{html.escape(str(mode))}.{note}</p><table><tr><th>score</th><th>range</th>"
            f"<th>direction</th><th>how it is made</th></tr>{rows}</table></section>")


def _mean(values: np.ndarray) -> str:
    finite = values[np.isfinite(values)]
    return f"{finite.mean():.3f}" if finite.size else "–"


def _fmt(value: float) -> str:
    return f"{value:.2f}" if np.isfinite(value) else "–"


def _caption(scores: list[str], values: dict[str, np.ndarray], row: int) -> str:
    """Every score of one image, the primary in bold."""
    shown = [f"{html.escape(name)} {_fmt(values[name][row])}" for name in scores]
    return " · ".join([f"<b>{shown[0]}</b>", *shown[1:]])


def grid_choice(table: pa.Table, groups: np.ndarray, per_side: int, max_groups: int,
                metadata: dict | None = None) -> dict[str, dict[str, list[int]]]:
    """Row indices of the best and worst ``per_side`` scored images of each group by the
    primary score (in its own direction), and the worst by each score that compares the
    image with its prompt (e.g. alignment), for the largest ``max_groups`` groups."""
    outputs = table_outputs(table, metadata or {})
    primary = outputs.primary

    def goodness_of(name: str) -> np.ndarray:
        return (1.0 if outputs.higher_better(name) else -1.0) * score_values(table, name)

    goodness = goodness_of(primary)
    sizes = Counter(groups[np.isfinite(goodness)])
    chosen: dict[str, dict[str, list[int]]] = {}
    for name, _ in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))[:max_groups]:
        member = np.flatnonzero((groups == name) & np.isfinite(goodness))
        ordered = member[np.argsort(-goodness[member], kind="stable")]
        best = ordered[:per_side].tolist()
        worst = [i for i in ordered[::-1][:per_side].tolist() if i not in best]
        chosen[name] = {f"best {primary}": best, f"worst {primary}": worst}
        for prompt_score in outputs.prompt_scores:
            if prompt_score == primary:
                continue
            values = goodness_of(prompt_score)
            scored = np.flatnonzero((groups == name) & np.isfinite(values))
            chosen[name][f"worst {prompt_score}"] = \
                scored[np.argsort(values[scored], kind="stable")][:per_side].tolist()
    return chosen
