"""`iqray bench --measure overhead`: the pipeline's own ceiling, with the model taken out.

The model stage keeps its place in the graph but scores nothing (the ``constant``
architecture of :mod:`iqray_bench.constant`: the same Scorer stage, rows and columns,
constant scores), so what is left is what iqray itself costs
per row: reading, decoding, moving crops through the object store, the model stage's
bookkeeping, the driver loop and the shard commits. Measured two ways on the same input:

- each stage alone, in this process, without Ray (CPU seconds per 1,000 rows);
- the whole of `iqray score` through Ray, once per ``--commit`` mode, with the CPU time of
  the driver process and of every other process of the local cluster (from /proc).

A cluster adds read, decode and model workers with its nodes; it has one driver. The
driver's CPU seconds per row therefore set a ceiling no cluster size lifts:
``rows / driver CPU seconds`` (one core: the driver loop holds Python's GIL).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

# The projection the issue asks for: 64 GPUs at 5,000 img/s each.
PROJECTED_GPUS = 64
PROJECTED_ROWS_PER_GPU = 5000


_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (all its threads), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:  # exited between listing and reading
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def tree_cpu_s() -> dict[int, float]:
    """CPU seconds of this process and every process below it (the local Ray cluster)."""
    from iqray_bench.measure import process_tree

    return {pid: process_cpu_s(pid) for pid in process_tree(os.getpid())}


def constant_model(base: str, crop: int, folder: Path) -> str:
    """A checkpoint folder of the constant model standing in for ``base`` (its outputs, at
    ``crop`` px; no weights): small crops keep decode and object-store transfers cheap, so
    that rows arrive fast enough to load the driver, whose cost per row does not depend on
    their size."""
    import json

    import iqray_bench.constant  # noqa: F401  registers the architecture
    from iqray.model.config import load_preset
    from iqray.model.files import CONFIG_NAME, FORMAT, FORMAT_VERSION

    stands_for = load_preset(base)
    config = {"architecture": "constant", "image_size": crop,
              "outputs": list(stands_for.output_names),
              "prompt_aware": stands_for.prompt_aware,
              "description": f"{base}'s outputs at {crop} px: iqray bench's constant model "
                             "(no weights; scores nothing)"}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(
        {"format": FORMAT, "format_version": FORMAT_VERSION, "model": config}))
    return str(folder)


def stage_costs(model_name: str, folder: Path, output: Path, batch_size: int,
                decode_batch_size: int) -> dict[str, Any]:
    """CPU seconds per 1,000 rows of each stage run alone in this process, no Ray: the
    reader, decode, the constant model stage, the numpy -> Arrow conversion Ray Data makes
    of the stage's output, and the ShardWriter (split by shard, Parquet, atomic commit)."""
    from iqray.pipeline import rows as R
    from iqray.pipeline.decode import decode_batch
    from iqray.pipeline.io.discovery import discover_shards, inspect_input
    from iqray.pipeline.io.read import read_shard
    from iqray.pipeline.io.shards import ReadConfig
    from iqray.pipeline.io.storage import StorageConfig
    from iqray.pipeline.io.writer import ShardWriter, score_schema
    from iqray.pipeline.scoring import Scorer
    from iqray.pipeline.staging import stage_model

    read, storage = ReadConfig(key_columns=["key"]), StorageConfig()
    spec = stage_model(model_name, storage)
    shards = discover_shards(str(folder), read, storage)
    keys = inspect_input(shards, read, storage)
    cpu: dict[str, float] = {}

    def timed(name: str, work):
        started = time.process_time()
        out = work()
        cpu[name] = time.process_time() - started
        return out

    def read_all() -> list[dict]:
        batches = []
        for shard in shards:
            for columns in read_shard(shard, read, storage, keys, on_failure="marker"):
                columns = {k: R.column(v) for k, v in columns.items()}
                count = len(columns[R.SOURCE_ROW])
                batches += [{k: v[i:i + decode_batch_size] for k, v in columns.items()}
                            for i in range(0, count, decode_batch_size)]
        return batches

    batches = timed("read", read_all)
    rows = sum(len(b[R.SOURCE_ROW]) for b in batches)
    decoded = timed("decode", lambda: [decode_batch(
        b, image_size=spec.config.image_size, max_pixels=10**8, timeout_s=None,
        keep_image_bytes=False, fine_resize=spec.config.fine_resize) for b in batches])
    merged = [{k: np.concatenate([b[k] for b in decoded[i:i + batch_size // decode_batch_size]])
               for k in decoded[0]}
              for i in range(0, len(decoded), max(1, batch_size // decode_batch_size))]
    stage = Scorer(spec, device="cpu")
    scored = timed("model stage (constant scores)", lambda: [stage(b) for b in merged])
    from iqray.pipeline.graph import to_block  # the conversion itself; no cluster

    tables = timed("to Arrow (the typed blocks between stages)",
                   lambda: [to_block(b) for b in scored])
    writer = ShardWriter(shards, str(output), storage, {"bench": "overhead"}, complete=True,
                         key_columns=keys, keep_prompt=False, keep_image_bytes=False,
                         schema=score_schema(spec.config.output_names,
                                             spec.config.prompt_aware))

    def write_all() -> None:
        for table in tables:
            writer.add(table)
        writer.finish()

    timed("write (split by shard, Parquet, commit)", write_all)
    if writer.ok != rows or len(writer.committed) != len(shards):
        raise RuntimeError(f"the writer committed {len(writer.committed)} of {len(shards)} "
                           f"shards, {writer.ok} of {rows} rows ok")
    shutil.rmtree(output, ignore_errors=True)
    return {"rows": rows, "shards": len(shards),
            "cpu_s_per_1000_rows": {k: round(v * 1000 / rows, 4) for k, v in cpu.items()}}


def pipeline_overhead(model_name: str, folder: Path, output: Path, batch_size: int,
                      commit: str, decode_batch_size: int) -> dict[str, Any]:
    """`iqray score` over ``folder`` with the constant model: rows/s, CPU seconds per
    1,000 rows on the driver and in the rest of the cluster, the driver's share, its ceiling,
    and the run's timeline (where its first seconds went)."""
    from iqray.jobs.score import ScoreConfig, run_score

    before = tree_cpu_s()
    wall = time.perf_counter()
    summary = run_score(ScoreConfig(executor="ray",
        input=str(folder), output=str(output), model=model_name, key_columns=["key"],
        batch_size=batch_size, decode_batch_size=decode_batch_size, commit=commit,
        progress=False, keep_prompt=False),
        log=lambda *a: None)
    wall = time.perf_counter() - wall
    after = tree_cpu_s()
    if summary.ok != summary.rows or summary.unfinished or not summary.rows:
        raise RuntimeError(f"overhead run ({commit}): {summary.render()}")
    me = os.getpid()
    driver = after.get(me, 0.0) - before.get(me, 0.0)
    others = sum(v - before.get(pid, 0.0) for pid, v in after.items() if pid != me)
    rows = summary.rows
    # Steady state: the driver's CPU between the first and the last row it received, over
    # the rows in between (start-up, Ray Data planning and the wait for actors left out).
    cpu, at = summary.driver_cpu_s, summary.timeline
    steady_rows = (summary.steady_rows_per_s or 0.0) * (at["last_row"] - at["first_row"])
    steady_cpu = cpu["last_row"] - cpu["first_row"]
    steady_wall = at["last_row"] - at["first_row"]
    if steady_rows < 1 or steady_cpu <= 0:  # all rows in the first block: the whole run
        steady_rows, steady_cpu, steady_wall = rows, driver, wall
    # While it waits for the first row (actors loading) the driver still spends CPU: Ray
    # Data's scheduling loop. Taken off at that rate, the rest is what each row costs it.
    waiting_per_s = ((cpu["first_row"] - cpu["ray_started"])
                     / max(at["first_row"] - at["ray_started"], 1e-9))
    per_row_cpu = max(steady_cpu - waiting_per_s * steady_wall, 1e-9)
    shutil.rmtree(output, ignore_errors=True)
    return {"commit": commit, "decode_batch_size": decode_batch_size, "rows": rows,
            "shards": summary.shards_total,
            "seconds": round(wall, 2), "rows_per_s": round(rows / wall, 1),
            "steady_rows_per_s": round(summary.steady_rows_per_s or 0.0, 1),
            "driver_cpu_s_per_1000_rows": round(driver * 1000 / rows, 4),
            "cluster_cpu_s_per_1000_rows": round(others * 1000 / rows, 4),
            "driver_share": round(driver / max(driver + others, 1e-9), 4),
            "driver_steady_cpu_s_per_1000_rows": round(steady_cpu * 1000 / max(steady_rows, 1),
                                                       4),
            "driver_ceiling_rows_per_s": round(steady_rows / max(steady_cpu, 1e-9)),
            "driver_cpu_s_per_s_waiting": round(waiting_per_s, 4),
            "driver_marginal_ceiling_rows_per_s": round(steady_rows / per_row_cpu),
            "driver_write_s": summary.stage_busy_s.get("write"),
            "timeline": summary.timeline}


def startup(model_name: str, root: Path, rows: int = 256) -> dict[str, Any]:
    """A small real run (the model loaded in its actor): where its seconds go before the
    first scored row reaches the driver, and after. Starts Ray itself when none is up."""
    import ray

    from iqray.jobs.score import ScoreConfig, run_score
    from iqray_bench.measure import synthetic_image_input

    cold = not ray.is_initialized()
    folder = synthetic_image_input(root / "startup", rows, max(1, rows // 4), rows // 4,
                                   size=32, distinct_images=64)
    summary = run_score(ScoreConfig(executor="ray", input=str(folder),
                                    output=str(root / "startup-out"),
                                    model=model_name, key_columns=["key"], progress=False),
                        log=lambda *a: None)
    shutil.rmtree(root / "startup", ignore_errors=True)
    shutil.rmtree(root / "startup-out", ignore_errors=True)
    return {"model": model_name, "rows": summary.rows, "ray_started_by_run": cold,
            "seconds": round(summary.wall_s, 2), "timeline": summary.timeline}


def projection(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Can one driver carry a 64-GPU cluster at 5,000 img/s per GPU, in each run's mode?"""
    needed = PROJECTED_GPUS * PROJECTED_ROWS_PER_GPU
    return {"gpus": PROJECTED_GPUS, "rows_per_s_per_gpu": PROJECTED_ROWS_PER_GPU,
            "rows_per_s_needed": needed,
            "by_run": {run_name(r): {
                "driver_ceiling_rows_per_s": r["driver_ceiling_rows_per_s"],
                "driver_cores_needed": round(needed / max(r["driver_ceiling_rows_per_s"], 1),
                                             1),
                "marginal_ceiling_rows_per_s": r["driver_marginal_ceiling_rows_per_s"],
                "carries": r["driver_ceiling_rows_per_s"] >= needed} for r in runs}}


def run_name(run: dict[str, Any]) -> str:
    return f"--commit {run['commit']} --decode-batch-size {run['decode_batch_size']}"


def bench_overhead(model_name: str, root: Path, rows: int, shard_rows: int,
                   batch_size: int, decode_batch_sizes: list[int], commits: list[str],
                   crop: int, log) -> dict[str, Any]:
    """The whole measurement: a small real run's start-up, stage costs, one pipeline run per
    commit mode (``model_name``'s config at ``crop`` px), the projection."""
    from iqray_bench.measure import synthetic_image_input

    started = startup(model_name, root)
    constant = constant_model(model_name, crop, root / "constant-model")
    t = started["timeline"]
    log(f"start-up of a {started['rows']}-row run ({model_name}): "
        + ", ".join(f"{k} at {v:.1f} s" for k, v in t.items()))
    folder = synthetic_image_input(root, rows, shard_rows, distinct_prompts=max(1, rows // 4),
                                   size=32, distinct_images=256)
    stages = stage_costs(constant, folder, root / "stage-out", batch_size,
                         decode_batch_sizes[0])
    log("overhead, each stage alone (CPU s per 1,000 rows): " + ", ".join(
        f"{k} {v:.3f}" for k, v in stages["cpu_s_per_1000_rows"].items()))
    runs = []
    for decode_batch_size in decode_batch_sizes:
        for commit in commits:
            runs.append(pipeline_overhead(constant, folder, root / "out", batch_size, commit,
                                          decode_batch_size))
    for run in runs:
        log(f"overhead, iqray score {run_name(run)}, {run['rows']:,} rows in "
            f"{run['shards']} shards: {run['rows_per_s']:,.0f} rows/s; CPU s per 1,000 rows: "
            f"driver {run['driver_cpu_s_per_1000_rows']:.3f}, rest of the cluster "
            f"{run['cluster_cpu_s_per_1000_rows']:.3f} (driver share "
            f"{run['driver_share']:.0%}); driver ceiling "
            f"{run['driver_ceiling_rows_per_s']:,} rows/s")
    shutil.rmtree(folder, ignore_errors=True)
    result = {"model": model_name, "crop_px": crop, "rows": rows, "shard_rows": shard_rows,
              "batch_size": batch_size,
              "image_px": 32, "startup": started,
              "stages": stages, "runs": runs,
              "projection": projection(runs)}
    for name, p in result["projection"]["by_run"].items():
        log(f"projection: {PROJECTED_GPUS} GPUs x {PROJECTED_ROWS_PER_GPU:,} img/s = "
            f"{result['projection']['rows_per_s_needed']:,} rows/s; {name}: the "
            f"driver carries {p['driver_ceiling_rows_per_s']:,} rows/s per core "
            + ("(enough)" if p["carries"] else f"({p['driver_cores_needed']:g} cores needed)"))
    return result


def overhead_table(result: dict[str, Any]) -> str:
    """Markdown of an overhead measurement."""
    stages = result["stages"]["cpu_s_per_1000_rows"]
    lines = [f"Pipeline overhead (`iqray bench --measure overhead`): {result['rows']:,} rows "
             f"of {result['image_px']} px JPEGs in shards of {result['shard_rows']}, cropped "
             f"to {result['crop_px']} px, a model stage with constant scores "
             f"({result['model']}'s outputs), model batch {result['batch_size']}", "",
             "Each stage alone, in one process:", "", "| stage | CPU s per 1,000 rows |",
             "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in stages.items()]
    lines += ["", "The whole pipeline through Ray:", "",
              "| --commit | --decode-batch-size | rows/s | driver CPU s / 1,000 rows | rest "
              "of cluster | driver share | driver ceiling (rows/s per core) | marginal "
              "ceiling | first row at |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['commit']} | {r['decode_batch_size']} | {r['rows_per_s']:,.0f} | "
                     f"{r['driver_cpu_s_per_1000_rows']:.3f} | "
                     f"{r['cluster_cpu_s_per_1000_rows']:.3f} | {r['driver_share']:.0%} | "
                     f"{r['driver_ceiling_rows_per_s']:,} | "
                     f"{r['driver_marginal_ceiling_rows_per_s']:,} | "
                     f"{r['timeline'].get('first_row', float('nan')):.1f} s |")
    start = result["startup"]
    lines += ["", "Driver ceiling: rows over the driver's CPU seconds between its first and "
              "last row (one core: its loop holds the GIL). Marginal: the same after taking "
              "off the CPU its scheduling loop spends per second while no row flows (measured "
              "while the actors load), i.e. what each further row costs it."]
    ray_state = "started by the run" if start["ray_started_by_run"] else "already up"
    lines += ["", f"Start-up of a {start['rows']}-row run with the model loaded ("
              f"{start['model']}; Ray {ray_state}), seconds from the command's start:", "",
              timeline_table(start)]
    p = result["projection"]
    lines += [f"Projection: {p['gpus']} GPUs x {p['rows_per_s_per_gpu']:,} img/s = "
              f"{p['rows_per_s_needed']:,} rows/s through one driver.", ""]
    lines += [f"- `{c}`: {v['driver_ceiling_rows_per_s']:,} rows/s per driver core "
              f"(marginal {v['marginal_ceiling_rows_per_s']:,}); "
              + ("enough." if v["carries"] else
                 f"{v['driver_cores_needed']:g} driver cores' worth: not enough.")
              for c, v in p["by_run"].items()]
    return "\n".join(lines) + "\n"


def timeline_table(run: dict[str, Any]) -> str:
    """One run's timeline as a Markdown table: seconds from its start to each step."""
    steps = list(run["timeline"])
    return "\n".join(["| run | " + " | ".join(steps) + " |", "|---|" + "---|" * len(steps),
                      f"| {run['model']} | " + " | ".join(
                          f"{run['timeline'][s]:.2f} s" for s in steps) + " |"]) + "\n"



def parse_score_run(text: str) -> dict[str, Any]:
    """``BATCH:DECODE[:compile]`` -> the run's options (a mistake says which entry)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0].isdigit() or parts[1] not in (
            "cpu", "fast", "device") or parts[2:] not in ([], ["compile"]):
        raise ValueError(f"--score-runs {text!r}: expected BATCH:DECODE[:compile], DECODE "
                         "one of cpu, fast, device (e.g. 256:device:compile)")
    return {"batch_size": int(parts[0]), "decode": parts[1], "compile": parts[2:] == ["compile"]}


def bench_score_runs(model_name: str, data, workdir: Path, runs: list[str], log
                     ) -> list[dict[str, Any]]:
    """`iqray score` over the bench's images once per run: images/s over the whole run and
    steady (after the first batch), the run's timeline and its bottleneck stage. The fast
    paths' gates are off: their fidelity is measured by ``--measure decode``."""
    from iqray.jobs.score import ScoreConfig, run_score

    options = [parse_score_run(r) for r in runs]  # all checked before the first run
    out = []
    for number, option in enumerate(options):
        summary = run_score(ScoreConfig(executor="ray",
            input=str(data.folder), output=str(workdir / f"score-run-{number}"),
            model=model_name, num_actors=1, progress=False, keep_prompt=False,
            decode_check=False, **option), log=lambda *a: None)
        if summary.ok != len(data.files):
            raise RuntimeError(f"score run {runs[number]}: {summary.render()}")
        shutil.rmtree(workdir / f"score-run-{number}", ignore_errors=True)
        record = {**option, "images": summary.rows, "seconds": round(summary.wall_s, 2),
                  "images_per_s": round(summary.rows_per_s, 1),
                  "steady_images_per_s": round(summary.steady_rows_per_s or 0.0, 1),
                  "timeline": summary.timeline, "bottleneck": summary.bottleneck}
        out.append(record)
        log(f"iqray score, batch {option['batch_size']}, decode {option['decode']}"
            + (", compiled" if option["compile"] else "") + f": {record['images_per_s']:,.1f}"
            f" img/s over the run, {record['steady_images_per_s']:,.1f} steady; "
            f"{summary.bottleneck}")
    return out


def score_runs_table(runs: list[dict[str, Any]], model: str, images: int) -> str:
    lines = [f"`iqray score` runs ({model}, {images} images, one actor)", "",
             "| batch | decode | compile | img/s (run) | img/s (steady) | first row at | "
             "bottleneck |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['batch_size']} | {r['decode']} | {'yes' if r['compile'] else 'no'} | "
              f"{r['images_per_s']:,.1f} | {r['steady_images_per_s']:,.1f} | "
              f"{r['timeline'].get('first_row', float('nan')):.1f} s | {r['bottleneck']} |"
              for r in runs]
    return "\n".join(lines) + "\n"
