"""The Python API on the shipped sample: load a model, score images with their prompts.

    python examples/score_sample.py [--model NAME_OR_CHECKPOINT] [--device cpu|cuda|auto]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import iqray.model

SAMPLE = Path(__file__).resolve().parent / "sample"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=iqray.model.DEFAULT_MODEL)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    with open(SAMPLE / "prompts.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    model = iqray.model.load(args.model, device=args.device)
    scores = model.score([SAMPLE / "images" / r["name"] for r in rows],
                         [r["prompt"] for r in rows], batch_size=16)
    print(f"{args.model}: {model.mode}, {model.parameter_counts()['trainable']:,} trainable "
          "parameters")
    for name, spec in model.score_range.items():
        print(f"  {name} in [{spec.low:g}, {spec.high:g}]: {spec.description}")
    for row, quality, alignment in zip(rows, scores["quality"], scores["alignment"],
                                       strict=True):
        print(f"{row['name']:34} quality {quality:6.3f}  alignment {alignment:6.3f}")


if __name__ == "__main__":
    main()
