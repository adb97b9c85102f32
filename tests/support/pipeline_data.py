"""Builders for pipeline test inputs (each layout iqray reads) and output checks."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "examples" / "sample"
# Tests run on tiny random-init towers: fast, and no download ever.
TEST_MODEL = "mst-clipiqa-tiny-random"


def img2dataset_table(sample, start: int, count: int) -> pa.Table:
    names, images, prompts = sample
    index = [(start + i) % len(names) for i in range(count)]
    return pa.table({
        "key": [f"{start + i:06d}" for i in range(count)],
        "jpg": pa.array([images[j] for j in index], pa.binary()),
        "caption": [prompts[j] for j in index],
        "url": [f"https://example.invalid/{names[j]}" for j in index],
    })


def write_parquet(fs, path: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    if fs is None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(buffer.getvalue())
    else:
        fs.pipe_file(path, buffer.getvalue())


def write_tar(fs, path: str, members: list[tuple[str, bytes]]) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if fs is None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(buffer.getvalue())
    else:
        fs.pipe_file(path, buffer.getvalue())


def wds_members(sample, start: int, count: int, prompt_as: str = "txt"):
    names, images, prompts = sample
    members = []
    for i in range(count):
        j = (start + i) % len(names)
        key = f"{start + i:06d}"
        members.append((f"{key}.jpg", images[j]))
        if prompt_as == "txt":
            members.append((f"{key}.txt", prompts[j].encode()))
        else:
            members.append((f"{key}.json", json.dumps({"caption": prompts[j], "key": key,
                                                       "uid": j}).encode()))
    return members


def read_output(storage_fs, paths: list[str]) -> pa.Table:
    tables = []
    for path in sorted(paths):
        if storage_fs is None:
            tables.append(pq.read_table(path))
        else:
            with storage_fs.open(path, "rb") as handle:
                tables.append(pq.read_table(handle))
    return pa.concat_tables(tables, promote_options="permissive")


def assert_scores_match(table: pa.Table, model, images: list[bytes], prompts: list) -> None:
    expected = model.score(images, prompts)
    np.testing.assert_allclose(table["quality"].to_numpy(zero_copy_only=False),
                               expected["quality"], atol=1e-5)
    np.testing.assert_allclose(table["alignment"].to_numpy(zero_copy_only=False),
                               expected["alignment"], atol=1e-5)
