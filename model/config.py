"""Configs for the models iqray serves: plain data, loadable from JSON/YAML.

Architectures are data (like open_clip's ``model_configs``): a preset is a JSON file in
``configs/presets``, tiny test towers are JSON files in ``configs/towers``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# A generated image is rarely above 4k x 4k; a decompression bomb is far above. Bounding the
# pixel count keeps one hostile file from stalling or exhausting a decode worker.
DEFAULT_MAX_PIXELS = 50_000_000


class _Strict(BaseModel):
    # A typo in a config field must fail loudly, not silently fall back to a default.
    model_config = ConfigDict(extra="forbid")


class TowerConfig(_Strict):
    """One frozen open_clip tower."""

    model_name: str = Field(description="open_clip model name, e.g. 'ViT-B-32'.")
    pretrained: str | None = Field(
        default=None,
        description=(
            "Where the weights come from: a local .safetensors file, or an open_clip pretrained "
            "tag such as 'openai'. None means random init (tests and the offline demo only)."
        ),
    )
    init_seed: int = Field(default=0, description="Seed for random init when pretrained is None.")
    image_size: int | None = Field(
        default=None, gt=0,
        description="Input size in px when it differs from the open_clip config's (small "
        "towers trained from scratch at a lower resolution); None keeps the config's.")


class HeadsConfig(_Strict):
    """Shapes of the trainable part: gated fusion, quality head, alignment head."""

    embed_dim: int = 512
    fusion_hidden: int = 128
    attn_heads: int = 8
    align_mlp_hidden: int = 256
    quality_grades: list[str] = Field(
        default_factory=lambda: ["bad", "poor", "fair", "good", "perfect"]
    )
    quality_template: str = "a photo with {} quality"


class ScoreScale(_Strict):
    """Affine target scale of a head (the training data's MOS range)."""

    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> ScoreScale:
        if not self.high > self.low:
            raise ValueError(f"score scale needs high > low, got [{self.low}, {self.high}]")
        return self


class MSTConfig(_Strict):
    """MST-CLIPIQA: two frozen towers + trainable heads (arXiv 2606.16799)."""

    architecture: Literal["mst-clipiqa"] = "mst-clipiqa"
    description: str = ""
    coarse: TowerConfig
    fine: TowerConfig
    image_size: int = 224
    fine_resize: int | None = Field(
        default=None, gt=0,
        description="None: both towers see the whole image at image_size. A size: the fine "
        "tower sees the centre image_size crop of the image resized to this (detail at a "
        "higher resolution), the coarse tower still the whole image.")
    heads: HeadsConfig = Field(default_factory=HeadsConfig)
    trained: bool = Field(
        default=False,
        description="False: zero-shot outputs (CLIP similarity to graded prompts, CLIPScore).",
    )
    score_reference: dict[str, dict[str, float | int | str]] | None = Field(
        default=None,
        description="Per output: mean/std/n of the model's own scores on a fixed reference "
        "set (its training rows), written by `iqray train`; z-scores are measured against it.")
    quality_scale: ScoreScale = Field(default_factory=lambda: ScoreScale(low=1.0, high=5.0))
    alignment_scale: ScoreScale = Field(default_factory=lambda: ScoreScale(low=0.0, high=1.0))

    @property
    def tower_roles(self) -> tuple[str, ...]:
        return ("coarse", "fine")

    @property
    def embedding_dim(self) -> int:  # of each tower's embedding, as the cache stores it
        return self.heads.embed_dim

    @property
    def output_names(self) -> list[str]:
        return ["quality", "alignment"]

    @property
    def full_reference(self) -> bool:
        return False

    @property
    def prompt_aware(self) -> bool:  # scores depend on the prompt; truncation is reported
        return True


# BPCLIP's text side: 20 antonym pairs (40 adjectives) in 6 dimensions, (good, bad) each.
# The paper names the dimensions but not the words; these are ours (see iqray.model.bpclip).
DEFAULT_ADJECTIVE_PAIRS: dict[str, list[tuple[str, str]]] = {
    "sharpness": [("sharp", "blurry"), ("crisp", "fuzzy"), ("detailed", "smeared"),
                  ("focused", "unfocused")],
    "noise_free": [("clean", "noisy"), ("smooth", "grainy"), ("pristine", "compressed"),
              ("clear", "pixelated")],
    "color": [("colorful", "dull"), ("natural-colored", "discolored"), ("vivid", "faded")],
    "exposure": [("bright", "dark"), ("well-lit", "underexposed"),
                 ("balanced", "overexposed")],
    "structure": [("high-contrast", "low-contrast"), ("coherent", "deformed"),
                  ("realistic", "distorted")],
    "aesthetics": [("good", "bad"), ("beautiful", "ugly"), ("high-quality", "low-quality")],
}


class BPCLIPHeadsConfig(_Strict):
    """Shapes of BPCLIP's trainable part (gated local pooling, bottom-up attention)."""

    width: int = Field(default=256, gt=0, description="common width d of all levels")
    gate_hidden: int = Field(default=64, gt=0, description="bottleneck of each level's gate")
    attn_heads: int = Field(default=4, gt=0)
    mlp_ratio: float = Field(default=2.0, gt=0)
    adjective_pairs: dict[str, list[tuple[str, str]]] = Field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_ADJECTIVE_PAIRS.items()},
        description="dimension -> (positive, negative) adjective pairs")
    adjective_template: str = "a {} photo."

    @property
    def dimensions(self) -> list[str]:
        """Dimension names in sorted order: the order of the pairs the quality layer
        weighs, so it must not depend on how a JSON file happened to order its keys."""
        return sorted(self.adjective_pairs)

    @model_validator(mode="after")
    def _pairs(self) -> BPCLIPHeadsConfig:
        if not self.adjective_pairs or any(not v for v in self.adjective_pairs.values()):
            raise ValueError("adjective_pairs needs at least one pair in every dimension")
        return self


