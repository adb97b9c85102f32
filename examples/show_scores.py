"""Print `iqray score` output for the shipped sample next to the human opinion scores.

    python examples/show_scores.py out/sample-scores
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
from scipy.stats import spearmanr

SAMPLE = Path(__file__).resolve().parent / "sample"


def main(output: str) -> None:
    table = pq.read_table(output)  # every shard's Parquet in the folder
    meta = json.loads(pq.read_schema(next(Path(output).glob("*.parquet"))).metadata[b"iqray"])
    with open(SAMPLE / "prompts.csv", newline="") as handle:
        human = {row["name"]: row for row in csv.DictReader(handle)}
    rows = sorted(table.to_pylist(), key=lambda r: r["key"])
    print(f"\n{output}: {table.num_rows} rows from model {meta['model']} "
          f"({meta['score_mode']}), columns: {', '.join(table.column_names)}")
    print(f"{'image':34} {'quality':>8} {'align':>7} {'MOS q':>6} {'MOS a':>6} status")
    pairs = []
    for row in rows:
        mos = human[Path(row["key"]).name]
        pairs.append((row["quality"], row["alignment"], float(mos["mos_quality"]),
                      float(mos["mos_align"])))
        print(f"{Path(row['key']).name:34} {row['quality']:8.3f} {row['alignment']:7.3f} "
              f"{pairs[-1][2]:6.2f} {pairs[-1][3]:6.2f} {row['status']}")
    quality, alignment, mos_q, mos_a = zip(*pairs, strict=True)
    print(f"Spearman vs human MOS on this sample: quality "
          f"{spearmanr(quality, mos_q).statistic:+.3f}, alignment "
          f"{spearmanr(alignment, mos_a).statistic:+.3f}")
    if meta["model"] == "iqray-small-agiqa3k":
        print("NOTE: the shipped model is small and trained from scratch on AGIQA-3K's train "
              "split, which these 32 images come from: agreement here is optimistic. On the "
              "held-apart val prompts see the README table. Pretrained CLIP towers trained "
              "with `iqray train` are the real thing.")
    if meta["model"] == "mst-clipiqa-tiny-random":
        print("NOTE: the default model has RANDOM-INIT tiny towers with zero-shot heads: these "
              "scores carry no meaning; they show the pipeline end to end. Use `--model "
              "mst-clipiqa` (open_clip weights cached) or a trained checkpoint for real scores.")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/sample-scores")
