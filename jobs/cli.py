"""The ``iqray`` command: one subcommand per job, each with its own pydantic config."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field

from iqray.jobs.config import (
    ConfigError,
    JobConfig,
    RepeatedFlag,
    add_config_flags,
    build_config,
)


class InfoConfig(JobConfig):
    """`iqray info`: what a model is, where its weights come from, what it outputs."""

    model: str = Field(default="iqray-small-agiqa3k",
                       description="shipped model, preset name or checkpoint path")
    device: str = Field(default="cpu", description="cpu, cuda, cuda:N or auto")
    cache_dir: str | None = Field(default=None, description="extra dir to look for weights in")


def run_info(config: InfoConfig) -> int:
    """What was loaded: a trained checkpoint says what it was trained on and how (its own
    record), a preset says what it is; then towers, parameters and outputs."""
    import iqray.model
    from iqray.model.checkpoint import checkpoint_files, read_checkpoint_config
    from iqray.model.registry import architecture, resolve_name
    from iqray.model.version import iqray_version

    print(f"iqray {iqray_version()}; shipped models: "
          f"{', '.join(iqray.model.shipped_models())}; presets: "
          f"{', '.join(iqray.model.preset_names())}")
    model = iqray.model.load(config.model, device=config.device, cache_dir=config.cache_dir)
    resolved = resolve_name(config.model)
    record = {}
    if resolved.kind == "checkpoint":  # loaded above, so its files are there
        record = read_checkpoint_config(checkpoint_files(resolved.location)[0])[1]
    arch = architecture(model)
    kind = ("shipped checkpoint" if resolved.shipped else
            "checkpoint" if resolved.kind == "checkpoint" else "preset")
    print(f"model: {config.model} [{arch.name} ({arch.paper}), {model.mode}, {kind}] "
          f"on {model.device}")
    training = record.get("training", {})
    if model.config.trained and record:
        rows = record.get("metrics", {}).get("rows", {})
        towers = training.get("towers", "frozen")
        print(f"  trained {record.get('created', '?')} with iqray "
              f"{record.get('iqray_version', '?')}: towers {towers}"
              f"{' (trained end to end with the heads)' if towers == 'finetune' else ''}; "
              f"train {training.get('train', '?')} ({rows.get('train', '?')} rows), "
              f"val {training.get('val') or training.get('split_column', '?')} "
              f"({rows.get('val', '?')} rows)")
        val = record.get("metrics", {}).get("val_srcc", {})
        if val:
            heads = {h: v for h, v in val.items() if h != "mean" and isinstance(v, dict)}
            seeds = max((v.get("n", 1) for v in heads.values()), default=1)
            print(f"  val SRCC, mean of {seeds} seeds (chosen on val: held-out data scores "
                  "lower): " + ", ".join(f"{h} {v['mean']:.3f}" for h, v in heads.items()))
    elif getattr(model.config, "description", None):
        print(f"  {model.config.description}")
    for role in model.config.tower_roles:
        tower = getattr(model.config, role)
        source = tower.pretrained or f"random init (seed {tower.init_seed})"
        print(f"  {role} tower: {tower.model_name}, weights: {source}")
    context = getattr(model, "context_length", None)  # models that read prompts
    print(f"  image size: {model.config.image_size} px"
          + (f"; prompt context: {context} tokens" if context else "; no prompt"))
    counts = model.parameter_counts()
    towers_trained = training.get("towers") == "finetune"
    print(f"  parameters: {counts['trainable']:,} in the heads, {counts['frozen']:,} in the "
          f"towers ({'trained, then frozen for scoring' if towers_trained else 'frozen'})")
    supports = [name for name in ("embedding_cache", "full_reference", "finetune", "int8",
                                  "compile") if getattr(arch, name)]
    print(f"  supports: {', '.join(n.replace('_', ' ') for n in supports)}")
    for name, spec in model.score_range.items():
        print(f"  output {name}: [{spec.low:g}, {spec.high:g}], "
              f"{'higher' if spec.higher_better else 'lower'} is better; {spec.description}")
    return 0


@dataclass(frozen=True)
class Job:
    """A subcommand: where its config and runner live (imported only when it runs, so
    `iqray --help` stays fast), one line of help, and fields that may be given bare."""

    module: str
    config: str
    runner: str
    help: str
    positionals: tuple[str, ...] = ()
    uses_ray: bool = True

    def config_class(self) -> type[BaseModel]:
        try:
            module = importlib.import_module(self.module)
        except ModuleNotFoundError as exc:
            if exc.name != self.module.split(".")[0] or self.module.startswith("iqray."):
                raise
            print(f"iqray: this job lives in the {self.module.replace('_', '-')} package, "
                  "which is not installed: pip install ./benchmarks (from iqray's source "
                  "tree)", file=sys.stderr)
            raise SystemExit(2) from None
        return getattr(module, self.config)

    def run(self, config: BaseModel, name: str = "") -> int:
        """Run the job and turn its outcome into an exit code and at most one line on
        stderr (docs/operations.md has the table; each row is tested)."""
        from iqray.pipeline.execution import ErrorBudgetExceeded
        from iqray.pipeline.exit_codes import (
            EXIT_BUG,
            EXIT_ERROR_BUDGET,
            EXIT_INTERRUPTED,
            EXIT_UNFINISHED,
            EXIT_USAGE,
        )
        from iqray.pipeline.io.read import ShardUnfinished
        from iqray.pipeline.io.storage import (
            PERMANENT_OS_ERRORS,
            StorageUnavailable,
            files_written,
        )
        from iqray.pipeline.runtime import stop_local_ray

        name = name or self.runner
        written_before = files_written()  # the count is per process; this run's part

        def written() -> int:
            return files_written() - written_before

        try:
            result = getattr(importlib.import_module(self.module), self.runner)(config)
        except ErrorBudgetExceeded as exc:
            say(f"iqray: aborted: {exc}")
            return EXIT_ERROR_BUDGET
        except (StorageUnavailable, ShardUnfinished) as exc:  # nothing half-done committed
            say(f"iqray: unfinished: {exc}; rerun to finish")
            return EXIT_UNFINISHED
        except (ValueError, *PERMANENT_OS_ERRORS) as exc:  # bad input or config: one line
            count = written()
            if not count:
                say(f"iqray: error: {exc}")
                return EXIT_USAGE
            say(f"iqray: error after this run committed {count} file"
                f"{'' if count == 1 else 's'} (they are kept; fix the cause and rerun to "
                f"finish): {exc}")
            return EXIT_BUG
        except KeyboardInterrupt as exc:  # nothing is lost: commits are atomic, per shard
            done = f" ({exc})" if str(exc) else ""
            say(f"iqray: interrupted{done}; committed shards are kept, rerun the same "
                "command to resume")
            return EXIT_INTERRUPTED
        except Exception as exc:  # noqa: BLE001 - a bug: one line, the traceback in a file
            say(bug_line(name, exc, written()))
            return EXIT_BUG
        finally:
            stop_local_ray()
        return exit_code_of(result)


def say(line: str) -> None:
    """The job's last word on stderr (whatever ``sys.stderr`` is now)."""
    print(line, file=sys.stderr, flush=True)


