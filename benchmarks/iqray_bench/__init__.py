"""`iqray bench`: throughput of the limit, a hand-written DataLoader and `iqray score`, side by
side in one run, plus fast-path fidelity; writes bench.json, bench.png and bench.md.
Glue only: the measurements are :mod:`iqray_bench.measure`."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from iqray.jobs.config import JobConfig
from iqray.jobs.console import log

REPO_SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sample"
TARGETS = {"pipeline_over_limit": 0.9, "pipeline_over_dataloader": 2.0}


class BenchConfig(JobConfig):
    """`iqray bench`: images/s of the limit, a DataLoader and `iqray score`, and their ratios."""

    model: str = Field(default="mst-clipiqa-random-init",
                       description="model to time (default: full-size random-init towers)")
    images: int = Field(default=96, gt=0, description="images per measurement")
    images_per_prompt: int = Field(default=4, gt=0, description="images sharing a prompt")
    source: str | None = Field(
        default=None, validate_default=True, description="folder of images to copy "
        "(default: the source tree's examples/sample, which the installed package lacks)")
    batch_size: int = Field(default=32, gt=0, description="images per model call")
    loader_workers: int | None = Field(default=None, ge=0,
                                       description="DataLoader workers (default: CPUs - 1)")
    actors: list[int] = Field(default_factory=lambda: [1, 2],
                              description="actor counts to time `iqray score` with")
    precisions: list[Literal["fp32", "int8"]] = Field(
        default_factory=lambda: ["fp32", "int8"], description="precisions to time")
    decodes: list[Literal["cpu", "device"]] = Field(
        default_factory=lambda: ["cpu", "device"], description="decode paths to time "
        "(device: JPEGs decoded in the model actor, nvJPEG on a GPU) and check for fidelity")
    fidelity_models: list[str] = Field(
        default_factory=lambda: ["iqray-small-agiqa3k"],
        description="models (besides --model) whose fast-path fidelity is checked")
    measure: list[Literal["throughput", "scale", "scale-images", "decode", "overhead",
                          "score-runs"]] = Field(
        default_factory=lambda: ["throughput"],
        description="throughput: the three-way comparison; scale: re-scoring from a "
        "(synthetic) embedding cache at --scale-rows, time and peak memory; scale-images: "
        "the whole image pipeline on synthetic small JPEGs at --scale-image-rows, time, peak "
        "memory of the driver and every Ray process, peak object-store use; decode: decode + "
        "crop images/s per core by format, size and --decode mode, and the score fidelity of "
        "fast against full decode; overhead: the pipeline with a constant-score model stage "
        "(rows/s, CPU per stage and on the driver, the driver's ceiling, the run's timeline) "
        "for each of --overhead-commits; score-runs: `iqray score` on --images images once "
        "per --score-runs entry (batch size, decode, compile)")
    score_runs: list[str] = Field(
        default_factory=lambda: ["256:cpu", "256:fast", "256:device"],
        description="score-runs: BATCH:DECODE[:compile] per run, e.g. 512:device:compile")
    decode_images: int = Field(default=32, gt=2, description="source JPEGs of the decode "
                               "measurement (re-encoded at each size)")
    decode_view: int = Field(default=224, gt=0, description="the view size decode is timed "
                             "for (a ViT-B tower's input)")
    decode_models: list[str] = Field(
        default_factory=lambda: ["mst-clipiqa-tiny-random", "iqray-small-agiqa3k"],
        description="models whose scores fast decode is compared on (each with its views)")
    overhead_rows: int = Field(default=20_000, gt=0, description="rows of the overhead run")
    overhead_shard_rows: int = Field(default=100, gt=0,
                                     description="rows per shard of the overhead run")
    overhead_batch_size: int = Field(default=256, gt=0,
                                     description="model stage batch of the overhead run")
    overhead_decode_batch_sizes: list[int] = Field(
        default_factory=lambda: [32, 256], description="--decode-batch-size values the "
        "overhead run compares (blocks per row are what Ray Data's scheduling costs)")
    overhead_crop: int = Field(default=32, gt=0, description="crop size (px) of the overhead "
                               "run: small, so rows arrive fast enough to load the driver")
    overhead_commits: list[Literal["driver", "actors"]] = Field(
        default_factory=lambda: ["driver", "actors"],
        description="--commit modes the overhead run compares")
    @field_validator("source")
    @classmethod
    def _source_exists(cls, source: str | None) -> str:
        if source is None:
            if not REPO_SAMPLE.is_dir():
                raise ValueError("no folder of images to time: the default, examples/sample, "
                                 "ships with iqray's source tree, not the installed package; "
                                 "pass --source FOLDER")
            return str(REPO_SAMPLE)
        if "://" not in source and not Path(source).is_dir():
            raise ValueError(f"no folder {source}")
        return source

    @field_validator("score_runs")
    @classmethod
    def _runs_parse(cls, runs: list[str]) -> list[str]:
        from iqray_bench.overhead import parse_score_run

        for run in runs:
            parse_score_run(run)
        return runs

    scale_rows: list[int] = Field(default_factory=lambda: [10_000, 100_000, 1_000_000],
                                  description="input sizes of the scale measurement")
    scale_image_rows: list[int] = Field(default_factory=lambda: [10_000, 100_000],
                                        description="input sizes of the scale-images run")
    scale_image_model: str = Field(default="mst-clipiqa-tiny-random",
                                   description="model of the scale-images run (tiny towers: "
                                   "the pipeline's memory, not the model's speed, is measured)")
    scale_image_batch_size: int = Field(default=256, gt=0,
                                        description="model batch of the scale-images run")
    scale_image_shard_rows: int = Field(default=1000, gt=0, description="rows per input "
                                        "shard of the scale-images run (fixed, so that "
                                        "every size reads with the same parallelism)")
    scale_model: str = Field(default="iqray-small-agiqa3k", description="model re-scored at "
                             "scale (the heads are the same size for every MST config)")
    scale_prompts: int = Field(default=1000, gt=0, description="distinct prompts at scale")
    output: str = Field(default="benchmarks/cpu", description="folder for bench.json/png/md")
    tag: str | None = Field(default=None, description="name of this run in the outputs")


def run_bench(config: BenchConfig, log=log) -> dict:
    import shutil

    import torch

    import iqray.model
    from iqray.jobs.score import ScoreConfig
    from iqray.model.fastpath import apply_precision
    from iqray.pipeline.runtime import ensure_ray
    from iqray_bench import measure as bench

    workdir = bench.scratch_dir()
    try:
        data = bench.prepare_data(Path(config.source), config.images, config.images_per_prompt,
                                  workdir)
        torch.set_num_threads(os.cpu_count() or 1)
        workers = config.loader_workers if config.loader_workers is not None else max(
            1, (os.cpu_count() or 2) - 1)
        results: dict = {"tag": config.tag or Path(config.output).name, "scale": [],
                         "created": dt.datetime.now(dt.timezone.utc).isoformat(
                             timespec="seconds"),
                         "machine": bench.machine(), "config": config.model_dump(),
                         "limit": {}, "dataloader": {}, "pipeline": [], "fidelity": [],
                         "scale_images": []}
        if "scale" in config.measure:
            results["scale"] = run_scale(config, workdir, log)
        if "scale-images" in config.measure:
            results["scale_images"] = run_image_scale(config, workdir, log)
        if "decode" in config.measure:
            results["decode"] = bench.bench_decode(Path(config.source), config.decode_images,
                                                   config.decode_view, config.decode_models)
            for r in results["decode"]:
                log(f"decode {r['format']} {r['size']} px ({r['images_from']}) {r['mode']}: "
                    f"{r['images_per_s_per_core']:.0f} img/s per core"
                    + ("" if r["spearman_vs_full"] is None
                       else f", Spearman vs full >= {r['spearman_vs_full']:.4f}"))
        if "overhead" in config.measure:
            from iqray_bench.overhead import bench_overhead

            results["overhead"] = bench_overhead(
                config.scale_image_model, workdir / "overhead", config.overhead_rows,
                config.overhead_shard_rows, config.overhead_batch_size,
                config.overhead_decode_batch_sizes, config.overhead_commits,
                config.overhead_crop, log)
        if "score-runs" in config.measure:
            from iqray_bench.overhead import bench_score_runs

            results["score_runs"] = bench_score_runs(config.model, data, workdir,
                                                     config.score_runs, log)
        if "throughput" not in config.measure:
            return _write(results, config, log)
        model = iqray.model.load(config.model)
        results["model"] = {"name": config.model, **model.parameter_counts()}
        pixels = bench.crops(model, data.files)
        for precision in config.precisions:
            timed = apply_precision(iqray.model.load(config.model), precision)
            results["limit"][precision] = bench.bench_limit(timed, pixels, data.prompts,
                                                            config.batch_size)
            log(f"limit ({precision}): {results['limit'][precision]['images_per_s']:.2f} img/s")
        results["profile"] = {"model": bench.profile_model(model, pixels, data.prompts,
                                                           config.batch_size),
                              "decode": bench.decode_cost(model, data.files[:32])}
        results["dataloader"]["fp32"] = bench.bench_dataloader(model, data, config.batch_size,
                                                               workers)
        log(f"DataLoader ({workers} workers, fp32): "
            f"{results['dataloader']['fp32']['images_per_s']:.2f} img/s")
        del model, pixels
        ensure_ray(ScoreConfig(input=str(data.folder), output=str(workdir / "x")))
        half = bench.first_part(data, max(1, config.images // 2), workdir)
        runs = [(a, "fp32", "cpu") for a in config.actors] + [
            (min(config.actors), p, "cpu") for p in config.precisions if p != "fp32"] + [
            (min(config.actors), "fp32", d) for d in config.decodes if d != "cpu"]
        for actors, precision, decode in runs:
            out = bench.bench_pipeline(config.model, data, half,
                                       workdir / f"out-{actors}-{precision}-{decode}",
                                       config.batch_size, actors, precision, decode)
            results["pipeline"].append(out)
            log(f"iqray score ({actors} actor(s), {precision}, decode {decode}): "
                f"{out['images_per_s']:.2f} img/s over the run, "
                f"{out['steady_images_per_s']:.2f} steady; {out['bottleneck']}")
        fidelity_images = data.files[:32]
        for name in [config.model, *config.fidelity_models]:
            for precision in config.precisions:
                if precision != "fp32":
                    check = bench.fidelity(name, precision, fidelity_images,
                                           data.prompts[:32])
                    results["fidelity"].append(check)
                    log(f"fidelity {precision} vs fp32 on {name}: " + _fidelity_text(check))
            if "device" in config.decodes:
                check = bench.decode_fidelity(name, fidelity_images, data.prompts[:32])
                results["fidelity"].append(check)
                log(f"fidelity of decode on {check['device']} vs PIL on {name}: "
                    + _fidelity_text(check))
        results["ratios"] = ratios(results)
        results["targets"] = TARGETS
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return _write(results, config, log)


def _fidelity_text(check: dict) -> str:
    return ", ".join(f"{k} Spearman {v['spearman']:.4f} (max |diff| {v['max_abs_diff']:.2g})"
                     for k, v in check.items() if isinstance(v, dict))


def run_scale(config: BenchConfig, workdir: Path, log) -> list[dict]:
    """Re-score synthetic cached inputs of growing size; each is deleted after its run."""
    import shutil

    from iqray_bench import measure as bench

    out = []
    for rows in config.scale_rows:
        root = workdir / f"scale-{rows}"
        bench.synthetic_cached_input(root, config.scale_model, rows, min(rows, 10_000),
                                     config.scale_prompts)
        result = bench.bench_rescore(config.scale_model, root, rows)
        shutil.rmtree(root, ignore_errors=True)
        out.append(result)
        log(f"re-score from cache, {rows:,} rows: {result['seconds']:.1f} s "
            f"({result['rows_per_s']:,.0f} rows/s), peak memory "
            f"{result['peak_pss_bytes'] / 2**20:,.0f} MiB (driver + Ray, PSS)")
    _log_spread(out, log)
    return out


def _log_spread(out: list[dict], log) -> None:
    if len(out) > 1:
        peaks = [r["peak_pss_bytes"] for r in out]
        log(f"peak memory spread over sizes: max/min = {max(peaks) / min(peaks):.2f}")


def run_image_scale(config: BenchConfig, workdir: Path, log) -> list[dict]:
    """`iqray score` over synthetic image inputs of growing size; each is deleted after."""
    import shutil

    from iqray.jobs.score import ScoreConfig
    from iqray.pipeline.runtime import ensure_ray
    from iqray_bench import measure as bench

    ensure_ray(ScoreConfig(input=str(workdir), output=str(workdir / "x")))
    out = []
    for rows in config.scale_image_rows:
        root = workdir / f"scale-images-{rows}"
        result = bench.bench_image_scale(config.scale_image_model, root, rows,
                                         config.scale_image_shard_rows, config.scale_prompts,
                                         config.scale_image_batch_size)
        shutil.rmtree(root, ignore_errors=True)
        out.append(result)
        log(f"image pipeline, {rows:,} rows: {result['seconds']:.1f} s "
            f"({result['rows_per_s']:,.0f} rows/s), peak memory (driver + Ray, PSS) "
            f"{result['peak_pss_bytes'] / 2**20:,.0f} MiB, peak object store "
            f"{(result['peak_object_store_bytes'] or 0) / 2**20:,.0f} MiB")
    _log_spread(out, log)
    return out


def _write(results: dict, config: BenchConfig, log) -> dict:
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    name = "bench" if "throughput" in config.measure else "scale"
    if not set(config.measure) <= {"decode", "overhead", "score-runs"}:  # own files only
        (output / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    if "throughput" in config.measure:
        (output / "bench.md").write_text(markdown_table(results))
        plot(results, output / "bench.png")
        for key, value in results["ratios"].items():
            log(f"{key}: {value:.2f}" + (f" (target {TARGETS[key]:g})" if key in TARGETS
                                         else ""))
    if results.get("decode"):
        (output / "decode.json").write_text(json.dumps(results["decode"], indent=2) + "\n")
        (output / "decode.md").write_text(decode_table(results["decode"]))
    if results.get("score_runs"):
        from iqray_bench.overhead import score_runs_table

        (output / "score_runs.json").write_text(json.dumps(
            {"machine": results["machine"], "model": config.model, "images": config.images,
             "runs": results["score_runs"]}, indent=2) + "\n")
        (output / "score_runs.md").write_text(score_runs_table(results["score_runs"],
                                                               config.model, config.images))
    if results.get("overhead"):
        from iqray_bench.overhead import overhead_table

        (output / "overhead.json").write_text(json.dumps(results["overhead"], indent=2) + "\n")
        (output / "overhead.md").write_text(overhead_table(results["overhead"]))
    if results["scale"] or results.get("scale_images"):
        (output / "scale.md").write_text(scale_table(results["scale"])
                                         + image_scale_table(results.get("scale_images", [])))
    log(f"wrote {output}/ ({', '.join(sorted(p.name for p in output.iterdir()))})")
    return results


def decode_table(records: list[dict]) -> str:
    """Markdown: images/s per core by format, size and mode, the speed-up over full decode,
    and each model's Spearman of fast against full decode (reduced: images it shrank)."""
    full = {(r["format"], r["size"]): r["images_per_s_per_core"] for r in records
            if r["mode"] == "full"}
    lines = [f"Decode + crop to {records[0]['view']} px, one core (`iqray bench --measure "
             "decode`)", "", "| format | size | images | mode | img/s per core | vs full | "
             "fast vs full: Spearman (min over outputs), reduced |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        speed = r["images_per_s_per_core"] / full[(r["format"], r["size"])]
        fidelity = "; ".join(
            f"{m} {min(v['spearman'] for v in f.values() if isinstance(v, dict)):.4f}, "
            f"{f['reduced']}/{r['images']}" for m, f in r["fidelity"].items()
            if any(isinstance(v, dict) for v in f.values()))
        lines.append(f"| {r['format']} | {r['size']} | {r['images_from']} | {r['mode']} | "
                     f"{r['images_per_s_per_core']:.0f} | {speed:.2f}x | {fidelity or '-'} |")
    return "\n".join(lines) + "\n"


def image_scale_table(scale: list[dict]) -> str:
    return _scale_table("\nImage pipeline (read, decode, model actors, write):", scale,
                        processes=True)


def scale_table(scale: list[dict]) -> str:
    return _scale_table("Re-scoring from the embedding cache:", scale, processes=False)


def _scale_table(title: str, scale: list[dict], processes: bool) -> str:
    if not scale:
        return ""
    head = ["rows", "seconds", "rows/s", "peak memory, driver + Ray (PSS, MiB)",
            *(["processes"] if processes else []), "peak object store (MiB)"]
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in scale:
        cells = [f"{r['rows']:,}", f"{r['seconds']:.1f}", f"{r['rows_per_s']:,.0f}",
                 f"{r['peak_pss_bytes'] / 2**20:,.0f}",
                 *([str(r["processes"])] if processes else []),
                 f"{(r['peak_object_store_bytes'] or 0) / 2**20:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ratios(results: dict) -> dict[str, float]:
    """3/1 and 3/2 at fp32 (the best actor count, steady rate), plus the whole-run and int8
    variants for context."""
    fp32 = [r for r in results["pipeline"] if r["precision"] == "fp32"
            and r.get("decode", "cpu") == "cpu"]
    best = max(fp32, key=lambda r: r["steady_images_per_s"])
    limit = results["limit"]["fp32"]["images_per_s"]
    loader = results["dataloader"]["fp32"]["images_per_s"]
    out = {"pipeline_over_limit": best["steady_images_per_s"] / limit,
           "pipeline_over_dataloader": best["steady_images_per_s"] / loader,
           "pipeline_over_limit_whole_run": best["images_per_s"] / limit}
    timing = results["dataloader"]["fp32"]
    if timing.get("model_s"):
        # hiding every wait of the hand-written loop is all a pipeline can add at fp32
        out["pipeline_over_dataloader_ceiling"] = timing["seconds"] / timing["model_s"]
    for run in results["pipeline"]:
        if run.get("decode", "cpu") != "cpu":
            out[f"pipeline_decode_{run['decode']}_over_fp32_limit"] = \
                run["steady_images_per_s"] / limit
        elif run["precision"] != "fp32":
            out[f"pipeline_{run['precision']}_over_fp32_limit"] = \
                run["steady_images_per_s"] / limit
    return out


def _rows(results: dict) -> list[tuple[str, float]]:
    rows = [(f"1. limit: model.score on pre-decoded batches ({p})", r["images_per_s"])
            for p, r in results["limit"].items()]
    rows += [(f"2. DataLoader ({r['workers']} workers) + model.score ({p})", r["images_per_s"])
             for p, r in results["dataloader"].items()]
    for r in results["pipeline"]:
        what = f"3. iqray score, {r['actors']} actor(s), {r['precision']}" + (
            f", decode on {r['decode']}" if r.get("decode", "cpu") != "cpu" else "")
        rows.append((f"{what}, steady", r["steady_images_per_s"]))
        rows.append((f"{what}, whole run", r["images_per_s"]))
    return rows


def markdown_table(results: dict) -> str:
    limit = results["limit"]["fp32"]["images_per_s"]
    lines = [f"`iqray bench` {results['tag']}: {results['model']['name']}, "
             f"{results['config']['images']} images, {results['machine']['cpus']} CPUs"
             + (f", {results['machine']['gpu']}" if "gpu" in results["machine"] else ""), "",
             "| measurement | images/s | / limit (fp32) |", "|---|---|---|"]
    lines += [f"| {name} | {value:.2f} | {value / limit:.2f} |" for name, value in
              _rows(results)]
    lines.append("")
    if results.get("profile") and "pipeline_over_dataloader_ceiling" in results["ratios"]:
        lines += profile_lines(results)
    return "\n".join(lines)


def profile_lines(results: dict) -> list[str]:
    """The profile as Markdown: per-stage time of one batch, op kinds, and what bounds 3/2."""
    model, decode = results["profile"]["model"], results["profile"]["decode"]
    loader = results["dataloader"]["fp32"]
    per_image = model["seconds"] / model["batch"]
    lines = [f"Where one batch of {model['batch']} ({model['distinct_prompts']} distinct "
             f"prompts) spends {model['seconds']:.2f} s:", "",
             "| stage | seconds | share |", "|---|---|---|"]
    lines += [f"| {name} | {sec:.3f} | {sec / model['seconds']:.1%} |"
              for name, sec in sorted(model["stage_s"].items(), key=lambda kv: -kv[1])
              if sec >= 0.0005]
    lines += ["", "| op kind (self CPU time) | share |", "|---|---|"]
    lines += [f"| {kind} | {share:.1%} |" for kind, share in model["op_kind_share"].items()]
    lines += ["", f"- decode + crop: {decode['seconds_per_image'] * 1e3:.1f} ms per image on "
              f"one core; the model: {per_image * 1e3:.0f} ms per image.",
              f"- the DataLoader loop waited {loader['waiting_for_loader_s']:.2f} s of "
              f"{loader['seconds']:.2f} s for its workers; the rest was the model. A pipeline "
              "with the same model can beat it by at most "
              f"{results['ratios']['pipeline_over_dataloader_ceiling']:.2f}x (its time over "
              "its model time).", ""]
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(results)
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.6))
    names = [n for n, _ in rows][::-1]
    values = [v for _, v in rows][::-1]
    colours = ["#4c72b0" if n.startswith("1.") else "#dd8452" if n.startswith("2.")
               else "#55a868" for n in names]
    ax.barh(names, values, color=colours)
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
    r = results["ratios"]
    ax.set(xlabel="images/s", title=f"{results['model']['name']} on "
           f"{results['machine']['cpus']} CPUs: 3/1 = {r['pipeline_over_limit']:.2f}, "
           f"3/2 = {r['pipeline_over_dataloader']:.2f}")
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
