"""Small runs: `iqray score` on 200 AGIQA-3K images, in process (--executor local) and on Ray
(--executor ray), against a 10-line loop over ``iqray.model.load(...).score`` in one process.

Each is a fresh process timed from start to exit (what a user waits for), three times,
interleaved; the medians and their ratios to the loop go to ``<out>/small_run.json``, a table
to ``small_run.md`` and a bar chart to ``small_run.png``. Not part of the package or the test
suite: run it on a quiet machine.

    .venv/bin/python benchmarks/small_run.py --out benchmarks/cpu-2core
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "agiqa3k"

HAND_LOOP = """
import csv, sys
import iqray.model
model = iqray.model.load(iqray.model.DEFAULT_MODEL)
with open(sys.argv[1], newline="") as handle:
    rows = list(csv.DictReader(handle))
paths = [sys.argv[2] + "/" + row["name"] for row in rows]
prompts = [row["prompt"] for row in rows]
for start in range(0, len(paths), 32):
    model.score(paths[start:start + 32], prompts[start:start + 32])
"""


def timed(command: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for split in ("val.csv", "train.csv"):  # val first: the 200-image figure's rows
        with open(DATA / split, newline="") as handle:
            rows += list(csv.DictReader(handle))
    rows = rows[:args.images]
    python = sys.executable
    iqray = [python, "-m", "iqray.jobs.cli", "score"]
    times: dict[str, list[float]] = {"hand loop": [], "iqray score --executor local": [],
                                     "iqray score --executor ray": []}
    with tempfile.TemporaryDirectory(prefix="iqray-small-run-") as work:
        table = Path(work) / "images.csv"
        with open(table, "w", newline="") as handle:
            writer = csv.DictWriter(handle, ["name", "prompt"])
            writer.writeheader()
            writer.writerows({"name": r["name"], "prompt": r["prompt"]} for r in rows)
        images = str(DATA / "images")
        for repeat in range(args.repeats):
            times["hand loop"].append(timed([python, "-c", HAND_LOOP, str(table), images],
                                            REPO))
            for executor in ("local", "ray"):
                output = Path(work) / f"out-{executor}-{repeat}"
                times[f"iqray score --executor {executor}"].append(timed(
                    [*iqray, str(table), str(output), "--image-path-column", "name",
                     "--image-root", images, "--executor", executor, "--no-progress"], REPO))
            print(f"repeat {repeat + 1}: " + ", ".join(
                f"{name} {values[-1]:.1f} s" for name, values in times.items()), flush=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    loop = medians["hand loop"]
    result = {"images": len(rows), "repeats": args.repeats, "cpus": os.cpu_count(),
              "machine": platform.platform(), "seconds": times, "median_s": medians,
              "ratio_to_hand_loop": {name: round(value / loop, 3)
                                     for name, value in medians.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "small_run.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Small run: {len(rows)} AGIQA-3K images, shipped model, {os.cpu_count()} CPUs",
             "", "Wall time of a fresh process, start to exit; median of "
             f"{args.repeats}, interleaved (`benchmarks/small_run.py`).", "",
             "| run | median s | runs (s) | ratio to the loop |", "|---|---|---|---|"]
    lines += [f"| {name} | {medians[name]:.2f} | "
              f"{', '.join(f'{v:.2f}' for v in times[name])} | "
              f"{result['ratio_to_hand_loop'][name]:.2f} |" for name in times]
    (args.out / "small_run.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3))
    names = list(times)
    axis.barh(names, [medians[n] for n in names], color=["0.6", "tab:green", "tab:blue"])
    for number, name in enumerate(names):
        axis.text(medians[name], number, f"  {medians[name]:.1f} s "
                  f"({result['ratio_to_hand_loop'][name]:.2f}x)", va="center")
    axis.set_xlabel("seconds, start to exit (median)")
    axis.set_title(f"{len(rows)} images: iqray score against a loop over model.score")
    axis.set_xlim(0, max(medians.values()) * 1.35)
    figure.tight_layout()
    figure.savefig(args.out / "small_run.png", dpi=110)
    print(json.dumps(result["ratio_to_hand_loop"]))


if __name__ == "__main__":
    main()
