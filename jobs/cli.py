"""The ``iqray`` command: one subcommand per job, each with its own pydantic config."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from pydantic import BaseModel, Field

from iqray.jobs.config import ConfigError, JobConfig, add_config_flags, build_config


class InfoConfig(JobConfig):
    """`iqray info`: what a model is, where its weights come from, what it outputs."""

    model: str = Field(default="mst-clipiqa-tiny-random",
                       description="model preset name or checkpoint path")
    device: str = Field(default="cpu", description="cpu, cuda, cuda:N or auto")
    cache_dir: str | None = Field(default=None, description="extra dir to look for weights in")


def run_info(config: InfoConfig) -> int:
    import iqray.model
    from iqray.model.checkpoint import iqray_version

    print(f"iqray {iqray_version()}; presets: {', '.join(iqray.model.preset_names())}")
    model = iqray.model.load(config.model, device=config.device, cache_dir=config.cache_dir)
    counts = model.parameter_counts()
    print(f"model: {config.model} [{model.config.architecture}, {model.mode}] on {model.device}")
    if model.config.description:
        print(f"  {model.config.description}")
    for role in ("coarse", "fine"):
        tower = getattr(model.config, role)
        source = tower.pretrained or f"random init (seed {tower.init_seed})"
        print(f"  {role} tower: {tower.model_name}, weights: {source}")
    print(f"  image size: {model.config.image_size} px; prompt context: "
          f"{model.context_length} tokens")
    print(f"  parameters: {counts['trainable']:,} trainable, {counts['frozen']:,} frozen")
    for name, spec in model.score_range.items():
        print(f"  output {name}: [{spec.low:g}, {spec.high:g}], "
              f"{'higher' if spec.higher_better else 'lower'} is better; {spec.description}")
    return 0


def run_score_job(config) -> int:
    import logging

    import ray.data  # noqa: F401  (configures its loggers on import; adjust them after)

    from iqray.pipeline.execution import ErrorBudgetExceeded
    from iqray.pipeline.score import run_score

    # Ray Data's per-operator INFO lines drown the summary a user reads; warnings stay.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        run_score(config)
    except ErrorBudgetExceeded as exc:
        print(f"iqray score: aborted: {exc}", file=sys.stderr)
        return 3
    return 0


def run_embed_job(config) -> int:
    import logging

    import ray.data  # noqa: F401

    from iqray.pipeline.embed import run_embed

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    run_embed(config)
    return 0


def run_train_job(config) -> int:
    import logging

    import ray.data  # noqa: F401

    from iqray.jobs.train import run_train

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    run_train(config)
    return 0


def run_eval_job(config) -> int:
    import logging

    import ray.data  # noqa: F401

    from iqray.jobs.evaluate import run_eval

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    run_eval(config)
    return 0


def _eval_config():
    from iqray.jobs.evaluate import EvalConfig

    return EvalConfig


def _train_config():
    from iqray.jobs.train import TrainConfig

    return TrainConfig


def _embed_config():
    from iqray.pipeline.embed import EmbedConfig

    return EmbedConfig


def _score_config():
    from iqray.pipeline.score import ScoreConfig

    return ScoreConfig


# name -> (config class factory, runner, one-line help, positional fields).
JOBS: dict[str, tuple[Callable[[], type[BaseModel]], Callable[[BaseModel], int], str,
                      tuple[str, ...]]] = {
    "score": (_score_config, run_score_job,
              "score images from Parquet/WebDataset/folders (local, S3, GCS) into Parquet",
              ("input", "output")),
    "embed": (_embed_config, run_embed_job,
              "cache the frozen towers' embeddings of a dataset (for train/eval/re-scoring)",
              ("input",)),
    "train": (_train_config, run_train_job,
              "train the fusion and heads on human ratings (embeddings cached)", ("input",)),
    "eval": (_eval_config, run_eval_job,
             "SRCC/KRCC/PLCC of a checkpoint on labelled data, per group, with baselines",
             ("input",)),
    "info": (lambda: InfoConfig, run_info,
             "describe a model: towers, weights, parameters, outputs", ()),
}


def build_parser() -> argparse.ArgumentParser:
    from iqray.model.checkpoint import iqray_version

    parser = argparse.ArgumentParser(
        prog="iqray",
        description="Batch scoring of AI-generated images for quality and prompt alignment.",
    )
    parser.add_argument("--version", action="version", version=f"iqray {iqray_version()}")
    sub = parser.add_subparsers(dest="job", metavar="JOB", required=True)
    for name, (config_factory, _, help_text, positionals) in JOBS.items():
        config_cls = config_factory()
        job_parser = sub.add_parser(name, help=help_text, description=config_cls.__doc__)
        add_config_flags(job_parser, config_cls, positionals)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config_factory, runner, _, _ = JOBS[args.job]
    try:
        config = build_config(config_factory(), args)
    except ConfigError as exc:
        parser.exit(2, f"iqray {args.job}: {exc}\n")
    return runner(config)


if __name__ == "__main__":
    sys.exit(main())
