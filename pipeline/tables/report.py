"""A self-contained HTML report of a score run: one file, no network needed to view it.

Plots are matplotlib figures embedded as PNG data URIs; image grids are JPEG thumbnails
embedded the same way. Sections (element ids): ``summary`` (counts per group), ``histograms``
(quality and alignment, overall and per group), ``scatter`` (quality vs alignment by group),
``meaning`` (each score's range, direction and how it is made, from the run's footer),
``grids`` (best and worst quality and worst aligned images per group, with prompts and
scores), ``errors`` (counts by kind with examples).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from collections import Counter

import numpy as np
import pyarrow as pa

from iqray.pipeline.tables.runs import score_values

SCORES = ("quality", "alignment")


def _png(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def thumbnail(image: bytes, size: int = 160) -> str:
    from PIL import Image

    from iqray.model.preprocess import open_image

    picture = open_image(image)
    picture.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def histograms(table: pa.Table, groups: np.ndarray) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(set(groups))
    figure, axes = plt.subplots(1, 2, figsize=(14, 3.8))
    for axis, score in zip(axes, SCORES, strict=True):
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


def scatter(table: pa.Table, groups: np.ndarray) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quality, alignment = score_values(table, "quality"), score_values(table, "alignment")
    figure, axis = plt.subplots(figsize=(14, 5))
    for i, name in enumerate(sorted(set(groups))):
        member = (groups == name) & np.isfinite(quality) & np.isfinite(alignment)
        axis.scatter(quality[member], alignment[member], s=10, alpha=0.7,
                     color=plt.cm.tab10(i % 10), label=name)
    axis.set_xlabel("quality")
    axis.set_ylabel("alignment")
    axis.set_title("quality vs alignment")
    if len(set(groups)) > 1:
        axis.legend(fontsize=7, frameon=False, markerscale=2)
    return _png(figure)


def build_report(table: pa.Table, groups: np.ndarray, images: dict[int, bytes],
                 grid_rows: dict[str, dict[str, list[int]]], metadata: dict,
                 title: str) -> str:
    """The HTML document. ``grid_rows[group]['best'|'worst']`` are row indices to show;
    ``images`` holds their bytes."""
    quality, alignment = score_values(table, "quality"), score_values(table, "alignment")
    status = np.array(table["status"].to_pylist())
    prompts = table["prompt"].to_pylist() if "prompt" in table.column_names else \
        [None] * table.num_rows
    keys = [str(k) for k in table["key"].to_pylist()]
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p class=meta>model <code>{html.escape(str(metadata.get('model')))}</code>, "
             f"{table.num_rows} rows, built "
             f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC by iqray report</p>"]

    rows = []
    for name in sorted(set(groups)):
        member = groups == name
        rows.append((name, int(member.sum()), int((status[member] == "ok").sum()),
                     int((status[member] != "ok").sum()), _mean(quality[member]),
                     _mean(alignment[member])))
    rows.append(("all", table.num_rows, int((status == "ok").sum()),
                 int((status != "ok").sum()), _mean(quality), _mean(alignment)))
    parts.append("<section id=summary><h2>Counts</h2><table><tr><th>group</th><th>rows</th>"
                 "<th>scored</th><th>errors</th><th>mean quality</th><th>mean alignment</th>"
                 "</tr>" + "".join(
                     f"<tr><td>{html.escape(n)}</td><td>{r}</td><td>{ok}</td><td>{e}</td>"
                     f"<td>{q}</td><td>{a}</td></tr>" for n, r, ok, e, q, a in rows)
                 + "</table></section>")
    parts.append(_meaning(metadata))
    parts.append(f"<section id=histograms><h2>Score distributions</h2>"
                 f"<img alt='histograms' src='{histograms(table, groups)}'></section>")
    parts.append(f"<section id=scatter><h2>Quality vs alignment</h2>"
                 f"<img alt='scatter' src='{scatter(table, groups)}'></section>")

    grids = ["<section id=grids><h2>Best and worst images</h2>"
             "<p>Per group: the highest and lowest quality, and the images that match their "
             "prompt least.</p>"]
    for name, sides in grid_rows.items():
        grids.append(f"<h3>{html.escape(name)}</h3>")
        for side, indices in sides.items():
            if not indices:
                continue
            cells = "".join(
                f"<figure><img alt='{html.escape(keys[i])}' src='{thumbnail(images[i])}'>"
                f"<figcaption><b>q {quality[i]:.2f}</b> · a {_fmt(alignment[i])}<br>"
                f"{html.escape((prompts[i] or '')[:120])}<br><small>"
                f"{html.escape(keys[i])}</small></figcaption></figure>"
                for i in indices if i in images)
            grids.append(f"<div class=side><h4>{side}</h4><div class=grid>{cells}"
                         "</div></div>")
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


def grid_choice(table: pa.Table, groups: np.ndarray, per_side: int, max_groups: int
                ) -> dict[str, dict[str, list[int]]]:
    """Row indices of the best and worst ``per_side`` scored images of each group by
    quality, and its worst aligned ones (where there are prompts), for the largest
    ``max_groups`` groups."""
    quality = score_values(table, "quality")
    alignment = score_values(table, "alignment")
    sizes = Counter(groups[np.isfinite(quality)])
    chosen: dict[str, dict[str, list[int]]] = {}
    for name, _ in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))[:max_groups]:
        member = np.flatnonzero((groups == name) & np.isfinite(quality))
        ordered = member[np.argsort(-quality[member], kind="stable")]
        best = ordered[:per_side].tolist()
        worst = [i for i in ordered[::-1][:per_side].tolist() if i not in best]
        aligned = np.flatnonzero((groups == name) & np.isfinite(alignment))
        least = aligned[np.argsort(alignment[aligned], kind="stable")][:per_side].tolist()
        chosen[name] = {"best quality": best, "worst quality": worst,
                        "worst aligned": least}
    return chosen
