"""`iqray score --model bpclip...` in the Ray pipeline: NR on the sample, FR with references
from a column (on S3) or a path template, scores equal to model.score, bad references as
error rows."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pipeline_data import SAMPLE, read_output, write_parquet

import iqray.model
from iqray.jobs.score import ScoreConfig, run_score
from iqray.model.distortions import distort

BPCLIP_TEST_MODEL = "bpclip-tiny-random"
DIMENSIONS = ["aesthetics", "color", "exposure", "noise_free", "sharpness", "structure"]


def score(**kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("model", BPCLIP_TEST_MODEL)
    return run_score(ScoreConfig(**kwargs), log=lambda *a: None)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def assert_outputs_match(table: pa.Table, expected: dict[str, np.ndarray]) -> None:
    for name in ["quality", *DIMENSIONS]:
        np.testing.assert_allclose(table[name].to_numpy(zero_copy_only=False), expected[name],
                                   atol=1e-5, err_msg=name)


def test_nr_scores_the_sample_with_quality_and_dimension_columns(ray_local, tmp_path, sample):
    summary = score(input=str(SAMPLE), output=str(tmp_path / "out"))
    table = read_output(None, summary.outputs)
    assert table.num_rows == 32 and set(table["status"].to_pylist()) == {"ok"}
    assert "alignment" not in table.column_names
    assert "prompt_truncated" not in table.column_names
    assert [c for c in table.column_names if c in ["quality", *DIMENSIONS]] == \
        ["quality", *DIMENSIONS]
    names, images, _ = sample
    by_name = dict(zip(names, images, strict=True))
    ordered = [by_name[k.removeprefix("images/")] for k in table["key"].to_pylist()]
    assert_outputs_match(table, iqray.model.load(BPCLIP_TEST_MODEL).score(ordered))
    footer = json.loads(pq.read_schema(summary.outputs[0]).metadata[b"iqray"])
    assert footer["architecture"] == "bpclip"
    assert footer["outputs"] == ["quality", *DIMENSIONS]


@pytest.fixture(scope="module")
def fr_pairs(sample):
    """(distorted PNG bytes, reference PNG bytes) for 6 sample images, blur levels 0..5."""
    _, images, _ = sample
    pairs = []
    for level, data in enumerate(images[:6]):
        clean = Image.open(io.BytesIO(data)).convert("RGB").resize((256, 256))
        pairs.append((png(distort(clean, "blur", level)), png(clean)))
    return pairs


def test_fr_on_s3_reads_each_reference_from_a_column(ray_local, s3_bucket, s3_endpoint,
                                                     fr_pairs):
    fs, bucket = s3_bucket
    for i, (_, reference) in enumerate(fr_pairs):
        fs.pipe_file(f"{bucket}/refs/{i}.png", reference)
    table = pa.table({
        "id": [f"r{i}" for i in range(len(fr_pairs) + 2)],
        "jpg": pa.array([d for d, _ in fr_pairs] + [fr_pairs[0][0]] * 2, pa.binary()),
        # relative to the table's folder, like image paths; then a missing one and a null
        "reference": [f"../refs/{i}.png" for i in range(len(fr_pairs))]
        + ["../refs/missing.png", None],
    })
    write_parquet(fs, f"{bucket}/in/pairs.parquet", table)
    summary = score(input=f"s3://{bucket}/in/pairs.parquet", output=f"s3://{bucket}/out",
                    s3_endpoint=s3_endpoint, mode="fr", reference_column="reference",
                    key_columns=["id"], max_error_fraction=0.5)
    out = read_output(fs, summary.outputs)
    assert out["id"].to_pylist() == [f"r{i}" for i in range(8)]
    assert out["status"].to_pylist() == ["ok"] * 6 + ["error"] * 2
    assert out["error_kind"].to_pylist()[6:] == ["read_reference", "missing_reference"]
    assert "missing.png" in out["error"][6].as_py()
    model = iqray.model.load(BPCLIP_TEST_MODEL, mode="fr")
    expected = model.score([d for d, _ in fr_pairs], references=[r for _, r in fr_pairs])
    assert_outputs_match(out.slice(0, 6), expected)


def test_fr_with_a_reference_template_on_a_folder(ray_local, tmp_path, fr_pairs):
    images, refs = tmp_path / "images", tmp_path / "refs"
    images.mkdir()
    refs.mkdir()
    for i, (distorted, reference) in enumerate(fr_pairs):
        (images / f"img{i}.png").write_bytes(distorted)
        (refs / f"img{i}_ref.png").write_bytes(reference)
    summary = score(input=str(images), output=str(tmp_path / "out"), mode="fr",
                    reference_template="{stem}_ref.png", image_root=str(refs))
    out = read_output(None, summary.outputs)
    assert set(out["status"].to_pylist()) == {"ok"}
    order = [int(Path(k).stem.removeprefix("img")) for k in out["key"].to_pylist()]
    model = iqray.model.load(BPCLIP_TEST_MODEL, mode="fr")
    expected = model.score([fr_pairs[i][0] for i in order],
                           references=[fr_pairs[i][1] for i in order])
    assert_outputs_match(out, expected)


def test_fr_without_references_and_references_without_fr_are_refused(ray_local, tmp_path):
    with pytest.raises(ValueError, match="needs --reference-column"):
        score(input=str(SAMPLE), output=str(tmp_path / "a"), mode="fr")
    with pytest.raises(ValueError, match="not full-reference"):
        score(input=str(SAMPLE), output=str(tmp_path / "b"), reference_template="{name}")
    with pytest.raises(ValueError, match="--cache .* is not offered by bpclip models"):
        score(input=str(SAMPLE), output=str(tmp_path / "c"), cache=str(tmp_path / "cache"))
