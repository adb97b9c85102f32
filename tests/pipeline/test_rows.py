"""Each stage's output batch against the row contract (pipeline/rows.py), stage by stage in
this process, without a Ray cluster: read -> decode -> model (Scorer, Embedder)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from pipeline_data import TEST_MODEL, img2dataset_table, wds_members, write_parquet, write_tar

from iqray.pipeline import rows as R
from iqray.pipeline.decode import decode_batch, decode_user_batch
from iqray.pipeline.io.discovery import discover_shards
from iqray.pipeline.io.read import read_shard
from iqray.pipeline.io.shards import ReadConfig
from iqray.pipeline.io.storage import StorageConfig

STORAGE = StorageConfig()


@pytest.fixture(scope="module")
def spec():
    from iqray.pipeline.staging import stage_model

    return stage_model(TEST_MODEL, STORAGE)


def _read_batches(url: str, read: ReadConfig) -> list[dict[str, np.ndarray]]:
    shards = discover_shards(url, read, STORAGE)
    return [{name: R.column(values) for name, values in rows.items()}
            for shard in shards for rows in read_shard(shard, read, STORAGE, ["key"])]


def _inputs(tmp_path, sample) -> dict[str, str]:
    table = img2dataset_table(sample, 0, 6)
    jpg = table["jpg"].to_pylist()
    jpg[2] = b"not an image"
    table = table.set_column(table.schema.get_field_index("jpg"), "jpg",
                             pa.array(jpg, pa.binary()))
    write_parquet(None, str(tmp_path / "pq" / "a.parquet"), table)
    write_tar(None, str(tmp_path / "wds" / "a.tar"), wds_members(sample, 0, 5))
    names, images, _ = sample
    (tmp_path / "folder").mkdir()
    for name, data in zip(names[:4], images[:4], strict=True):
        (tmp_path / "folder" / name).write_bytes(data)
    return {"parquet": str(tmp_path / "pq"), "webdataset": str(tmp_path / "wds"),
            "folder": str(tmp_path / "folder")}


def test_every_stage_output_matches_the_row_contract(tmp_path, sample, spec):
    from iqray.pipeline.embed import Embedder
    from iqray.pipeline.scoring import Scorer

    scorer = Scorer(spec, device="cpu", threads=1)
    embedder = Embedder(spec, device="cpu", threads=1)
    outputs = tuple(spec.config.output_names)
    for layout, url in _inputs(tmp_path, sample).items():
        for batch in _read_batches(url, ReadConfig(read_batch_rows=4)):
            assert R.check_batch(batch, "read") == [], layout
            decoded = decode_batch(batch, image_size=spec.config.image_size,
                                   max_pixels=10**7, timeout_s=5, keep_image_bytes=False,
                                   fine_resize=spec.config.fine_resize)
            assert R.check_batch(decoded, "decode") == [], layout
            copy = {k: v.copy() for k, v in decoded.items()}
            assert R.check_batch(scorer(decoded), "model", outputs) == [], layout
            assert R.check_batch(embedder(copy), "embed") == [], layout


def test_the_contract_check_finds_what_a_stage_got_wrong(tmp_path, sample, spec):
    batch = _read_batches(_inputs(tmp_path, sample)["parquet"], ReadConfig())[0]
    broken = {**batch, R.SOURCE_ROW: batch[R.SOURCE_ROW].astype(float)}
    broken.pop(R.SHARD_END)
    assert sorted(R.check_batch(broken, "read")) == [
        "missing _shard_end", "source_row: np.float64(0.0) is not int (never null)"]
    assert R.check_batch(batch, "decode")[:2] == ["missing pixels", "missing image_sha256"]
    assert "still holds _image" in R.check_batch(batch, "decode")


def test_every_private_column_is_named_written_and_read():
    for column in R.COLUMNS.values():
        assert column.written_by in {"read", "decode", "model"}
        assert column.read_by and column.meaning
    assert R.PRIVATE == {n for n in R.COLUMNS if n.startswith("_")}
    for stage, (wanted, removed) in R.STAGE_OUTPUT.items():
        assert set(wanted) <= set(R.COLUMNS) and set(removed) <= set(R.COLUMNS), stage


def test_a_users_rows_decode_and_score_to_typed_public_columns(sample, spec):
    from iqray.pipeline.scoring import Scorer

    names, images, prompts = sample
    batch = {"img": R.column([images[0], {"bytes": images[1], "path": None}, None, 7]),
             "text": R.column(prompts[:4]), "id": np.arange(4)}
    decoded = decode_user_batch(batch, image_column="img", reference_column=None,
                                storage=STORAGE, image_root=None, taken=("quality",),
                                image_size=spec.config.image_size, max_pixels=10**7,
                                timeout_s=5, keep_image_bytes=False,
                                fine_resize=spec.config.fine_resize)
    assert "img" in decoded and R.IMAGE not in decoded
    table = Scorer(spec, device="cpu", threads=1, prompt_column="text", public=True)(decoded)
    assert isinstance(table, pa.Table)
    assert table["status"].to_pylist() == ["ok", "ok", "error", "error"]
    assert table["error_kind"].to_pylist() == [None, None, "missing_image", "bad_type"]
    assert table.schema.field("quality").type == pa.float32()
    assert table.schema.field("error").type == pa.string()
    assert table["id"].to_pylist() == [0, 1, 2, 3]
    assert not [c for c in table.column_names if c.startswith("_") or c == "pixels"]
    with pytest.raises(ValueError, match="already has column"):
        decode_user_batch({**batch, "quality": np.zeros(4)}, image_column="img",
                          reference_column=None, storage=STORAGE, image_root=None,
                          taken=("quality",), image_size=8, max_pixels=10, timeout_s=1,
                          keep_image_bytes=False)
