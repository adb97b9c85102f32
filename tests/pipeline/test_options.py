"""The resume identity is everything that changes a row's output: every field of every
option group is either hashed (ROW_OPTIONS, and changing it changes the hash) or listed
with the reason it changes no output row (NOT_ROW_OPTIONS, and changing it keeps the
hash). A new field in neither list fails here."""

from __future__ import annotations

import importlib
import types
import typing

import pytest
from pydantic import BaseModel, ValidationError

from iqray.jobs.cli import JOBS
from iqray.pipeline.io.shards import InputColumns, Sampling
from iqray.pipeline.io.storage import StorageConfig
from iqray.pipeline.options import OptionGroup, PipelineJob

# The model and --mode change the model's own identity (config + weights), which every
# hash takes as its identity argument; they are not hashed as options.
THROUGH_MODEL_IDENTITY = {"model", "mode"}


def option_groups() -> set[type[BaseModel]]:
    for job in JOBS.values():  # jobs declare groups of their own
        importlib.import_module(job.module)

    def below(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from below(sub)

    groups = {c for c in below(OptionGroup) if "group_title" in c.__dict__}
    return groups | {InputColumns, Sampling, StorageConfig}


def group_fields() -> dict[str, str]:
    return {name: f"{group.__module__}.{group.__name__}" for group in option_groups()
            for name in group.__dict__.get("__annotations__", {}) if name != "group_title"}


def test_every_option_is_either_hashed_or_says_why_it_changes_no_row():
    fields = group_fields()
    assert len(fields) > 50
    unlisted = {n: g for n, g in fields.items()
                if n not in PipelineJob.ROW_OPTIONS and n not in PipelineJob.NOT_ROW_OPTIONS}
    assert not unlisted, f"say whether these change an output row: {unlisted}"
    both = PipelineJob.ROW_OPTIONS & set(PipelineJob.NOT_ROW_OPTIONS)
    assert not both
    stale = (PipelineJob.ROW_OPTIONS | set(PipelineJob.NOT_ROW_OPTIONS)) - set(fields)
    assert not stale, f"no option group has these any more: {stale}"


def other_value(config_cls, name: str, config):
    """A valid value of field ``name`` other than the config's."""
    field = config_cls.model_fields[name]
    annotation = field.annotation
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kinds = ([a for a in typing.get_args(annotation) if a is not type(None)] if union
             else [annotation])
    current = getattr(config, name)
    candidates = []
    for kind in kinds:
        if typing.get_origin(kind) is typing.Literal:
            candidates += list(typing.get_args(kind))
        elif kind is bool:
            candidates.append(not current)
        elif kind is int:
            candidates += [(current or 0) + 7, 3]
        elif kind is float:
            candidates += [0.5, (current or 0) + 1.5]
        elif kind is str:
            candidates.append("other")
        elif typing.get_origin(kind) is list:
            candidates.append(["other"])
    for value in candidates:
        if value == current:
            continue
        try:
            return config_cls(**{**config.model_dump(exclude_unset=True), name: value})
        except ValidationError:
            continue
    raise AssertionError(f"no other valid value for {name}")


def hashes_of(job: str):
    from iqray.jobs.embed import EmbedConfig
    from iqray.jobs.score import ScoreConfig

    if job == "score":
        return ScoreConfig, ScoreConfig(input="in", output="out"), \
            lambda c: c.scoring_hash("model-identity")
    return EmbedConfig, EmbedConfig(input="in", cache="c"), \
        lambda c: c.index_hash("tower-identity")


@pytest.mark.parametrize("job", ["score", "embed"])
def test_changing_an_option_changes_the_resume_identity_exactly_when_it_changes_rows(job):
    config_cls, base, identity = hashes_of(job)
    fields = group_fields()
    checked = 0
    for name in config_cls.model_fields:
        if name not in fields or name in THROUGH_MODEL_IDENTITY:
            continue
        if job == "embed" and name in {"keep_prompt", "keep_image_bytes"}:
            continue
        changed = other_value(config_cls, name, base)
        row_option = name in PipelineJob.ROW_OPTIONS
        assert (identity(changed) != identity(base)) == row_option, (
            f"--{name.replace('_', '-')}: {'hashed' if row_option else 'not hashed'} by "
            "the lists, but the identity says otherwise")
        checked += 1
    assert checked > 30


def test_image_root_and_sidecar_enter_the_hash_only_when_set():
    from iqray.jobs.score import ScoreConfig

    plain = ScoreConfig(input="in", output="out")
    # outputs committed before these were hashed stay recognised
    assert plain.scoring_hash("identity-1") == "c327eebd9eff35fe"
    rooted = ScoreConfig(input="in", output="out", image_root="/data/images")
    assert rooted.scoring_hash("m") != plain.scoring_hash("m")
    assert ScoreConfig(input="in", output="out", image_root="/data/other").scoring_hash("m") \
        != rooted.scoring_hash("m")
