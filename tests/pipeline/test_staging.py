"""Staging a checkpoint from object storage (driver side): its reads retry transport errors
like every other storage call, and give up in one line."""

from __future__ import annotations

import pytest
from fault_proxy import Fault
from pipeline_data import TEST_MODEL

from iqray.pipeline.io.storage import StorageConfig, StorageUnavailable
from iqray.pipeline.staging import stage_model

FAST = {"s3_max_attempts": 1, "storage_attempts": 4, "storage_backoff_s": 0.01}


@pytest.fixture()
def checkpoint_on_s3(s3_bucket, tmp_path):
    import iqray.model

    fs, bucket = s3_bucket
    local = iqray.model.save_checkpoint(iqray.model.load(TEST_MODEL), tmp_path / "ckpt",
                                        include_towers=True)
    fs.put(str(local), f"{bucket}/models/v1", recursive=True)
    return f"s3://{bucket}/models/v1"


def test_staging_reads_retry_transport_errors(checkpoint_on_s3, fault_proxy):
    storage = StorageConfig(s3_endpoint=fault_proxy.url, **FAST)
    clean = stage_model(checkpoint_on_s3, storage)
    # every lookup and read fails twice (botocore's own retries are off: s3_max_attempts 1)
    fault_proxy.set(Fault("503", "HEAD", first=2), Fault("500", "GET", first=2))
    faulty = stage_model(checkpoint_on_s3, storage)
    assert fault_proxy.injected[("503", "HEAD")] > 0 and fault_proxy.injected[("500", "GET")] > 0
    assert faulty.identity == clean.identity
    assert sorted(faulty.files) == sorted(clean.files) == \
        ["model.safetensors", "towers/coarse.safetensors", "towers/fine.safetensors"]
    assert faulty.files == clean.files


def test_staging_gives_up_in_one_line_naming_the_file(checkpoint_on_s3, fault_proxy):
    storage = StorageConfig(s3_endpoint=fault_proxy.url, **FAST)
    fault_proxy.set(Fault("500", "GET", key="model.safetensors"))
    with pytest.raises(StorageUnavailable) as caught:
        stage_model(checkpoint_on_s3, storage)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"cannot read model weights {checkpoint_on_s3}/model.safetensors")
    assert "after 4 attempts" in message


def test_a_bare_model_config_stages_and_loads_like_a_checkpoint(tmp_path):
    """A config.json holding only a model config (no "format", no weights) is a checkpoint
    of untrained heads: the staged copy loads where the model actors load it."""
    import json

    import iqray.model
    from iqray.model.config import load_preset

    folder = tmp_path / "bare"
    folder.mkdir()
    config = load_preset(TEST_MODEL).model_dump(mode="json")
    (folder / "config.json").write_text(json.dumps(config))
    spec = stage_model(str(folder), StorageConfig())
    assert spec.raw_config["format"] == "iqray-checkpoint"
    staged = spec.load()
    direct = iqray.model.load(str(folder / "config.json"))
    assert staged.config == direct.config
