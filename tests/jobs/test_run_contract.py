"""The data contract at the command line: mistakes fail fast in one line (exit 2) before
Ray starts and write nothing; iqray never writes over what it did not write."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_data import TEST_MODEL, img2dataset_table, write_parquet

from iqray.jobs.cli import main


def tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture()
def dataset(tmp_path, sample) -> Path:
    for i in range(2):
        write_parquet(None, str(tmp_path / "data" / f"{i}.parquet"),
                      img2dataset_table(sample, i * 3, 3))
    return tmp_path / "data"


@pytest.mark.parametrize(("job", "target", "relation"), [
    ("score", ".", "is the input"),
    ("score", "scores", "lies inside the input"),
    ("score", "..", "contains the input"),
    ("embed", "cache", "lies inside the input"),
    ("clean", "..", "contains the input"),
])
def test_an_output_overlapping_the_input_is_refused_before_anything(dataset, capsys, job,
                                                                    target, relation):
    before = tree_hash(dataset.parent)
    output = str(dataset / target)
    args = {"score": ["score", str(dataset), output],
            "embed": ["embed", str(dataset), "--cache", output],
            "clean": ["clean", "--sources", str(dataset), "--output", output]}[job]
    assert main([*args, "--model", TEST_MODEL, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert relation in err and err.count("\n") == 1 and "never writes where it reads" in err
    assert tree_hash(dataset.parent) == before  # nothing read back, nothing written


def test_a_foreign_file_at_an_output_name_is_never_replaced(dataset, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "1.parquet").write_bytes(b"someone else's results")
    before = tree_hash(tmp_path)
    assert main(["score", str(dataset), str(tmp_path / "out"), "--model", TEST_MODEL]) == 2
    err = capsys.readouterr().err
    assert "1.parquet exists and has no iqray footer" in err and err.count("\n") == 1
    assert tree_hash(tmp_path) == before


def run_without_ray(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI in a fresh process whose Ray address leads nowhere: a run that started Ray
    would fail on that address instead of with its own message."""
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}
    return subprocess.run([sys.executable, "-m", "iqray.jobs.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_configuration_mistakes_exit_2_in_one_line_before_ray_starts(dataset, tmp_path):
    out = tmp_path / "out"
    for _ in range(2):  # a rerun fails the same way: nothing was committed
        wrong_column = run_without_ray("score", str(dataset), str(out), "--model", TEST_MODEL,
                                       "--prompt-column", "prompt_text", cwd=tmp_path)
        assert wrong_column.returncode == 2, wrong_column.stderr[-2000:]
        assert wrong_column.stderr.count("\n") == 1, wrong_column.stderr
        assert "no column 'prompt_text' for the prompt; columns: key, jpg, caption, url" in \
            wrong_column.stderr
        assert not out.exists()
    wrong_model = run_without_ray("score", str(dataset), str(out), "--model", "mst-clipiqa-tiny",
                                  cwd=tmp_path)
    assert wrong_model.returncode == 2 and "model 'mst-clipiqa-tiny' is neither" in \
        wrong_model.stderr and wrong_model.stderr.count("\n") == 1
    assert not out.exists()


def test_a_missing_bucket_is_named_with_its_endpoint_before_ray_starts(dataset, tmp_path,
                                                                       s3_bucket, s3_endpoint):
    fs, bucket = s3_bucket
    absent = run_without_ray("score", str(dataset), "s3://no-such-bucket/out", "--model",
                             TEST_MODEL, "--s3-endpoint", s3_endpoint, cwd=tmp_path)
    assert absent.returncode == 2 and absent.stderr.count("\n") == 1, absent.stderr
    assert (f"output s3://no-such-bucket/out: bucket 'no-such-bucket' does not exist at "
            f"{s3_endpoint} (is --s3-endpoint / AWS_ENDPOINT_URL right?)") in absent.stderr
    missing = run_without_ray("score", f"s3://{bucket}/nothing-here", str(tmp_path / "o"),
                              "--model", TEST_MODEL, "--s3-endpoint", s3_endpoint, cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert f"input s3://{bucket}/nothing-here does not exist (bucket '{bucket}' at " \
        f"{s3_endpoint})" in missing.stderr


def path_index(tmp_path, sample, present: int) -> tuple[Path, Path, Path]:
    """An index CSV naming 4 images relative to a root; the right root holds all 4, the
    wrong one only the first ``present``."""
    names, images, prompts = sample
    right, wrong = tmp_path / "images", tmp_path / "elsewhere"
    right.mkdir()
    wrong.mkdir()
    lines = ["name,prompt"]
    for i in range(4):
        (right / names[i]).write_bytes(images[i])
        if i < present:
            (wrong / names[i]).write_bytes(images[i])
        lines.append(f"{names[i]},{prompts[i]!r}".replace("'", '"'))
    index = tmp_path / "index" / "idx.csv"
    index.parent.mkdir()
    index.write_text("\n".join(lines) + "\n")
    return index, right, wrong


def test_an_image_root_under_which_no_path_resolves_fails_before_ray(tmp_path, sample):
    index, _, wrong = path_index(tmp_path, sample, present=0)
    out = tmp_path / "out"
    done = run_without_ray("score", str(index), str(out), "--model", TEST_MODEL,
                           "--image-path-column", "name", "--image-root", str(wrong),
                           cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "image path column 'name'" in done.stderr and f"relative to {wrong}" in \
        done.stderr and f"-> {wrong}/" in done.stderr and "set --image-root" in done.stderr
    assert not out.exists()
    # without --image-root the table's own folder is tried, and named
    done = run_without_ray("score", str(index), str(out), "--model", TEST_MODEL,
                           "--image-path-column", "name", cwd=tmp_path)
    assert done.returncode == 2 and f"the table's folder ({index.parent})" in done.stderr


def test_a_corrected_image_root_rescores_the_rows_it_left_as_errors(ray_local, tmp_path,
                                                                    sample, capsys):
    index, right, wrong = path_index(tmp_path, sample, present=1)
    out = tmp_path / "out"
    args = ["score", str(index), str(out), "--model", TEST_MODEL, "--no-progress",
            "--image-path-column", "name", "--max-error-fraction", "1"]
    assert main([*args, "--image-root", str(wrong)]) == 0
    import pyarrow.parquet as pq

    first = pq.read_table(out / "idx.parquet")
    assert first["status"].to_pylist() == ["ok", "error", "error", "error"]
    assert main([*args, "--image-root", str(right)]) == 0
    assert "0 already committed, 1 to score" in capsys.readouterr().err
    assert pq.read_table(out / "idx.parquet")["status"].to_pylist() == ["ok"] * 4
    assert main([*args, "--image-root", str(right)]) == 0  # and now it is done
    assert "1 already committed, 0 to score" in capsys.readouterr().err
