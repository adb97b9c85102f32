"""`iqray bench` measurements: the hardware limit, a hand-written DataLoader, and `iqray score`
end to end, on the same images and model in one run, so that their ratios hold on a noisy
machine. Also the fidelity of each fast path against fp32.

1. limit: ``model.score`` on pre-decoded, pre-batched uint8 crops in a tight loop;
2. dataloader: what a user writes by hand: a torch ``DataLoader`` whose workers decode the
   files, feeding ``model.score``;
3. pipeline: ``iqray score`` (read -> decode -> model -> Parquet), per actor count and
   precision. Its rate is reported twice: over the whole run (Ray Data planning, model
   staging, actor start and model load included) and steady, what a nightly run of millions
   of images sees once its actors are up: rows over the model stage's busy time per actor
   (the bottleneck stage; read, decode and write overlap with it). The marginal rate
   between a run on half the images and on all of them is recorded too; on a few hundred
   images it swings by +-30% with actor start-up, so it is not the headline.
"""

from __future__ import annotations

import csv
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iqray.pipeline import rows as R


@dataclass
class BenchData:
    folder: Path
    files: list[Path]
    prompts: list[str]


def prepare_data(source: Path, count: int, images_per_prompt: int, workdir: Path
                 ) -> BenchData:
    """``count`` images copied from ``source`` (cycling), ``images_per_prompt`` per prompt,
    as a folder with a prompts.csv sidecar (a layout `iqray score` reads)."""
    images = sorted(p for p in source.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg",
                                                                          ".png", ".webp"))
    if not images:
        raise ValueError(f"{source}: no images to benchmark on")
    prompt_pool = _source_prompts(source)
    folder = workdir / "images"
    folder.mkdir(parents=True)
    files, prompts = [], []
    for i in range(count):
        original = images[i % len(images)]
        target = folder / f"{i:06d}{original.suffix.lower()}"
        shutil.copyfile(original, target)
        files.append(target)
        base = prompt_pool[(i // images_per_prompt) % len(prompt_pool)]
        prompts.append(f"{base} (variant {i // images_per_prompt})")
    _sidecar(folder, files, prompts)
    return BenchData(folder, files, prompts)


def _sidecar(folder: Path, files: list[Path], prompts: list[str]) -> None:
    with open(folder / "prompts.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "prompt"])
        writer.writerows((f.name, p) for f, p in zip(files, prompts, strict=True))


def first_part(data: BenchData, count: int, workdir: Path) -> BenchData:
    """The first ``count`` images of ``data`` as their own folder (hard links)."""
    folder = workdir / f"first-{count}"
    folder.mkdir(parents=True)
    files = []
    for source in data.files[:count]:
        target = folder / source.name
        os.link(source, target)
        files.append(target)
    _sidecar(folder, files, data.prompts[:count])
    return BenchData(folder, files, data.prompts[:count])


def _source_prompts(source: Path) -> list[str]:
    for name in ("prompts.csv", "metadata.csv", "captions.csv"):
        path = source / name
        if path.is_file():
            with open(path, newline="") as handle:
                rows = [r.get("prompt") or r.get("caption") or r.get("text")
                        for r in csv.DictReader(handle)]
            rows = [r for r in rows if r]
            if rows:
                return rows
    return ["an image"]


def crops(model, files: list[Path]) -> torch.Tensor:
    from iqray.model.preprocess import open_image

    return torch.stack([model.transform.crop(open_image(f)) for f in files])


def bench_limit(model, pixels: torch.Tensor, prompts: list[str], batch_size: int
                ) -> dict[str, float]:
    """Pre-decoded uint8 crops, pre-batched, scored back to back (one warm-up batch)."""
    model.score(pixels[:batch_size], prompts[:batch_size], batch_size=batch_size)
    _clear_prompts(model)
    started = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        model.score(pixels[start:start + batch_size], prompts[start:start + batch_size],
                    batch_size=batch_size)
    seconds = time.perf_counter() - started
    return {"images_per_s": len(prompts) / seconds, "seconds": seconds}


class _FileDataset(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], prompts: list[str], transform):
        self.files, self.prompts, self.transform = files, prompts, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        from iqray.model.preprocess import open_image

        return self.transform.crop(open_image(self.files[index])), self.prompts[index]


def _collate(items):
    return torch.stack([i[0] for i in items]), [i[1] for i in items]


def bench_dataloader(model, data: BenchData, batch_size: int, workers: int
                     ) -> dict[str, float]:
    """A plain DataLoader whose workers decode and crop, feeding model.score. Also splits
    the loop's time into waiting for the loader (decode not hidden behind the model) and
    the model itself."""
    model.score(crops(model, data.files[:2]), data.prompts[:2])  # warm the model only
    _clear_prompts(model)
    loader = torch.utils.data.DataLoader(
        _FileDataset(data.files, data.prompts, model.transform), batch_size=batch_size,
        num_workers=workers, collate_fn=_collate, persistent_workers=False)
    started = time.perf_counter()
    count, model_s = 0, 0.0
    for pixels, prompts in loader:
        before = time.perf_counter()
        model.score(pixels, prompts, batch_size=batch_size)
        model_s += time.perf_counter() - before
        count += len(prompts)
    seconds = time.perf_counter() - started
    return {"images_per_s": count / seconds, "seconds": seconds, "workers": workers,
            "model_s": model_s, "waiting_for_loader_s": seconds - model_s}


# torch op names -> the kind of work they are, for the profile's breakdown
# (transformer towers: 2-D matmuls are the Linear layers, batched ones the attention products)
OP_KINDS = [("matmul / linear", ("addmm", "mm", "matmul", "linear", "linear_dynamic",
                                 "quantize_per_tensor", "_weight_int8")),
            ("attention", ("bmm", "baddbmm", "scaled_dot_product", "_flash_attention",
                           "_efficient_attention", "softmax")),
            ("convolution", ("conv", "convolution", "conv2d", "mkldnn_convolution")),
            ("normalisation", ("layer_norm", "batch_norm", "group_norm")),
            ("activation", ("gelu", "relu", "silu", "sigmoid", "tanh")),
            ("copies / layout", ("copy_", "contiguous", "clone", "cat", "to", "_to_copy",
                                 "permute", "transpose", "reshape", "view", "empty"))]


def op_kind(name: str) -> str:
    base = name.split("::")[-1]
    words = base.strip("_").split("_")
    for kind, stems in OP_KINDS:
        # a stem with an underscore matches inside the name, a plain one only a whole word
        if any((s in base) if "_" in s else (s in words) for s in stems):
            return kind
    return "other"


def profile_model(model, pixels: torch.Tensor, prompts: list[str], batch_size: int
                  ) -> dict[str, Any]:
    """Where one ``model.score`` batch spends its time (after a warm-up batch, prompt cache
    cleared so the text tower runs as it does on new prompts):

    - by stage: wall time inside each top-level part of the model (each image tower, the
      text tower, fusion, heads; the outermost timed module wins, so nothing counts twice),
      the rest being tokenising, normalising and Python;
    - by op kind: self CPU time from ``torch.profiler``, grouped (matmul/linear, attention,
      convolution, ...), with the five most expensive ops.
    """
    from torch.profiler import ProfilerActivity, profile

    batch, texts = pixels[:batch_size], prompts[:batch_size]
    model.score(batch, texts, batch_size=batch_size)
    stage_s: dict[str, float] = {}
    active: list[str] = []
    opened: dict[str, float] = {}

    def before(name):
        def hook(module, args):
            active.append(name)
            if len(active) == 1:
                opened[name] = time.perf_counter()
        return hook

    def after(name):
        def hook(module, args, output):
            if len(active) == 1:
                stage_s[name] = stage_s.get(name, 0.0) + time.perf_counter() - opened[name]
            active.pop()
        return hook

    handles = []
    for name, module in _stages(model):
        handles += [module.register_forward_pre_hook(before(name)),
                    module.register_forward_hook(after(name))]
    try:
        _clear_prompts(model)
        started = time.perf_counter()
        model.score(batch, texts, batch_size=batch_size)
        total = time.perf_counter() - started
    finally:
        for handle in handles:
            handle.remove()
    _clear_prompts(model)
    with profile(activities=[ProfilerActivity.CPU]) as trace:
        model.score(batch, texts, batch_size=batch_size)
    ops = [(e.key, e.self_cpu_time_total / 1e6) for e in trace.key_averages()]
    op_total = sum(s for _, s in ops) or 1.0
    kinds: dict[str, float] = {}
    for name, seconds in ops:
        kinds[op_kind(name)] = kinds.get(op_kind(name), 0.0) + seconds
    top = sorted(ops, key=lambda o: -o[1])[:5]
    return {"batch": len(texts), "distinct_prompts": len(set(texts)), "seconds": total,
            "stage_s": {**stage_s, "other": max(total - sum(stage_s.values()), 0.0)},
            "op_kind_share": {k: round(v / op_total, 4)
                              for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top_ops": [{"op": n, "share": round(s / op_total, 4)} for n, s in top]}


def _stages(model) -> list[tuple[str, torch.nn.Module]]:
    """The model's top-level parts; a part that is only a container of towers (open_clip's
    CLIP, whose forward a scorer never calls) is replaced by its own children."""
    out = []
    for name, module in model.named_children():
        children = list(module.named_children())
        if children and type(module).__name__ in ("CLIP", "CustomTextCLIP"):
            out += [(f"{name}.{child}", sub) for child, sub in children
                    if any(True for _ in sub.parameters())]
        elif any(True for _ in module.parameters()):
            out.append((name, module))
    return out


def decode_cost(model, files: list[Path]) -> dict[str, float]:
    """Seconds to open, decode and crop one image on one core (what a DataLoader worker or
    a decode task spends per image)."""
    from iqray.model.preprocess import open_image

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        for f in files:
            model.transform.crop(open_image(f))
        seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    return {"images": len(files), "seconds_per_image": seconds / max(len(files), 1)}


def bench_pipeline(model_name: str, data: BenchData, half: BenchData, output: Path,
                   batch_size: int, actors: int, precision: str, decode: str = "cpu"
                   ) -> dict[str, Any]:
    from iqray.jobs.score import ScoreConfig, run_score

    def run(part: BenchData, name: str):
        return run_score(ScoreConfig(executor="ray",
            input=str(part.folder), output=str(output / name), model=model_name,
            batch_size=batch_size, decode_batch_size=8, num_actors=actors,
            precision=precision, decode=decode, progress=False, keep_prompt=False,
            precision_check=False),  # the bench reports fidelity itself, pass or fail
            log=lambda *a: None)

    small, summary = run(half, "half"), run(data, "all")
    extra = summary.wall_s - small.wall_s
    marginal = (summary.rows - small.rows) / extra if extra > 0 else None
    busy = summary.stage_busy_s.get("model", 0.0) / max(summary.stage_workers.get("model", 1),
                                                         1)
    steady = summary.rows / busy if busy > 0 else summary.rows_per_s
    return {"images_per_s": summary.rows_per_s, "steady_images_per_s": steady,
            "marginal_images_per_s": marginal,
            "seconds": summary.wall_s, "seconds_half": small.wall_s, "rows": summary.rows,
            "actors": actors, "precision": precision, "decode": decode,
            "stage_busy_s": summary.stage_busy_s,
            "stage_workers": summary.stage_workers, "bottleneck": summary.bottleneck}


def fidelity(model_name: str, precision: str, files: list[Path], prompts: list[str]
             ) -> dict[str, Any]:
    """Spearman and max |difference| of a fast path's scores against fp32, per output."""
    import iqray.model
    from iqray.model.fastpath import apply_precision, fidelity_report

    reference = iqray.model.load(model_name)
    fast = apply_precision(iqray.model.load(model_name), precision)
    pixels = crops(reference, files)
    report = fidelity_report(reference.score(pixels, prompts), fast.score(pixels, prompts),
                             reference.output_names)
    return {"model": model_name, "precision": precision, "images": len(files), **report}


def decode_fidelity(model_name: str, files: list[Path], prompts: list[str]
                    ) -> dict[str, Any]:
    """Scores of JPEGs decoded as ``--decode device`` does (torchvision ``decode_jpeg`` on
    the model's device, tensor crops) against the PIL decode tasks', per output."""
    import iqray.model
    from iqray.model.fastpath import fidelity_report
    from iqray.pipeline.decode import crop_transform, decode_jpegs

    model = iqray.model.load(model_name)
    transform = crop_transform(model.config.image_size, model.config.fine_resize)
    jpegs = [f for f in files if f.suffix.lower() in (".jpg", ".jpeg")]
    texts = [p for f, p in zip(files, prompts, strict=True) if f in jpegs]
    decoded = decode_jpegs([f.read_bytes() for f in jpegs], model.device)
    on_device = torch.stack([transform.crop_tensor(image) for image in decoded])
    report = fidelity_report(model.score(crops(model, jpegs), texts),
                             model.score(on_device, texts), model.output_names)
    return {"model": model_name, "precision": "fp32", "decode": "device",
            "device": str(model.device), "images": len(jpegs), **report}


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "torch": torch.__version__, "python": platform.python_version(),
                            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                            "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _clear_prompts(model) -> None:
    if hasattr(model, "clear_prompt_cache"):
        model.clear_prompt_cache()


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="iqray-bench-"))


# -- scale: re-scoring from the embedding cache at growing sizes -----------------------------

def synthetic_cached_input(root: Path, model_name: str, rows: int, shard_rows: int,
                           distinct_prompts: int) -> Path:
    """An input of ``rows`` rows (Parquet shards of ``shard_rows``) whose every shard is
    already indexed in an embedding cache of random fp16 embeddings, as `iqray embed` would
    have left it: what re-scoring a large dataset with a new head reads. Prompt features are
    the model's real text-tower output for ``distinct_prompts`` prompts. Returns the folder
    holding ``input/`` and ``cache/``."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from iqray.pipeline.io.discovery import discover_shards
    from iqray.pipeline.io.embed_cache import INDEX_COLUMNS, EmbeddingCache
    from iqray.pipeline.io.shards import ReadConfig
    from iqray.pipeline.io.storage import StorageConfig
    from iqray.pipeline.io.writer import ShardWriter
    from iqray.pipeline.staging import stage_model

    storage = StorageConfig()
    spec = stage_model(model_name, storage)
    model = spec.load("cpu")
    dim = spec.config.heads.embed_dim
    inputs, cache_dir = root / "input", root / "cache"
    inputs.mkdir(parents=True)
    cache = EmbeddingCache(str(cache_dir), storage)
    cache.bind(spec.tower_identity, spec.towers, dim, "float16")
    texts = [f"synthetic prompt {i}: a photo of object {i % 97} in style {i % 13}"
             for i in range(distinct_prompts)]
    cache.add_prompts({p: (t.numpy(), v.numpy(), cut)
                       for p, (t, v, cut) in model.prompt_features(texts).items()})
    rng = np.random.default_rng(0)
    layout: list[tuple[list[str], list[str], list[str]]] = []
    for number, start in enumerate(range(0, rows, shard_rows)):
        count = min(shard_rows, rows - start)
        keys = [f"{start + i:09d}" for i in range(count)]
        shas = [hashlib.sha256(k.encode()).hexdigest() for k in keys]
        prompts = [texts[((start + i) // 4) % distinct_prompts] for i in range(count)]
        pq.write_table(pa.table({"key": keys, "image_path": [f"absent/{k}.jpg" for k in keys],
                                 "prompt": prompts}), inputs / f"shard-{number:05d}.parquet")
        vectors = rng.standard_normal((count, 2, dim), dtype=np.float32)
        cache.add_images(shas, vectors[:, 0], vectors[:, 1])
        cache.flush()  # one part per shard, as an embed run writes them
        layout.append((keys, shas, prompts))
    shards = discover_shards(str(inputs), ReadConfig(key_columns=["key"]), storage)
    writer = ShardWriter(shards, cache.index_url(), storage,
                         {"tower_identity": spec.tower_identity, "model": model_name},
                         complete=True, key_columns=["key"], keep_prompt=True,
                         keep_image_bytes=False, schema=INDEX_COLUMNS)
    for shard, (keys, shas, prompts) in zip(shards, layout, strict=True):
        count = len(keys)
        writer.add(pa.table({
            "key": keys, "source_file": [shard.url] * count,
            "source_row": pa.array(np.arange(count), pa.int64()), "prompt": prompts,
            "image_sha256": shas, "status": ["ok"] * count,
            "error": pa.nulls(count, pa.string()), "error_kind": pa.nulls(count, pa.string()),
            R.SHARD: pa.array(np.full(count, shard.index), pa.int64()),
            R.SHARD_END: pa.array(np.full(count, count), pa.int64())}))
    return root


class ClusterMemory:
    """Peak memory of this driver and every process it started (the local Ray cluster:
    GCS, raylet, workers), and peak object-store (plasma) use, sampled while the block runs.

    Memory is PSS (proportional set size): pages shared between processes, such as the
    object store's mapping that every worker touches, are split between them instead of
    counted once per process, so the sum is the memory the job really holds."""

    def __init__(self, every_s: float = 0.25):
        self.every_s = every_s
        self.peak_bytes = 0
        self.peak_object_store_bytes: int | None = None
        self.peak_processes = 0

    def __enter__(self) -> ClusterMemory:
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def _sample(self) -> None:
        tree = process_tree(os.getpid())
        self.peak_processes = max(self.peak_processes, len(tree))
        self.peak_bytes = max(self.peak_bytes, sum(_pss(pid) for pid in tree))
        used = object_store_bytes()
        if used is not None:
            self.peak_object_store_bytes = max(self.peak_object_store_bytes or 0, used)


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                # the command name may hold spaces or parentheses: the parent id follows the
                # last ')'
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # exited between listing and reading
        pass
    return 0


def object_store_bytes() -> int | None:
    """Plasma bytes in use across the Ray cluster, or None without Ray. Ray has no public
    call for this; its memory summary (what `ray memory --stats-only` prints) carries it."""
    import re

    import ray

    if not ray.is_initialized():
        return None
    try:
        from ray._private.internal_api import memory_summary

        # this driver's cluster by address: another Ray on the machine must not answer
        text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    except Exception:  # private API: a Ray upgrade may move it; memory is still measured
        return None
    found = re.search(r"Plasma memory usage (\d+) MiB", text)
    return int(found.group(1)) * 2**20 if found else None


def synthetic_image_input(root: Path, rows: int, shard_rows: int, distinct_prompts: int,
                          size: int = 48, distinct_images: int = 512) -> Path:
    """Parquet shards of ``rows`` rows with JPEG bytes (``size`` px, ``distinct_images``
    random-texture images cycled) and prompts, 4 rows per prompt: the image pipeline's
    input at sizes no image folder here could hold. Returns the input folder."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(distinct_images):
        pixels = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).resize((size, size), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    folder = root / "images-input"
    folder.mkdir(parents=True)
    for number, start in enumerate(range(0, rows, shard_rows)):
        index = np.arange(start, min(start + shard_rows, rows))
        pq.write_table(pa.table({
            "key": [f"{i:09d}" for i in index],
            "jpg": pa.array([encoded[i % distinct_images] for i in index], pa.binary()),
            "prompt": [f"synthetic prompt {(i // 4) % distinct_prompts}" for i in index]}),
            folder / f"shard-{number:05d}.parquet")
    return folder


def bench_image_scale(model_name: str, root: Path, rows: int, shard_rows: int,
                      distinct_prompts: int, batch_size: int) -> dict[str, Any]:
    """`iqray score` through the whole image pipeline (read, decode, model actors, write)
    on ``rows`` synthetic images: wall time, rows/s, peak memory of the driver and all Ray
    processes, peak object-store use."""
    from iqray.jobs.score import ScoreConfig, run_score

    folder = synthetic_image_input(root, rows, shard_rows, distinct_prompts)
    with ClusterMemory() as memory:
        summary = run_score(ScoreConfig(executor="ray",
            input=str(folder), output=str(root / "scores"), model=model_name,
            key_columns=["key"], batch_size=batch_size, progress=False, keep_prompt=False),
            log=lambda *a: None)
    if summary.rows != rows or summary.ok != rows:
        raise RuntimeError(f"scored {summary.rows} rows ({summary.ok} ok), expected {rows}")
    return {"rows": rows, "seconds": summary.wall_s, "rows_per_s": summary.rows_per_s,
            "peak_pss_bytes": memory.peak_bytes, "processes": memory.peak_processes,
            "peak_object_store_bytes": memory.peak_object_store_bytes,
            "spilled_bytes": summary.spilled_bytes, "bottleneck": summary.bottleneck}


def bench_rescore(model_name: str, root: Path, rows: int) -> dict[str, Any]:
    """`iqray score --cache` over a synthetic cached input: wall time, rows/s, peak memory
    (driver + Ray processes), peak object-store use."""
    from iqray.jobs.score import ScoreConfig, run_score

    with ClusterMemory() as memory:
        summary = run_score(ScoreConfig(executor="ray",
            input=str(root / "input"), output=str(root / "scores"), model=model_name,
            cache=str(root / "cache"), key_columns=["key"], progress=False,
            keep_prompt=False), log=lambda *a: None)
    if summary.rows != rows:
        raise RuntimeError(f"re-scored {summary.rows} rows, expected {rows}")
    return {"rows": rows, "seconds": summary.wall_s, "rows_per_s": summary.rows_per_s,
            "peak_pss_bytes": memory.peak_bytes, "processes": memory.peak_processes,
            "peak_object_store_bytes": memory.peak_object_store_bytes,
            "heads_s": summary.stage_busy_s.get(
                "heads (from cache)")}


# (format, side); side None: the source JPEGs as they are (real AGIQA-3K images, 512 px)
DECODE_CASES = (("JPEG", None), ("JPEG", 1024), ("JPEG", 2048), ("PNG", 1024), ("WEBP", 1024))


def encode_at(images: list[bytes], fmt: str, side: int) -> list[bytes]:
    """The images re-encoded at ``side`` px (Lanczos; JPEG at quality 92): larger than the
    originals means upscaled, honest for decode speed, optimistic for fidelity."""
    import io

    from PIL import Image

    out = []
    for data in images:
        image = Image.open(io.BytesIO(data)).convert("RGB").resize(
            (side, side), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, fmt, **({"quality": 92} if fmt in ("JPEG", "WEBP") else {}))
        out.append(buffer.getvalue())
    return out


def decode_rate(images: list[bytes], mode: str, view: int, repeats: int = 2) -> float:
    """Decode + crop images/s on one core (one thread): ``full`` PIL decode, ``fast``
    (reduced DCT scale where the view allows), ``device`` (torchvision decode_jpeg, here on
    the CPU, + the actors' tensor crop)."""
    from iqray.model.images import CropViews, open_image

    views = CropViews(view)
    started = time.perf_counter()
    if mode == "device":
        from iqray.pipeline.decode import crop_transform, decode_jpegs

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one core, as the PIL modes use
        crop = crop_transform(view)
        try:
            for _ in range(repeats):
                for data in images:
                    crop.crop_tensor(decode_jpegs([data], "cpu")[0])
        finally:
            torch.set_num_threads(threads)
    else:
        least = view if mode == "fast" else None
        for _ in range(repeats):
            for data in images:
                views(open_image(data, min_short_side=least))
    return repeats * len(images) / (time.perf_counter() - started)


def fast_decode_fidelity(model_name: str, images: list[bytes], prompts: list[str]
                         ) -> dict[str, Any]:
    """Scores of ``model_name`` on the images decoded in full and fast (its own views):
    Spearman and max |diff| per output, and how many were decoded at reduced scale."""
    import iqray.model
    from iqray.model.fastpath import fidelity_report
    from iqray.model.images import CropViews, decodes_reduced, open_image

    model = iqray.model.load(model_name)
    views = CropViews(model.config.image_size, model.config.fine_resize)
    least = max(views.resizes)
    full = torch.stack([torch.from_numpy(views(open_image(d))) for d in images])
    fast = torch.stack([torch.from_numpy(views(open_image(d, min_short_side=least)))
                        for d in images])
    report = fidelity_report(model.score(full, prompts), model.score(fast, prompts),
                             model.output_names)
    report["reduced"] = sum(decodes_reduced(d, least) for d in images)
    return report


def _prompts_by_name(source: Path) -> dict[str, str | None]:
    """Image name -> prompt, from the source's sidecar (read once)."""
    for name in ("prompts.csv", "metadata.csv"):
        if (source / name).is_file():
            with open(source / name, newline="") as handle:
                return {row.get("name"): row.get("prompt") or row.get("caption")
                        for row in csv.DictReader(handle)}
    return {}


def bench_decode(source: Path, count: int, view: int, models: list[str]) -> list[dict]:
    """One record per format, size and mode: images/s per core and, for ``fast``, the
    fidelity of each model's scores against full decode."""
    import io

    from PIL import Image

    real = sorted(p for p in source.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[:count]
    if len(real) < 3:
        raise ValueError(f"{source}: fewer than 3 JPEGs to benchmark decode on")
    originals = [p.read_bytes() for p in real]
    by_name = _prompts_by_name(source)
    prompts = [by_name.get(p.name, by_name.get(str(p.relative_to(source)))) for p in real]
    records = []
    for fmt, side in DECODE_CASES:
        images = originals if side is None else encode_at(originals, fmt, side)
        size = side or max(Image.open(io.BytesIO(d)).size[0] for d in originals)
        modes = ("full", "fast", "device") if fmt == "JPEG" else ("full", "fast")
        for mode in modes:
            record = {"format": fmt.lower(), "size": size, "mode": mode, "view": view,
                      "images_from": "real" if side is None else "upscaled",
                      "images": len(images),
                      "images_per_s_per_core": round(decode_rate(images, mode, view), 1),
                      "spearman_vs_full": None, "fidelity": {}}
            if mode == "fast":
                record["fidelity"] = {m: fast_decode_fidelity(m, images, prompts)
                                      for m in models}
                record["spearman_vs_full"] = min(
                    (v["spearman"] for r in record["fidelity"].values() for v in r.values()
                     if isinstance(v, dict)), default=None)
            records.append(record)
    return records
