"""Checkpoint round trips, pickle refusal, and where tower weights come from."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import iqray.model
from iqray.model import CheckpointError, TowerConfig, UnsafeCheckpointError, WeightsNotFoundError
from iqray.model.weights import create_tower, resolve_tower_weights


@pytest.fixture()
def saved_checkpoint(tmp_path, trained_model):
    return iqray.model.save_checkpoint(trained_model, tmp_path / "ckpt",
                                       metrics={"val_srcc_quality": 0.5}, data_hash="abc123")


def test_checkpoint_round_trip_gives_identical_scores(saved_checkpoint, trained_model,
                                                      sample_rows):
    rows = sample_rows[:5]
    images, prompts = [r["path"] for r in rows], [r["prompt"] for r in rows]
    loaded = iqray.model.load(saved_checkpoint)
    assert loaded.mode == "trained"
    np.testing.assert_array_equal(loaded.score(images, prompts)["quality"],
                                  trained_model.score(images, prompts)["quality"])
    np.testing.assert_array_equal(loaded.score(images, prompts)["alignment"],
                                  trained_model.score(images, prompts)["alignment"])
    config = json.loads((saved_checkpoint / "config.json").read_text())
    assert config["metrics"] == {"val_srcc_quality": 0.5} and config["data_hash"] == "abc123"
    assert config["model"]["coarse"]["model_name"] == "iqray-tiny-ViT-32"
    assert sorted(p.name for p in saved_checkpoint.iterdir()) == ["config.json",
                                                                  "model.safetensors"]
    # Loading the weights file directly works the same as the directory.
    direct = iqray.model.load(saved_checkpoint / "model.safetensors")
    torch.testing.assert_close(direct.trainable_state_dict(), loaded.trainable_state_dict())


def test_a_different_model_gives_different_scores_after_reload(tmp_path, sample_rows,
                                                              make_trained_model):
    # Guards the round trip test: a checkpoint of other weights must not score the same.
    other = iqray.model.save_checkpoint(make_trained_model(seed=1), tmp_path / "other")
    images = [r["path"] for r in sample_rows[:3]]
    a = iqray.model.load(other).score(images, ["a cat"] * 3)
    b = make_trained_model(seed=0).score(images, ["a cat"] * 3)
    assert not np.allclose(a["alignment"], b["alignment"])


def test_pickled_checkpoints_are_refused(tmp_path, trained_model):
    pickled = tmp_path / "model.pt"
    torch.save(trained_model.trainable_state_dict(), pickled)
    with pytest.raises(UnsafeCheckpointError, match="pickled checkpoints are refused"):
        iqray.model.load(pickled)


def test_a_pickle_disguised_as_safetensors_is_refused(saved_checkpoint, trained_model):
    torch.save(trained_model.trainable_state_dict(), saved_checkpoint / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        iqray.model.load(saved_checkpoint)


def test_a_directory_with_only_a_pickle_says_so(tmp_path, trained_model, saved_checkpoint):
    (saved_checkpoint / "model.safetensors").unlink()
    torch.save({}, saved_checkpoint / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled files.*refused"):
        iqray.model.load(saved_checkpoint)


def test_a_config_that_does_not_match_the_weights_is_refused(saved_checkpoint):
    config_path = saved_checkpoint / "config.json"
    config = json.loads(config_path.read_text())
    config["model"]["heads"]["align_mlp_hidden"] = 128
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"alignment_head\.mlp\.0\.weight: checkpoint shape "
                                              r"\(256, 1024\), model shape \(128, 1024\)"):
        iqray.model.load(saved_checkpoint)


def test_missing_and_unexpected_parameters_are_named(saved_checkpoint, trained_model):
    tensors = {k: v.contiguous() for k, v in trained_model.trainable_state_dict().items()}
    tensors["extra.weight"] = tensors.pop("fusion.gate.weight")
    save_file(tensors, str(saved_checkpoint / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing parameters: fusion.gate.weight.*"
                                              "unexpected parameters: extra.weight"):
        iqray.model.load(saved_checkpoint)


def test_an_unknown_config_field_is_a_clear_error(saved_checkpoint):
    config_path = saved_checkpoint / "config.json"
    config = json.loads(config_path.read_text())
    config["model"]["heads"]["fusion_hiden"] = 64
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model config is invalid"):
        iqray.model.load(saved_checkpoint)


def test_unknown_names_list_the_presets():
    with pytest.raises(KeyError, match="mst-clipiqa-tiny-random"):
        iqray.model.load("no-such-model")


def test_missing_pretrained_weights_give_the_documented_error(tmp_path):
    tower = TowerConfig(model_name="ViT-B-32", pretrained="openai")
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_tower_weights(tower, cache_dir=tmp_path, allow_download=False)
    message = str(info.value)
    assert str(tmp_path) in message and "huggingface" in message
    assert "Options:" in message and "local .safetensors file" in message
    assert "Downloads are off" in message


def test_a_preset_whose_weights_are_absent_fails_at_load(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsNotFoundError, match="ViT-B-32 with pretrained tag 'openai'"):
        iqray.model.load("mst-clipiqa", cache_dir=tmp_path, allow_download=False)


def test_unknown_tag_and_missing_file_are_explained(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="known tags: .*openai"):
        resolve_tower_weights(TowerConfig(model_name="ViT-B-32", pretrained="no-such-tag"))
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        resolve_tower_weights(TowerConfig(model_name="ViT-B-32",
                                          pretrained=str(tmp_path / "nope.safetensors")))
    with pytest.raises(UnsafeCheckpointError):
        resolve_tower_weights(TowerConfig(model_name="ViT-B-32",
                                          pretrained=str(tmp_path / "tower.pt")))


def test_a_pretrained_tag_resolves_from_a_hugging_face_cache_dir(tmp_path):
    # The layout huggingface_hub writes: models--org--repo/{refs/main, snapshots/<rev>/file}.
    repo = tmp_path / "models--timm--vit_base_patch32_clip_224.openai"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    weights = snapshot / "open_clip_model.safetensors"
    weights.write_bytes(b"placeholder: resolution does not read the file")
    tower = TowerConfig(model_name="ViT-B-32", pretrained="openai")
    assert resolve_tower_weights(tower, cache_dir=tmp_path, allow_download=False) == weights


def test_a_tower_loads_its_weights_from_a_local_safetensors_file(tmp_path):
    source = create_tower(TowerConfig(model_name="iqray-tiny-ViT-32", init_seed=123))
    path = tmp_path / "tower.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = create_tower(TowerConfig(model_name="iqray-tiny-ViT-32", pretrained=str(path)))
    default = create_tower(TowerConfig(model_name="iqray-tiny-ViT-32", init_seed=0))
    torch.testing.assert_close(loaded.state_dict(), source.state_dict())
    assert not torch.equal(default.visual.conv1.weight, source.visual.conv1.weight)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


def test_tower_weights_of_another_architecture_are_refused(tmp_path):
    source = create_tower(TowerConfig(model_name="iqray-tiny-ViT-16"))
    path = tmp_path / "tower16.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match="do not fit this model"):
        create_tower(TowerConfig(model_name="iqray-tiny-ViT-32", pretrained=str(path)))


def test_random_init_towers_are_reproducible_from_their_seed():
    a = create_tower(TowerConfig(model_name="iqray-tiny-ViT-32", init_seed=5))
    b = create_tower(TowerConfig(model_name="iqray-tiny-ViT-32", init_seed=5))
    torch.testing.assert_close(a.state_dict(), b.state_dict())


@pytest.mark.parametrize("name", ["mst-clipiqa-tiny-random", "bpclip-tiny-random"])
def test_a_model_built_twice_from_one_config_is_the_same_model(name):
    # Whatever the global RNG did in between (other tests, user code), the untrained heads
    # come out the same, so scores of an untrained or perturbed model are reproducible.
    first = iqray.model.load(name).state_dict()
    torch.randn(1000)
    second = iqray.model.load(name).state_dict()
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_a_checkpoint_can_carry_towers_trained_here(tmp_path, make_trained_model, sample_rows):
    model = make_trained_model(seed=3)
    with torch.no_grad():  # towers that no pretrained tag or seed reproduces
        for tower in model.towers():
            for param in tower.parameters():
                param.mul_(1.01).add_(0.001)
    model.refresh_grade_text()  # the text tower changed: so did the graded prompts' embeddings
    directory = iqray.model.save_checkpoint(model, tmp_path / "ckpt", include_towers=True)
    config = json.loads((directory / "config.json").read_text())
    assert config["model"]["coarse"]["pretrained"] == "towers/coarse.safetensors"
    assert config["model"]["fine"]["pretrained"] == "towers/fine.safetensors"
    from safetensors import safe_open

    with safe_open(str(directory / "towers" / "fine.safetensors"), "pt") as handle:
        assert all(k.startswith("visual.") for k in handle.keys())  # no unused text tower
    loaded = iqray.model.load(directory)
    images = [r["path"] for r in sample_rows[:3]]
    prompts = [r["prompt"] for r in sample_rows[:3]]
    for key in ("quality", "alignment"):
        np.testing.assert_array_equal(loaded.score(images, prompts)[key],
                                      model.score(images, prompts)[key])
    reseeded = make_trained_model(seed=3)
    assert not np.array_equal(reseeded.score(images, prompts)["quality"],
                              model.score(images, prompts)["quality"])


def test_float16_checkpoints_are_half_the_size_and_score_alike(tmp_path, make_trained_model,
                                                               sample_rows):
    model = make_trained_model(seed=4)
    full = iqray.model.save_checkpoint(model, tmp_path / "fp32", include_towers=True)
    half = iqray.model.save_checkpoint(model, tmp_path / "fp16", include_towers=True,
                                       weights_dtype="float16")

    def size(directory):
        return sum(p.stat().st_size for p in directory.rglob("*.safetensors"))

    assert size(half) < 0.55 * size(full)
    loaded = iqray.model.load(half)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())  # cast back on load
    images = [r["path"] for r in sample_rows[:6]]
    prompts = [r["prompt"] for r in sample_rows[:6]]
    for key in ("quality", "alignment"):
        np.testing.assert_allclose(loaded.score(images, prompts)[key],
                                   model.score(images, prompts)[key], atol=2e-2)
    with pytest.raises(ValueError, match="weights_dtype"):
        iqray.model.save_checkpoint(model, tmp_path / "x", weights_dtype="int8")


def test_a_tower_can_run_at_a_smaller_input_size(tmp_path, sample_rows):
    from iqray.model.config import MSTConfig
    from iqray.model.mst_clipiqa import MSTClipIQA

    preset = iqray.model.load("mst-clipiqa-tiny-random").config.model_dump()
    for role in ("coarse", "fine"):
        preset[role]["image_size"] = 96
    config = MSTConfig.model_validate({**preset, "image_size": 96})
    model = MSTClipIQA.from_config(config)
    assert model.transform.load(sample_rows[0]["path"]).shape == (3, 96, 96)
    scores = model.score([r["path"] for r in sample_rows[:2]],
                         [r["prompt"] for r in sample_rows[:2]])
    assert np.isfinite(scores["quality"]).all()
    with pytest.raises(ValueError, match="96 px input, config says image_size=224"):
        MSTClipIQA.from_config(config.model_copy(update={"image_size": 224}))
