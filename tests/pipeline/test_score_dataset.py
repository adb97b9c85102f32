"""score_dataset: iqray as one stage of a user's own Ray Data pipeline."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from pipeline_data import TEST_MODEL, img2dataset_table, read_output, write_parquet

from iqray.jobs.score import ScoreConfig, run_score


def _input(tmp_path, sample):
    """Two Parquet shards: image bytes, captions, keys; a truncated image, a row without an
    image, and a row whose image is a path that does not exist."""
    tables = [img2dataset_table(sample, start, 10) for start in (0, 10)]
    jpg = tables[0]["jpg"].to_pylist()
    jpg[3] = jpg[3][:200]  # cut short: not decodable
    jpg[5] = None
    tables[0] = tables[0].set_column(tables[0].schema.get_field_index("jpg"), "jpg",
                                     pa.array(jpg, pa.binary()))
    for i, table in enumerate(tables):
        write_parquet(None, str(tmp_path / "in" / f"{i:05d}.parquet"), table)
    return tmp_path / "in"


def test_score_dataset_inside_a_users_pipeline_scores_as_iqray_score_does(
        ray_local, tmp_path, sample):
    import ray

    from iqray.pipeline import score_dataset

    folder = _input(tmp_path, sample)
    summary = run_score(ScoreConfig(input=str(folder), output=str(tmp_path / "out"),
                                    model=TEST_MODEL, progress=False, batch_size=4,
                                    max_error_fraction=0.5),
                        log=lambda *_: None)
    expected = {row["key"]: row for row in read_output(None, summary.outputs).to_pylist()}

    ds = ray.data.read_parquet(str(folder))
    ds = ds.map_batches(lambda b: {**b, "before": b["key"]}, batch_format="numpy")
    ds = score_dataset(ds, TEST_MODEL, image_column="jpg", prompt_column="caption",
                       batch_size=4)
    ds = ds.map_batches(lambda t: t.append_column("after", t["status"]),
                        batch_format="pyarrow")
    got = ds.to_arrow_refs()
    table = pa.concat_tables(ray.get(got), promote_options="permissive")
    rows = {row["key"]: row for row in table.to_pylist()}

    assert sorted(rows) == sorted(expected) and table.num_rows == 20
    for name, kind in (("quality", pa.float32()), ("alignment", pa.float32()),
                       ("status", pa.string()), ("error", pa.string()),
                       ("error_kind", pa.string()), ("image_sha256", pa.string())):
        assert table.schema.field(name).type == kind, name
    # the user's columns pass through, before and after the stage; nothing private leaks
    assert {"jpg", "caption", "url", "before", "after"} <= set(table.column_names)
    assert not [c for c in table.column_names if c.startswith("_") or c == "pixels"]
    for key, row in rows.items():
        want = expected[key]
        assert row["before"] == key and row["after"] == row["status"] == want["status"]
        assert row["error_kind"] == want["error_kind"]
        assert row["image_sha256"] == want["image_sha256"]
        for name in ("quality", "alignment"):
            if want["status"] == "ok":
                assert row[name] == pytest.approx(want[name], abs=1e-6), (key, name)
            else:
                assert np.isnan(row[name])
    kinds = {key: row["error_kind"] for key, row in rows.items() if row["status"] == "error"}
    assert kinds == {"000003": "decode", "000005": "missing_image"}


def test_score_dataset_reads_paths_and_refuses_mistakes_before_running(ray_local, tmp_path,
                                                                       sample):
    import ray

    from iqray.pipeline import score_dataset

    names, images, prompts = sample
    for name, data in zip(names[:4], images[:4], strict=True):
        (tmp_path / name).write_bytes(data)
    paths = [str(tmp_path / n) for n in names[:4]] + [str(tmp_path / "missing.jpg")]
    ds = ray.data.from_items([{"path": p, "prompt": t} for p, t in
                              zip(paths, prompts[:4] + ["x"], strict=True)])
    table = pa.concat_tables(ray.get(score_dataset(
        ds, TEST_MODEL, image_column="path", prompt_column="prompt").to_arrow_refs()))
    rows = {row["path"]: row for row in table.to_pylist()}
    assert [rows[p]["status"] for p in paths] == ["ok"] * 4 + ["error"]
    assert rows[paths[-1]]["error_kind"] == "read" and "missing.jpg" in rows[paths[-1]]["error"]
    assert all(np.isfinite(rows[p]["quality"]) for p in paths[:4])

    with pytest.raises(FileNotFoundError, match="neither a shipped model"):
        score_dataset(ds, "no-such-model", image_column="path")
    with pytest.raises(ValueError, match="batch_sizes"):
        score_dataset(ds, TEST_MODEL, image_column="path", batch_sizes=3)
    with pytest.raises(ValueError, match="not full-reference"):
        score_dataset(ds, TEST_MODEL, image_column="path", reference_column="path")


def test_decoded_images_score_as_model_score_scores_the_same_arrays(ray_local, sample,
                                                                    reference_model):
    """ray.data.read_images gives HxWx3 uint8 arrays: scored without a re-encode, equal to
    model.score on those arrays; variable shapes (a ragged tensor column) too."""
    import io

    import ray
    from PIL import Image
    from pipeline_data import SAMPLE

    from iqray.pipeline import score_dataset

    names, images, prompts = sample
    ds = ray.data.read_images(str(SAMPLE / "images"), include_paths=True)
    table = pa.concat_tables(ray.get(score_dataset(ds, TEST_MODEL, batch_size=8)
                                     .to_arrow_refs()))
    assert table.num_rows == len(names)
    assert set(table["status"].to_pylist()) == {"ok"}
    arrays = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in images]
    expected = reference_model.score(arrays, [None] * len(arrays))
    order = [names.index(p.rsplit("/", 1)[1]) for p in table["path"].to_pylist()]
    np.testing.assert_allclose(table["quality"].to_numpy(),
                               np.asarray(expected["quality"])[order], atol=1e-5)

    # variable shapes (a ragged tensor column), and greyscale HxW images
    for decoded, as_rgb in (([arrays[0], arrays[1][:300, :200]], None),
                            ([arrays[2][:, :, 0], arrays[3][:, :, 1]],
                             lambda a: np.repeat(a[:, :, None], 3, axis=2))):
        ds = ray.data.from_items([{"image": a, "n": i} for i, a in enumerate(decoded)])
        scored = score_dataset(ds, TEST_MODEL, batch_size=2).drop_columns(["image"])
        table = pa.concat_tables(ray.get(scored.to_arrow_refs())).sort_by("n")
        assert table["status"].to_pylist() == ["ok"] * 2, table["error"].to_pylist()
        want = reference_model.score([as_rgb(a) if as_rgb else a for a in decoded],
                                     [None] * 2)
        np.testing.assert_allclose(table["quality"].to_numpy(),
                                   np.asarray(want["quality"]), atol=1e-5)
        sha = table["image_sha256"].to_pylist()
        assert len(set(sha)) == 2 and all(len(s) == 64 for s in sha)


def test_an_image_column_of_an_unsupported_type_is_refused_before_running(ray_local):
    import ray

    from iqray.pipeline import score_dataset

    floats = ray.data.from_items([{"image": 0.5, "caption": "x"}])
    with pytest.raises(ValueError, match="the image column 'image' holds double; "
                       "score_dataset takes encoded image bytes"):
        score_dataset(floats, TEST_MODEL)
    with pytest.raises(ValueError, match="no image column 'jpg' in the dataset; columns: "
                       "image, caption"):
        score_dataset(floats, TEST_MODEL, image_column="jpg")
    pixels = ray.data.from_items([{"image": np.zeros((8, 8, 3), np.float32)}])
    with pytest.raises(ValueError, match="holds ArrowTensorTypeV2.*float"):
        score_dataset(pixels, TEST_MODEL)