def bug_line(job: str, exc: BaseException, written: int) -> str:
    """One line for an exception nobody expected: where (a stage and its rows, or the
    driver's file and line) and what; its full traceback goes to a file the line names."""
    import traceback

    from iqray.pipeline.failures import describe, find_stage_bug, write_traceback

    driver = "".join(traceback.format_exception(exc))
    bug = find_stage_bug(exc)
    if bug is not None:
        where, what = f"{bug.stage} stage, {bug.where}", bug.what
        text = f"{bug.traceback_text}\n(raised on the driver as)\n{driver}"
    else:
        frames = traceback.extract_tb(exc.__traceback__)
        last = frames[-1] if frames else None
        where = (f"driver, {Path(last.filename).name}:{last.lineno} in {last.name}"
                 if last else "driver")
        what = describe(exc)
        text = driver
    path = write_traceback(job, text)
    kept = (f"; {written} file{'' if written == 1 else 's'} this run committed are kept"
            if written else "; nothing was written")
    return f"iqray: bug in the {where}: {what} (traceback: {path}){kept}"


def exit_code_of(result) -> int:
    """A runner's result as an exit code: an int as is, a run summary's or a record's own
    (``exit_code``), else 0."""
    if isinstance(result, int):
        return result
    if isinstance(result, dict):
        return int(result.get("exit_code", 0))
    return int(getattr(result, "exit_code", 0))


