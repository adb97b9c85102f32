"""`--decode device`: JPEGs decoded in the model actor (torchvision decode_jpeg; nvJPEG on a
GPU, the same code on the CPU here) score like the PIL decode tasks, and bad rows still
become error rows."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pipeline_data import write_parquet
from scipy.stats import spearmanr

from iqray.jobs.score import ScoreConfig, run_score
from iqray.pipeline.decode import device_decodable

SHIPPED = "iqray-small-agiqa3k"  # trained: its scores spread, so rank fidelity means something


def _reencoded(data: bytes, **save) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).convert(save.pop("mode", "RGB")).save(buffer, **save)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mixed_input(tmp_path_factory, sample):
    """The sample's JPEGs plus one PNG, one CMYK JPEG (both decoded by PIL in tasks), one
    greyscale JPEG and one truncated JPEG (decoded, or refused, on the device)."""
    names, images, prompts = sample
    extra = {"png": _reencoded(images[0], format="PNG"),
             "cmyk": _reencoded(images[1], format="JPEG", mode="CMYK"),
             "grey": _reencoded(images[2], format="JPEG", mode="L"),
             "truncated": images[3][: len(images[3]) // 2]}
    table = pa.table({
        "key": [*names, *extra],
        "jpg": pa.array([*images, *extra.values()], pa.binary()),
        "caption": [*prompts, *prompts[: len(extra)]]})
    path = tmp_path_factory.mktemp("device-decode") / "in" / "part.parquet"
    write_parquet(None, str(path), table)
    return path.parent, len(names)


def test_only_plain_jpegs_are_left_for_the_device(sample):
    names, images, _ = sample
    assert device_decodable(images[0], max_pixels=10**8)
    assert device_decodable(_reencoded(images[0], format="JPEG", mode="L"), 10**8)
    assert not device_decodable(_reencoded(images[0], format="JPEG", mode="CMYK"), 10**8)
    assert not device_decodable(_reencoded(images[0], format="PNG"), 10**8)
    assert not device_decodable(images[0], max_pixels=100)  # PIL reports the bomb row
    assert not device_decodable(b"\xff\xd8\xff not a jpeg", 10**8)


def test_device_decode_scores_like_the_decode_tasks(ray_local, tmp_path, mixed_input):
    folder, jpegs = mixed_input
    outputs = {}
    for decode in ("cpu", "device"):
        summary = run_score(ScoreConfig(
            input=str(folder), output=str(tmp_path / decode), model=SHIPPED,
            key_columns=["key"], batch_size=8, progress=False, decode=decode),
            log=lambda *a: None)
        assert summary.rows == jpegs + 4
        outputs[decode] = pq.read_table(tmp_path / decode).sort_by("key").to_pydict()
    cpu, device = outputs["cpu"], outputs["device"]
    assert cpu["key"] == device["key"] and cpu["status"] == device["status"]
    status = dict(zip(device["key"], device["status"], strict=True))
    kinds = dict(zip(device["key"], device["error_kind"], strict=True))
    assert status["truncated"] == "error" and kinds["truncated"] == "decode"
    assert all(status[k] == "ok" for k in ("png", "cmyk", "grey"))
    ok = [i for i, s in enumerate(device["status"]) if s == "ok"]
    # the JPEG rows really took the other decoder: its crops differ from PIL's by rounding
    sample_rows = [i for i, k in enumerate(device["key"]) if k.endswith(".jpg")]
    assert len(sample_rows) == jpegs
    assert not np.array_equal(np.array(cpu["quality"])[sample_rows],
                              np.array(device["quality"])[sample_rows])
    for name in ("quality", "alignment"):
        a, b = np.array(cpu[name])[ok], np.array(device[name])[ok]
        assert spearmanr(a, b).statistic >= 0.999
        assert np.abs(a - b).max() < 0.05 * (a.max() - a.min())


def test_outputs_of_the_two_decoders_are_not_mixed_on_resume():
    """Device crops differ from PIL's by rounding, so a rerun with the other --decode must
    rescore committed shards, as a rerun with another precision does."""
    def identity(**extra):
        return ScoreConfig(input="in", output="out", **extra).options_hash("model")

    assert identity(decode="device") != identity(decode="cpu")
