"""The README is a user manual: every command and flag it names exists, and its YAML
example is a valid config of the job it is for."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from iqray.jobs.cli import JOBS, build_parser
from iqray.jobs.config import build_config

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
PARSER = build_parser()


def flags_of(job: str) -> set[str]:
    return {o for a in PARSER.job_parsers[job]._actions for o in a.option_strings}


def commands() -> list[list[str]]:
    """Every `iqray JOB ...` line of the README's shell blocks, continuations joined."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("iqray "):
                found.append(shlex.split(line)[1:])
    return found


def test_every_command_in_the_readme_names_a_real_job_and_real_flags():
    used = commands()
    assert len(used) >= 12
    for words in used:
        job, *rest = words
        assert job in JOBS, words
        unknown = [w.split("=")[0] for w in rest if w.startswith("--")
                   and w.split("=")[0] not in flags_of(job)]
        assert not unknown, f"iqray {job}: {unknown}"


def test_every_flag_the_readme_mentions_exists_in_some_job():
    everywhere = set().union(*(flags_of(job) for job in JOBS))
    mentioned = set(re.findall(r"`(--[a-z][a-z0-9-]*)", README))
    assert len(mentioned) >= 10
    assert not sorted(mentioned - everywhere)


def test_the_readme_yaml_example_is_a_valid_clean_config(tmp_path):
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", README, re.S) if "sources:" in b]
    path = tmp_path / "nightly.yaml"
    path.write_text(block)
    config = build_config(JOBS["clean"].config_class(), __import__("argparse").Namespace(
        config=path))
    assert config.sources == yaml.safe_load(block)["sources"] and config.batch_size == 64
