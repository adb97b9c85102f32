"""The architecture registry: what each architecture supports, and name resolution."""

from __future__ import annotations

import pytest

import iqray.model
from iqray.model.registry import ARCHITECTURES, architecture, resolve_name, unknown_model


def _minimal_config(name: str) -> dict:
    """The preset of each architecture (every built-in one ships one)."""
    import json
    from importlib import resources

    folder = resources.files("iqray.model") / "configs" / "presets"
    for path in sorted(folder.iterdir()):
        if path.name.endswith(".json"):
            raw = json.loads(path.read_text())
            if raw.get("architecture") == name:
                return raw
    raise AssertionError(f"no preset of {name}")


def test_every_architecture_builds_from_its_config_and_declares_its_heads():
    for name, arch in ARCHITECTURES.items():
        config_type = arch.config_type()
        assert config_type.model_fields["architecture"].default == name
        assert hasattr(arch.model_type(), "from_config")
        # what a model learns from ratings is among what it outputs, in the same order
        specs = arch.outputs(config_type.model_validate(_minimal_config(name)))
        assert arch.heads and list(arch.heads) == [o for o in specs if o in arch.heads]
    model = iqray.model.load("mst-clipiqa-tiny-random")
    assert architecture(model) is ARCHITECTURES["mst-clipiqa"]
    assert architecture(model.config) is architecture({}) is ARCHITECTURES["mst-clipiqa"]
    assert list(model.output_names) == list(architecture(model).heads)


def test_jobs_ask_the_registry_and_get_one_line_refusals():
    bpclip = ARCHITECTURES["bpclip"]
    with pytest.raises(ValueError, match=r"^--compile is not offered by bpclip models "
                                         r"\(only mst-clipiqa\)$"):
        bpclip.require("compile", "--compile")
    ARCHITECTURES["mst-clipiqa"].require("embedding_cache", "iqray embed")  # no error
    with pytest.raises(ValueError, match="unknown model architecture 'vit-iqa'"):
        architecture({"architecture": "vit-iqa"})


def test_names_resolve_once_for_the_loader_and_the_pipeline():
    from iqray.pipeline.io.storage import StorageConfig
    from iqray.pipeline.staging import stage_model

    shipped = resolve_name(iqray.model.DEFAULT_MODEL)
    assert shipped.kind == "checkpoint" and shipped.shipped
    assert resolve_name("mst-clipiqa-tiny-random").kind == "preset"
    assert resolve_name("s3://b/ckpt").location == "s3://b/ckpt"
    message = unknown_model("mst-clipiqa-tiny")
    with pytest.raises(KeyError) as loaded:
        iqray.model.load("mst-clipiqa-tiny")
    with pytest.raises(FileNotFoundError) as staged:
        stage_model("mst-clipiqa-tiny", StorageConfig())
    assert loaded.value.args[0] == str(staged.value) == message
    assert "mst-clipiqa-tiny-random" in message and iqray.model.DEFAULT_MODEL in message
