"""What each model output means (range, direction, how it is made), from a model's config
alone: `model.score_range`, the output footers and `iqray report` all read it here, and the
driver computes it without building the model (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass

from iqray.model.config import BPCLIPConfig, MSTConfig

CLIPSCORE_WEIGHT = 2.5  # Hessel et al. 2021: CLIPScore = 2.5 * max(cos, 0)


@dataclass(frozen=True)
class ScoreSpec:
    """What one output column means (pyiqa-style): range, direction, provenance."""

    low: float
    high: float
    higher_better: bool
    zero_shot: bool
    description: str


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
                                   "NaN/null without a prompt"),
        }
    q, a = config.quality_scale, config.alignment_scale
    return {
        "quality": ScoreSpec(q.low, q.high, True, False,
                             "trained quality head, on the training data's MOS scale"),
        "alignment": ScoreSpec(a.low, a.high, True, False,
                               "trained alignment head, on the training data's MOS scale; "
                               "NaN/null without a prompt"),
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