ALL = "*"  # build_parser: every job's flags
JOBS: dict[str, Job] = {
    "score": Job("iqray.jobs.score", "ScoreConfig", "run_score",
                 "score images from Parquet/CSV/WebDataset/folders (local, S3, GCS) into Parquet",
                 ("input", "output")),
    "embed": Job("iqray.jobs.embed", "EmbedConfig", "run_embed",
                 "cache the frozen towers' embeddings of a dataset (for train/eval/re-scoring)",
                 ("input",)),
    "train": Job("iqray.jobs.train", "TrainConfig", "run_train",
                 "train the fusion and heads (or small towers end to end) on human ratings",
                 ("input",)),
    "eval": Job("iqray.jobs.evaluate", "EvalConfig", "run_eval",
                "SRCC/KRCC/PLCC of a checkpoint on labelled data, per group, with baselines",
                ("input",)),
    "filter": Job("iqray.jobs.filter", "FilterConfig", "run_filter",
                  "keep the scored rows that pass rules (expression, top fraction per group, "
                  "duplicates); optionally copy them out of the source dataset",
                  ("input", "output"), uses_ray=False),
    "preferences": Job("iqray.jobs.preferences", "PreferencesConfig", "run_preferences",
                       "pair images of one prompt into DPO / reward-model / regression "
                       "datasets (Parquet + dataset card)", ("input", "output"),
                       uses_ray=False),
    "report": Job("iqray.jobs.report", "ReportConfig", "run_report",
                  "a self-contained HTML report of a score run: histograms, scatter, best and "
                  "worst images per group, errors", ("input", "output"), uses_ray=False),
    "clean": Job("iqray.jobs.clean", "CleanConfig", "run_clean",
                 "the nightly job: score what is new in each source, filter, write kept/"
                 "rejected manifests and a run record (safe to rerun)"),
    "make-fr": Job("iqray.jobs.make_fr", "MakeFRConfig", "run_make_fr",
                   "build a full-reference training set: graded synthetic distortions of clean "
                   "images (5 kinds x 5 levels), split by source image", ("input", "output"),
                   uses_ray=False),
    # Benchmarks are not part of iqray: the iqray-bench package beside it (benchmarks/).
    "bench": Job("iqray_bench", "BenchConfig", "run_bench",
                 "images/s of the limit, a DataLoader and `iqray score` side by side, fast-path "
                 "fidelity; writes bench.json/png/md"),
    "info": Job("iqray.jobs.cli", "InfoConfig", "run_info",
                "describe a model: towers, weights, parameters, outputs", uses_ray=False),
}


def build_parser(only: str | None = ALL) -> argparse.ArgumentParser:
    """The `iqray` parser. Every job is listed, but only ``only``'s flags are built (its config
    imported), so `iqray --help` and `iqray score ...` import no other job's modules; the
    default builds every job's flags (tests, docs)."""
    from iqray.model.version import iqray_version
    from iqray.pipeline.exit_codes import EXIT_CODES_HELP

    parser = argparse.ArgumentParser(
        prog="iqray",
        description="Batch scoring of AI-generated images for quality and prompt alignment.",
        epilog=EXIT_CODES_HELP,
    )
    parser.add_argument("--version", action="version", version=f"iqray {iqray_version()}")
    sub = parser.add_subparsers(dest="job", metavar="JOB", required=True)
    parser.job_parsers = {}
    for name, job in JOBS.items():
        built = only is ALL or only == name
        config_cls = job.config_class() if built else None
        job_parser = sub.add_parser(name, help=job.help,
                                    description=config_cls.__doc__ if built else job.help,
                                    epilog=EXIT_CODES_HELP if job.uses_ray else None)
        if built:
            add_config_flags(job_parser, config_cls, job.positionals, job=name)
        job_parser.add_argument(
            "-v", "--verbose", action="store_true", default=False,
            help="also show iqray's debug lines and Ray's own console output (Ray's logs "
            "always stay in its session folder, whose path this prints)")
        parser.job_parsers[name] = job_parser
    return parser


def _job_named(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names (its first word that is not a flag), if any."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in JOBS else None
    return None


def _refuse_unknown(parser: argparse.ArgumentParser, args: argparse.Namespace,
                    unknown: list[str]) -> None:
    """argparse's own message names the top-level usage and suggests nothing: say which
    flag of which job, and the nearest real one."""
    import difflib

    job_parser = parser.job_parsers[args.job]
    flags = [o for action in job_parser._actions for o in action.option_strings]
    parts = []
    for word in unknown:
        if word.startswith("-"):
            name = word.split("=", 1)[0]
            close = difflib.get_close_matches(name, flags, n=1, cutoff=0.7)
            parts.append(f"unknown flag {name}"
                         + (f" (did you mean {close[0]}?)" if close else ""))
    if not parts:  # values of unknown flags are not worth naming beside them
        parts = [f"unexpected argument {word!r}" for word in unknown]
    job_parser.exit(2, f"iqray {args.job}: {'; '.join(parts)}; see iqray {args.job} --help\n")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    job_name = _job_named(argv)
    parser = build_parser(only=job_name)
    try:
        args, unknown = parser.parse_known_args(argv)
    except RepeatedFlag as exc:
        parser.exit(2, f"iqray {job_name}: {exc}\n")
    if unknown:
        _refuse_unknown(parser, args, unknown)
    job = JOBS[args.job]
    try:
        config = build_config(job.config_class(), args)
    except ConfigError as exc:
        parser.exit(2, f"iqray {args.job}: {exc}\n")
    from iqray.jobs.console import setup

    setup(verbose=args.verbose)
    if args.verbose:  # Ray's own console lines too, and where its session logs are
        os.environ["IQRAY_VERBOSE"] = "1"
    if not job.uses_ray:
        return job.run(config, args.job)
    from iqray.pipeline.runtime import keep_native_stderr_off_console

    keep_native_stderr_off_console(not args.verbose)
    try:
        return job.run(config, args.job)
    finally:
        keep_native_stderr_off_console(False)


if __name__ == "__main__":
    sys.exit(main())