class BPCLIPConfig(_Strict):
    """BPCLIP (arXiv 2506.17969): one frozen tower read at several depths, fused bottom-up."""

    architecture: Literal["bpclip"] = "bpclip"
    description: str = ""
    backbone: TowerConfig
    image_size: int = 224
    depths: list[str] | None = Field(
        default=None, description="where to read features, shallow to deep: module names of "
        "the tower's visual side (e.g. 'layer1'..'layer4' for open_clip ResNets, "
        "'transformer.resblocks.5' for ViTs, 'trunk.s1'.. for timm towers); None = the "
        "tower's four stages (ViT: four evenly spaced blocks)")
    mode: Literal["nr", "fr"] = Field(
        default="nr", description="nr: no-reference; fr: full-reference (a reference image "
        "per row, gated by |F_dist - F_ref|)")
    heads: BPCLIPHeadsConfig = Field(default_factory=BPCLIPHeadsConfig)
    trained: bool = Field(default=False, description="False: zero-shot (CLIP embedding vs "
                          "the antonym pairs, equal weights)")
    score_reference: dict[str, dict[str, float | int | str]] | None = None
    quality_scale: ScoreScale = Field(default_factory=lambda: ScoreScale(low=0.0, high=1.0))

    @property
    def tower_roles(self) -> tuple[str, ...]:
        return ("backbone",)

    @property
    def output_names(self) -> list[str]:
        return ["quality", *self.heads.dimensions]

    @property
    def full_reference(self) -> bool:
        return self.mode == "fr"

    @property
    def prompt_aware(self) -> bool:
        return False

    @property
    def fine_resize(self) -> None:  # one view; the pipeline asks every model
        return None


class AestheticHeadConfig(_Strict):
    """The LAION improved aesthetic predictor's MLP: Linear layers of these widths with
    dropout between the first four and no activation (as published: the ReLUs are
    commented out), so the whole head is affine in the normalised embedding."""

    embed_dim: int = 768  # ViT-L-14's image embedding
    hidden: list[int] = Field(default_factory=lambda: [1024, 128, 64, 16])
    dropout: list[float] = Field(default_factory=lambda: [0.2, 0.2, 0.1])


class LaionAestheticConfig(_Strict):
    """The LAION improved aesthetic predictor: an MLP on the L2-normalised CLIP ViT-L-14
    image embedding, predicting the mean aesthetic rating (about 1-10)."""

    architecture: Literal["laion-aesthetic"] = "laion-aesthetic"
    description: str = ""
    tower: TowerConfig = Field(default_factory=lambda: TowerConfig(model_name="ViT-L-14",
                                                                    pretrained="openai"))
    image_size: int = 224
    heads: AestheticHeadConfig = Field(default_factory=AestheticHeadConfig)
    trained: bool = Field(default=False, description="False: the head is untrained (no "
                          "zero-shot scores); a checkpoint with the predictor's weights, or "
                          "one `iqray train` wrote, is trained")
    score_reference: dict[str, dict[str, float | int | str]] | None = None
    aesthetic_scale: ScoreScale = Field(default_factory=lambda: ScoreScale(low=1.0, high=10.0))

    @property
    def tower_roles(self) -> tuple[str, ...]:
        return ("tower",)

    @property
    def embedding_dim(self) -> int:
        return self.heads.embed_dim

    @property
    def output_names(self) -> list[str]:
        return ["aesthetic"]

    @property
    def full_reference(self) -> bool:
        return False

    @property
    def prompt_aware(self) -> bool:
        return False

    @property
    def fine_resize(self) -> None:  # one view
        return None


ModelConfig = MSTConfig | BPCLIPConfig | LaionAestheticConfig


def parse_model_config(raw: dict[str, Any]) -> ModelConfig:
    """The config class its ``architecture`` names (MST-CLIPIQA when absent: older files)."""
    from iqray.model.registry import architecture

    return architecture(raw).config_type().model_validate(raw)


def preset_names() -> list[str]:
    folder = resources.files("iqray.model") / "configs" / "presets"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def shipped_models() -> dict[str, Path]:
    """Trained checkpoints that ship inside the package (name -> directory)."""
    folder = Path(str(resources.files("iqray.model"))) / "shipped"
    if not folder.is_dir():
        return {}
    return {p.name: p for p in sorted(folder.iterdir()) if (p / "config.json").is_file()}


def load_preset(name: str) -> ModelConfig:
    path = resources.files("iqray.model") / "configs" / "presets" / f"{name}.json"
    if not path.is_file():
        from iqray.model.registry import UnknownModel

        raise UnknownModel(f"unknown model preset {name!r}; known presets: "
                           f"{', '.join(preset_names())}")
    return parse_model_config(json.loads(path.read_text()))
