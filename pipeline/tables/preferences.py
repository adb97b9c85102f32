"""Preference data from scores: pairs of images of the same prompt, judged by iqray.

Pairing (within each prompt, over rows scored ``ok``):

- ``best_vs_worst``: the best and the worst image of each prompt;
- ``margin``: every pair whose score gap is at least ``margin``;
- ``top_bottom``: each of the top ``k`` against each of the bottom ``k``.

Every strategy drops pairs whose gap is below ``margin`` (ties and near-ties carry no
preference). Candidates are taken strongest gap first, and an image joins at most
``max_uses`` pairs; equal gaps are ordered by a seeded shuffle, so a seed gives one output.
The train/validation split is by prompt (a seeded hash), so no prompt is on both sides; the
splits are named as Hugging Face datasets name them (``train``, ``validation``).

The score to rank by is any output of the run (default: its primary score, e.g. quality), or
``mix``: a weighted mean of the dataset percentiles of the primary score and the first score
that reads the prompt (MST-CLIPIQA: quality and alignment; the raw scales differ,
percentiles do not). A score whose lower values are better is ranked negated, so the ranking
score is always higher-is-better.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import defaultdict
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from iqray.model.outputs import RunOutputs, run_outputs
from iqray.pipeline.tables.runs import score_values

Strategy = Literal["best_vs_worst", "margin", "top_bottom"]


VALIDATION = "validation"  # the held-out split, by its Hugging Face datasets name
MIX = "mix"


class PairRules(BaseModel):
    model_config = ConfigDict(extra="forbid")

    strategy: Strategy = Field(default="best_vs_worst", description="how images of a prompt "
                               "are paired")
    rank_by: str | None = Field(
        default=None, description="score that decides the winner: an output of the run "
        "(default: its primary score) or 'mix'")
    quality_weight: float = Field(default=0.5, ge=0, le=1, description="--rank-by mix: weight "
                                  "of the primary score's percentile (the prompt score, e.g. "
                                  "alignment, gets the rest)")
    margin: float = Field(default=0.1, ge=0, description="smallest score gap of a pair "
                          "(in --rank-by units; near-ties below it are dropped)")
    top_k: int = Field(default=2, gt=0, description="--strategy top_bottom: images per side")
    max_uses: int = Field(default=3, gt=0, description="most pairs one image may join")
    val_fraction: float = Field(default=0.1, ge=0, lt=1,
                                description="fraction of prompts held out as the validation split")
    seed: int = Field(default=0, description="seed of tie order, side order and the split")

    @model_validator(mode="after")
    def _mix(self) -> PairRules:
        if self.rank_by == MIX and self.margin > 1:
            raise ValueError("--rank-by mix ranks by percentiles in [0, 1]: --margin must "
                             "be at most 1")
        return self


@dataclasses.dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: int  # row index into the score table
    rejected: int
    gap: float


def resolve_rank_by(rules: PairRules, outputs: RunOutputs) -> list[str]:
    """The outputs the ranking reads: ``[name]``, or for ``mix`` the primary score and the
    first prompt score (else the second output). ValueError in one line for a name the run
    does not have."""
    if rules.rank_by == MIX:
        others = [n for n in outputs.prompt_scores if n != outputs.primary] or \
            outputs.names[1:]
        if not others:
            raise ValueError(f"--rank-by mix needs two scores; the run has only "
                             f"{outputs.primary}")
        return [outputs.primary, others[0]]
    name = rules.rank_by or outputs.primary
    if name not in outputs.names:
        raise ValueError(f"--rank-by {name!r}: the run has no such score; it has "
                         f"{', '.join(outputs.names)} (or mix)")
    return [name]


def ranking_score(table: pa.Table, rules: PairRules, outputs: RunOutputs | None = None
                  ) -> np.ndarray:
    """The score pairs are ranked by, higher is better; NaN for rows without one."""
    outputs = (outputs or run_outputs(None)).within(table.column_names)
    names = resolve_rank_by(rules, outputs)

    def directed(name: str) -> np.ndarray:
        return (1.0 if outputs.higher_better(name) else -1.0) * score_values(table, name)

    if rules.rank_by != MIX:
        return directed(names[0])
    mixed = np.zeros(table.num_rows)
    for name, weight in zip(names, (rules.quality_weight, 1 - rules.quality_weight),
                            strict=True):
        values = directed(name)
        finite = np.isfinite(values)
        ranks = np.full(table.num_rows, np.nan)
        order = values[finite].argsort(kind="stable").argsort(kind="stable")
        ranks[finite] = order / max(finite.sum() - 1, 1)
        mixed += weight * ranks
    return mixed


def prompt_split(prompt: str, rules: PairRules) -> str:
    digest = hashlib.sha256(f"{rules.seed}:{prompt}".encode()).digest()
    held_out = int.from_bytes(digest[:8], "big") / 2**64 < rules.val_fraction
    return VALIDATION if held_out else "train"


def make_pairs(table: pa.Table, rules: PairRules, outputs: RunOutputs | None = None
               ) -> list[Pair]:
    """Pairs that satisfy the strategy, the margin and ``max_uses``, strongest first."""
    score = ranking_score(table, rules, outputs)
    by_prompt: dict[str, list[int]] = defaultdict(list)
    for i, prompt in enumerate(table["prompt"].to_pylist()):
        if prompt and np.isfinite(score[i]):
            by_prompt[prompt].append(i)
    candidates: list[Pair] = []
    for prompt, rows in by_prompt.items():
        rows = sorted(rows, key=lambda i: -score[i])
        if rules.strategy == "best_vs_worst":
            combos = [(rows[0], rows[-1])] if len(rows) > 1 else []
        elif rules.strategy == "top_bottom":
            k = min(rules.top_k, len(rows) // 2)
            combos = [(a, b) for a in rows[:k] for b in rows[len(rows) - k:]]
        else:
            combos = [(a, b) for n, a in enumerate(rows) for b in rows[n + 1:]]
        candidates.extend(Pair(prompt, a, b, float(score[a] - score[b])) for a, b in combos
                          if score[a] - score[b] >= max(rules.margin, 1e-12))
    rng = np.random.default_rng(rules.seed)
    tiebreak = rng.permutation(len(candidates))
    ordered = sorted(range(len(candidates)), key=lambda n: (-candidates[n].gap, tiebreak[n]))
    uses: dict[int, int] = defaultdict(int)
    pairs = []
    for n in ordered:
        pair = candidates[n]
        if uses[pair.chosen] < rules.max_uses and uses[pair.rejected] < rules.max_uses:
            uses[pair.chosen] += 1
            uses[pair.rejected] += 1
            pairs.append(pair)
    return pairs


FORMATS = ("dpo", "reward", "pointwise")
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def image_array(images: list[bytes], names: list[str]) -> pa.Array:
    """The storage of a `datasets.Image` feature: {bytes, path} structs."""
    return pa.array([{"bytes": b, "path": n} for b, n in zip(images, names, strict=True)],
                    IMAGE_STRUCT)


def hf_schema_metadata(table: pa.Table, image_columns: tuple[str, ...]) -> pa.Table:
    """Attach the `datasets` feature description so `load_dataset("parquet", ...)` decodes
    ``image_columns`` as images and keeps the other types."""
    features = {}
    for field in table.schema:
        if field.name in image_columns:
            features[field.name] = {"_type": "Image"}
        elif pa.types.is_binary(field.type):
            features[field.name] = {"dtype": "binary", "_type": "Value"}
        elif pa.types.is_string(field.type):
            features[field.name] = {"dtype": "string", "_type": "Value"}
        elif pa.types.is_floating(field.type):
            dtype = {"halffloat": "float16", "float": "float32", "double": "float64"}
            features[field.name] = {"dtype": dtype[str(field.type)], "_type": "Value"}
        elif pa.types.is_integer(field.type):
            features[field.name] = {"dtype": str(field.type), "_type": "Value"}
        elif pa.types.is_boolean(field.type):
            features[field.name] = {"dtype": "bool", "_type": "Value"}
    return table.replace_schema_metadata(
        {"huggingface": json.dumps({"info": {"features": features}})})


def pair_table(fmt: str, pairs: list[Pair], table: pa.Table, score: np.ndarray,
               images: dict[int, bytes], seed: int) -> pa.Table:
    """One split of pairs in the layout ``fmt`` expects."""
    keys = [str(k) for k in table["key"].to_pylist()]
    if fmt == "dpo":
        # Pick-a-Pic v2 / Diffusion-DPO: the winner is on a random side, label 1 marks it.
        sides = np.random.default_rng(seed).random(len(pairs)) < 0.5
        first = [p.chosen if s else p.rejected for p, s in zip(pairs, sides, strict=True)]
        second = [p.rejected if s else p.chosen for p, s in zip(pairs, sides, strict=True)]
        return pa.table({
            "caption": pa.array([p.prompt for p in pairs], pa.string()),
            "jpg_0": pa.array([images[i] for i in first], pa.binary()),
            "jpg_1": pa.array([images[i] for i in second], pa.binary()),
            "label_0": pa.array([1.0 if s else 0.0 for s in sides], pa.float64()),
            "label_1": pa.array([0.0 if s else 1.0 for s in sides], pa.float64()),
        })
    chosen, rejected = [p.chosen for p in pairs], [p.rejected for p in pairs]
    return hf_schema_metadata(pa.table({
        "prompt": pa.array([p.prompt for p in pairs], pa.string()),
        "image_chosen": image_array([images[i] for i in chosen], [keys[i] for i in chosen]),
        "image_rejected": image_array([images[i] for i in rejected],
                                      [keys[i] for i in rejected]),
        "score_chosen": pa.array([float(score[i]) for i in chosen], pa.float64()),
        "score_rejected": pa.array([float(score[i]) for i in rejected], pa.float64()),
        "key_chosen": pa.array([keys[i] for i in chosen], pa.string()),
        "key_rejected": pa.array([keys[i] for i in rejected], pa.string()),
    }), ("image_chosen", "image_rejected"))


def pointwise_table(rows: list[int], table: pa.Table, score: np.ndarray,
                    images: dict[int, bytes]) -> pa.Table:
    prompts = table["prompt"].to_pylist()
    keys = [str(k) for k in table["key"].to_pylist()]
    return hf_schema_metadata(pa.table({
        "prompt": pa.array([prompts[i] for i in rows], pa.string()),
        "image": image_array([images[i] for i in rows], [keys[i] for i in rows]),
        "score": pa.array([float(score[i]) for i in rows], pa.float64()),
        "key": pa.array([keys[i] for i in rows], pa.string()),
    }), ("image",))
