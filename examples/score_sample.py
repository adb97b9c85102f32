"""Score the shipped sample with the Python API and compare with the human opinion scores.

    python examples/score_sample.py [--model NAME_OR_CHECKPOINT] [--device cpu|cuda|auto]

Writes out/sample_scores.csv and prints a table plus Spearman correlations with the MOS.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

import iqray.model

SAMPLE = Path(__file__).resolve().parent / "sample"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=iqray.model.DEFAULT_MODEL,
                        help="preset name or checkpoint path (default: %(default)s)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="out/sample_scores.csv")
    args = parser.parse_args()

    with open(SAMPLE / "prompts.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    started = time.perf_counter()
    model = iqray.model.load(args.model, device=args.device)
    loaded = time.perf_counter()
    scores = model.score([SAMPLE / "images" / r["name"] for r in rows],
                         [r["prompt"] for r in rows], batch_size=args.batch_size)
    scored = time.perf_counter()

    counts = model.parameter_counts()
    print(f"model: {args.model} ({model.mode}) on {model.device}; "
          f"{counts['trainable']:,} trainable + {counts['frozen']:,} frozen parameters")
    print(model.config.description)
    for name, spec in model.score_range.items():
        print(f"  {name}: [{spec.low:g}, {spec.high:g}], higher is better; {spec.description}")
    print(f"\n{'image':34} {'quality':>8} {'align':>7} {'MOS q':>6} {'MOS a':>6}  prompt")
    for row, quality, alignment in zip(rows, scores["quality"], scores["alignment"], strict=True):
        print(f"{row['name']:34} {quality:8.3f} {alignment:7.3f} "
              f"{float(row['mos_quality']):6.2f} {float(row['mos_align']):6.2f}  "
              f"{row['prompt'][:48]}")

    mos_q = np.array([float(r["mos_quality"]) for r in rows])
    mos_a = np.array([float(r["mos_align"]) for r in rows])
    srcc_q = spearmanr(scores["quality"], mos_q).statistic
    srcc_a = spearmanr(scores["alignment"], mos_a).statistic
    print(f"\n{len(rows)} images scored in {scored - loaded:.2f} s "
          f"({len(rows) / (scored - loaded):.1f} img/s; model load {loaded - started:.2f} s)")
    print(f"Spearman vs human MOS on this sample: quality {srcc_q:+.3f}, "
          f"alignment {srcc_a:+.3f}")
    if model.zero_shot and model.config.coarse.pretrained is None:
        print("NOTE: zero-shot heads on RANDOM-INIT towers: these scores carry no meaning; "
              "they show the pipeline runs. Load pretrained CLIP towers "
              "(`--model mst-clipiqa`, needs the open_clip weights cached) or a trained "
              "checkpoint for real scores.")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "prompt", "quality", "alignment", "prompt_truncated",
                         "score_mode"])
        for row, q, a, t in zip(rows, scores["quality"], scores["alignment"],
                                scores["prompt_truncated"], strict=True):
            writer.writerow([row["name"], row["prompt"], f"{q:.6f}", f"{a:.6f}", bool(t),
                             model.mode])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
