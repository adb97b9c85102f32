"""Each row of docs/operations.md's exit-code table: what ended a run, its exit code and
its one last line. The CLI's own mapping (``Job.run``) over runners that end each way
(tests/support/outcomes.py), and a real bug in a real Ray stage."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from outcomes import OutcomeConfig
from pipeline_data import SAMPLE

from iqray.jobs.cli import Job
from iqray.jobs.score import ScoreConfig

JOB = Job("outcomes", "OutcomeConfig", "run_outcome", "exit-code table rows")
DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def end(outcome: str, tmp_path, capsys, **extra) -> tuple[int, str]:
    code = JOB.run(OutcomeConfig(outcome=outcome, output=str(tmp_path / "out"), **extra),
                   "score")
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("outcome, code, line", [
    ("ok", 0, None),
    ("usage", 2, "iqray: error: no column 'prompt_text' for the prompt"),
    ("missing", 2, "iqray: error: input data/ does not exist"),
    ("usage_after_commit", 1, "iqray: error after this run committed 1 file (they are kept; "
     "fix the cause and rerun to finish): Unsupported cast from string to float"),
    ("budget", 3, "iqray: aborted: 40 of 100 rows failed"),
    ("storage", 4, "iqray: unfinished: cannot list s3://b/in at http://127.0.0.1:9 after 4 "
     "attempts"),
    ("unfinished", 4, None),
    ("interrupt", 130, "iqray: interrupted (2 of 5 shards committed by this run, 1 were "
     "already); committed shards are kept"),
])
def test_each_way_a_run_ends_has_its_exit_code_and_one_line(tmp_path, capsys, outcome, code,
                                                            line):
    got, err = end(outcome, tmp_path, capsys)
    assert got == code, err
    if line is None:
        assert err == ""
    else:
        assert err.count("\n") == 1 and err.startswith(line), err


def bug_traceback(err: str) -> str:
    match = re.search(r"\(traceback: (\S+)\)", err)
    assert match, err
    return Path(match.group(1)).read_text()


def test_a_bug_on_the_driver_is_exit_1_naming_where_with_its_traceback_in_a_file(
        tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("IQRAY_TRACEBACK_DIR", str(tmp_path / "tracebacks"))
    code, err = end("bug", tmp_path, capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("iqray: bug in the driver, outcomes.py:")
    assert "in _driver_helper: KeyError: 'rows'" in err and "nothing was written" in err
    assert str(tmp_path / "tracebacks") in err
    assert 'return counts["rows"]' in bug_traceback(err)


def test_a_bug_in_a_ray_stage_stops_the_run_at_once_exit_1_never_retried(
        ray_local, tmp_path, capsys, monkeypatch):
    from iqray.model import registry

    monkeypatch.setenv("IQRAY_TRACEBACK_DIR", str(tmp_path / "tracebacks"))
    # The buggy architecture (tests/support/buggy_scorer.py) is known for this test only.
    monkeypatch.setattr(registry, "ARCHITECTURES", dict(registry.ARCHITECTURES))
    monkeypatch.delitem(sys.modules, "buggy_scorer", raising=False)
    (tmp_path / "buggy").mkdir()
    (tmp_path / "buggy" / "config.json").write_text('{"architecture": "buggy"}')
    score = ScoreConfig(input=str(SAMPLE), output=str(tmp_path / "out"),
                        model=str(tmp_path / "buggy" / "config.json"), executor="ray",
                        progress=False)
    code, err = end("stage_bug", tmp_path, capsys, score=score)
    assert code == 1, err
    last = err.splitlines()[-1]
    assert last.startswith("iqray: bug in the model stage, rows of "), last
    assert "KeyError: 'no_such_column'" in last and "nothing was written" in last
    assert "storage" not in err and "rerun" not in last  # not dressed up as an outage
    text = bug_traceback(last)
    assert 'return batch["no_such_column"]' in text and "buggy_scorer.py" in text
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.parquet"))


def test_the_table_in_operations_md_lists_every_code():
    table = DOCS.read_text().split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    codes = {int(row.split("|")[2]) for row in table.splitlines()
             if row.startswith("| ") and row.split("|")[2].strip().isdigit()}
    assert codes == {0, 1, 2, 3, 4, 130}
