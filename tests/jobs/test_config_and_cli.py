"""Job configs (YAML + flags) and the `iqray` entry point."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from iqray.jobs.cli import main
from iqray.jobs.config import ConfigError, JobConfig, add_config_flags, build_config

REPO = Path(__file__).resolve().parents[2]


class Storage(BaseModel):
    endpoint: str | None = None
    anonymous: bool = False


class ExampleJob(JobConfig):
    input: str = Field(default="data/", description="where to read")
    batch_size: int = 32
    sample: float | None = None
    precision: Literal["fp32", "bf16"] = "fp32"
    columns: list[str] = Field(default_factory=lambda: ["key"])
    progress: bool = True
    storage: Storage = Field(default_factory=Storage)


def parse(argv: list[str]) -> ExampleJob:
    parser = argparse.ArgumentParser()
    add_config_flags(parser, ExampleJob)
    return build_config(ExampleJob, parser.parse_args(argv))


def test_defaults_yaml_and_flags_merge_in_that_order(tmp_path):
    assert parse([]) == ExampleJob()
    yaml_file = tmp_path / "job.yaml"
    yaml_file.write_text("batch_size: 8\nprecision: bf16\nstorage:\n  endpoint: http://x:9\n")
    config = parse(["--config", str(yaml_file), "--batch-size", "64", "--no-progress",
                    "--columns", "key", "url", "--storage.anonymous"])
    assert config.batch_size == 64  # flag beats YAML
    assert config.precision == "bf16"  # YAML beats default
    assert config.storage.endpoint == "http://x:9" and config.storage.anonymous is True
    assert config.progress is False and config.columns == ["key", "url"]


def test_typos_and_bad_values_are_clear_errors(tmp_path):
    yaml_file = tmp_path / "job.yaml"
    yaml_file.write_text("batch_sise: 8\n")
    with pytest.raises(ConfigError, match="batch_sise"):
        parse(["--config", str(yaml_file)])
    with pytest.raises(SystemExit):
        parse(["--precision", "int3"])
    yaml_file.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        parse(["--config", str(yaml_file)])


def test_help_lists_every_job():
    out = subprocess.run([sys.executable, "-m", "iqray.jobs.cli", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "info" in out


def test_clean_takes_sources_and_offers_no_input_flag(capsys):
    with pytest.raises(SystemExit) as shown:
        main(["clean", "--help"])
    assert shown.value.code == 0
    flags = capsys.readouterr().out.split()
    assert "--sources" in flags and "--input" not in flags
    assert "OUTPUT" in flags and not any("CFG:" in f for f in flags)  # metavars read as names
    with pytest.raises(SystemExit) as refused:  # an --input would have been ignored
        main(["clean", "--input", "s3://x", "--sources", "s3://y", "--output", "out"])
    assert refused.value.code == 2


def test_train_help_says_what_seed_seeds(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--seed SEED seed of the first repeat (repeat k uses seed + k" in help_text


def test_info_describes_the_default_model(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "model: iqray-small-agiqa3k [mst-clipiqa (arXiv 2606.16799), trained, shipped " \
        "checkpoint]" in out
    # what the checkpoint was trained on, not the preset's "meant to be trained" text
    assert "towers finetune" in out and "agiqa3k/train.csv (2092 rows)" in out
    assert "meant to be trained" not in out and "val SRCC, mean of 4 seeds" in out
    assert "2,036,867 in the heads, 8,308,321 in the towers (trained, then frozen" in out
    assert "fine tower: iqray-small-regnetx002, weights: towers/fine.safetensors" in out
    assert main(["info", "--model", "mst-clipiqa-tiny-random"]) == 0
    out = capsys.readouterr().out
    assert "zero-shot, preset]" in out and "Tiny random-init towers" in out
    assert "coarse tower: iqray-tiny-ViT-32, weights: random init (seed 0)" in out


def test_info_with_a_bad_config_file_exits_with_the_reason(tmp_path, capsys):
    bad = tmp_path / "info.yaml"
    bad.write_text("modle: x\n")
    with pytest.raises(SystemExit) as info:
        main(["info", "--config", str(bad)])
    assert info.value.code == 2
    assert "modle" in capsys.readouterr().err


def test_help_documents_the_exit_codes(capsys):
    from iqray.jobs.cli import build_parser

    for args in (["--help"], ["score", "--help"], ["clean", "--help"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(args)
        text = " ".join(capsys.readouterr().out.split())
        for code in ("0 every input row is in the output", "2 usage or configuration",
                     "3 error budget exceeded", "4 shards left unfinished", "130 interrupted"):
            assert code in text, (args, code)


def test_cli_mistakes_are_one_line_naming_the_flag(capsys):
    from iqray.jobs.cli import main

    for args, expected in [
            (["score", "in/", "out/", "--batchsize", "3"],
             "iqray score: unknown flag --batchsize (did you mean --batch-size?); see iqray "
             "score --help"),
            (["score", "in/", "out/", "extra"], "iqray score: unexpected argument 'extra'"),
            (["score", "in/", "out/", "--batch-size", "-3", "--decode-timeout-s", "0"],
             "iqray score: --batch-size: Input should be greater than 0 (got -3); "
             "--decode-timeout-s: Input should be greater than 0 (got 0.0)"),
            (["clean", "--output", "x"], "iqray clean: --sources: required")]:
        with pytest.raises(SystemExit) as stop:
            main(args)
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(expected), err


def test_required_fields_say_so_in_help(capsys):
    from iqray.jobs.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["score", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "PydanticUndefined" not in text
    assert "one Parquet per input shard (required)" in text


def test_each_job_offers_only_the_options_it_uses_in_sections(capsys):
    from iqray.jobs.cli import build_parser

    parser = build_parser()

    def flags(job: str) -> set[str]:
        return {o for a in parser.job_parsers[job]._actions for o in a.option_strings}

    # embed writes a cache shared by later runs: fp32 only, never a preview, no bpclip mode
    assert not {"--precision", "--limit", "--sample", "--mode"} & flags("embed")
    assert not {"--precision", "--limit", "--sample"} & (flags("train") | flags("eval"))
    assert not {"--limit", "--sample", "--input"} & flags("clean")
    assert {"--precision", "--limit", "--sample", "--dry-run", "--retry-failed"} <= flags(
        "score")
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    out = capsys.readouterr().out
    usage_and_options = out.split("\nexit codes:")[0]
    sections = [line[:-1] for line in usage_and_options.splitlines() if line.endswith(":")
                and not line.startswith(" ")]
    assert sections == ["positional arguments", "options", "input", "preview", "output",
                        "resume", "model", "resources", "cluster", "storage", "run"]
    listed = out[out.index("\ninput:"):]
    assert listed.index("--input INPUT") < listed.index("--format") < listed.index("\npreview:")


def test_configs_in_jobs_configs_still_load(tmp_path):
    from iqray.jobs.cli import JOBS

    folder = REPO / "jobs" / "configs"
    loaded = 0
    for path in sorted(folder.glob("*.yaml")):
        job = "eval" if path.stem.endswith("-eval") else "train"
        config_cls = JOBS[job].config_class()
        build_config(config_cls, argparse.Namespace(config=path))
        loaded += 1
    assert loaded >= 5


def test_resume_hashes_are_those_of_outputs_committed_before_the_configs_were_composed():
    # Values computed by the release before option groups (1649a30): outputs it committed
    # must still be recognised as done, so these must never change.
    from iqray.jobs.embed import EmbedConfig
    from iqray.jobs.score import ScoreConfig

    cases = {"c327eebd9eff35fe": {},
             "ff8616dad8a61e2d": {"reference_column": "ref", "mode": "fr"},
             "7761acae07b3cb02": {"precision": "int8", "decode": "device", "compile": True},
             "33c59b121c20f003": {"image_column": "jpg", "prompt_column": "caption",
                                  "key_columns": ["key"], "keep_prompt": False,
                                  "max_pixels": 1000}}
    for expected, options in cases.items():
        config = ScoreConfig(input="in", output="out", **options)
        assert config.scoring_hash("identity-1") == expected, options
    embed = EmbedConfig(input="in", cache="c", image_root="r", dtype="float32")
    assert embed.index_hash("towers-1") == "37505ee00e0eeadd"


@pytest.mark.parametrize("args, flag", [
    (["--image-column", "jpg_0", "--image-column", "jpg_1"], "--image-column"),
    (["--batch-size", "8", "--batch-size", "16"], "--batch-size"),
    (["--progress", "--no-progress"], "--progress"),
    (["--key-columns", "a", "--key-columns", "b"], "--key-columns"),
    (["--model", "a", "--model", "b"], "--model"),
])
def test_single_valued_flags_given_twice_are_refused_in_one_line(capsys, args, flag):
    with pytest.raises(SystemExit) as stop:
        main(["score", "in/", "out/", *args])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"iqray score: {flag} given twice"), err
    assert "give it once" in err


def test_a_config_file_and_a_flag_still_combine(tmp_path):
    yaml_file = tmp_path / "job.yaml"
    yaml_file.write_text("batch_size: 8\n")
    config = parse(["--config", str(yaml_file), "--batch-size", "64"])
    assert config.batch_size == 64  # a flag overriding the file is not a repetition
    with pytest.raises(Exception, match="given twice"):
        parse(["--config", str(yaml_file), "--config", str(yaml_file)])


@pytest.mark.parametrize("job", ["info", "train", "eval"])
def test_an_unknown_model_is_one_line_and_exit_2(capsys, tmp_path, job):
    args = {"info": ["info", "--model", "mst-clipiqa-tiyn"],
            "train": ["train", str(tmp_path / "labels.csv"), "--model", "mst-clipiqa-tiyn",
                      "--val", str(tmp_path / "labels.csv"), "--output", str(tmp_path / "ckpt")],
            "eval": ["eval", str(tmp_path / "labels.csv"), "--model", "mst-clipiqa-tiyn",
                     "--output", str(tmp_path / "eval")]}[job]
    (tmp_path / "labels.csv").write_text("name,prompt,mos_quality\na.jpg,x,1\n")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("iqray: error: model 'mst-clipiqa-tiyn' is neither a shipped model")
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "eval").exists()
