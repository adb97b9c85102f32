"""What each model output means (range, direction, how it is made), from a model's config
alone: `model.score_range`, the output footers and `iqray report` all read it here, and the
driver computes it without building the model (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from iqray.model.config import BPCLIPConfig, LaionAestheticConfig, MSTConfig

CLIPSCORE_WEIGHT = 2.5  # Hessel et al. 2021: CLIPScore = 2.5 * max(cos, 0)


@dataclass(frozen=True)
class ScoreSpec:
    """What one output column means (pyiqa-style): range, direction, provenance."""

    low: float
    high: float
    higher_better: bool
    zero_shot: bool
    description: str
    needs_prompt: bool = False  # NaN/null for a row without a prompt


def mst_clipiqa_outputs(config: MSTConfig) -> dict[str, ScoreSpec]:
    """What each output means, from the config alone (the driver records it in the output
    footer without building the model)."""
    if not config.trained:
        n = len(config.heads.quality_grades)
        return {
            "quality": ScoreSpec(1.0, float(n), True, True,
                                 f"zero-shot: expected grade 1..{n} from CLIP similarity "
                                 "to graded quality prompts (coarse tower)"),
            "alignment": ScoreSpec(0.0, CLIPSCORE_WEIGHT, True, True,
                                   "zero-shot: CLIPScore = 2.5*max(cos(image, prompt), 0); "
                                   "NaN/null without a prompt", needs_prompt=True),
        }
    q, a = config.quality_scale, config.alignment_scale
    return {
        "quality": ScoreSpec(q.low, q.high, True, False,
                             "trained quality head, on the training data's MOS scale"),
        "alignment": ScoreSpec(a.low, a.high, True, False,
                               "trained alignment head, on the training data's MOS scale; "
                               "NaN/null without a prompt", needs_prompt=True),
    }


def bpclip_outputs(config: BPCLIPConfig) -> dict[str, ScoreSpec]:
    """What each output means, from the config alone (recorded in output footers)."""
    zero_shot = not config.trained
    q = config.quality_scale
    how = ("zero-shot: mean 'good' probability over the antonym pairs (tower embedding)"
           if zero_shot else "trained quality layer, on the training data's MOS scale")
    if config.full_reference:
        how += "; full-reference (needs a reference image per row)"
    spec = {"quality": ScoreSpec(q.low, q.high, True, zero_shot, how)}
    for name in config.heads.dimensions:
        words = ", ".join(f"{a}/{b}" for a, b in config.heads.adjective_pairs[name])
        spec[name] = ScoreSpec(0.0, 1.0, True, zero_shot,
                               f"mean probability of the good side of {words}")
    return spec


def laion_aesthetic_outputs(config: LaionAestheticConfig) -> dict[str, ScoreSpec]:
    """What the aesthetic score means, from the config alone."""
    scale = config.aesthetic_scale
    return {"aesthetic": ScoreSpec(
        scale.low, scale.high, True, False,
        "LAION improved aesthetic predictor: MLP on the L2-normalised CLIP image embedding; "
        "the mean rating people would give (about 1-10 with the published weights; the "
        "training data's scale when trained with `iqray train`)")}


# Runs written before footers listed their outputs were all MST-CLIPIQA runs.
LEGACY_OUTPUTS: dict[str, dict[str, Any]] = {
    "quality": {"low": 1.0, "high": 5.0, "higher_better": True, "zero_shot": False,
                "description": "quality (recorded before score ranges were)",
                "needs_prompt": False},
    "alignment": {"low": 0.0, "high": 1.0, "higher_better": True, "zero_shot": False,
                  "description": "prompt alignment (recorded before score ranges were)",
                  "needs_prompt": True},
}


@dataclass(frozen=True)
class RunOutputs:
    """The score columns of a run and what each means, as its output footer recorded them:
    what the dataset jobs (filter, preferences, report, clean) and re-scoring rank, pair and
    plot by, whatever the architecture. The first output is the primary score."""

    specs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.specs)

    @property
    def primary(self) -> str:
        if not self.specs:
            raise ValueError("the run lists no score outputs")
        return self.names[0]

    @property
    def prompt_scores(self) -> list[str]:
        """Outputs that compare the image with its prompt (null without one)."""
        return [n for n, s in self.specs.items() if s.get("needs_prompt")]

    def higher_better(self, name: str) -> bool:
        return bool((self.specs.get(name) or {}).get("higher_better", True))

    def within(self, columns) -> RunOutputs:
        """Only the outputs a table holds (a filtered or joined table may drop some)."""
        present = set(columns)
        return RunOutputs({n: s for n, s in self.specs.items() if n in present})


def run_outputs(footer: dict[str, Any] | None) -> RunOutputs:
    """A run's outputs from an output footer: ``outputs`` (names, in order) with
    ``score_range`` (what each means); footers from before either are MST-CLIPIQA's pair.
    Specs recorded before ``needs_prompt`` existed take it from the legacy pair's."""
    footer = footer or {}
    ranges = footer.get("score_range") or {}
    names = list(footer.get("outputs") or ranges or LEGACY_OUTPUTS)
    specs = {}
    for name in names:
        spec = dict(LEGACY_OUTPUTS.get(name) or {"low": float("nan"), "high": float("nan"),
                                                 "higher_better": True, "zero_shot": False,
                                                 "description": name, "needs_prompt": False})
        recorded = ranges.get(name) or {}
        spec.update(recorded)
        if "needs_prompt" not in recorded and name not in LEGACY_OUTPUTS:
            spec["needs_prompt"] = False
        specs[name] = spec
    return RunOutputs(specs)
