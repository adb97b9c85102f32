"""`iqray report`: a self-contained page that a real browser renders without errors."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
from pipeline_data import SAMPLE, TEST_MODEL, img2dataset_table, write_parquet

from iqray.jobs.cli import main
from iqray.jobs.score import ScoreConfig, run_score

SECTIONS = ("summary", "meaning", "histograms", "scatter", "grids", "errors")


def render(path):
    """The DOM after load and the console messages of headless Chromium."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (scripts/setup.sh installs Debian's chromium)")
    done = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
         "--v=0", "--dump-dom", f"file://{path}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, console


def test_report_of_the_sample_renders_every_section_offline(ray_local, tmp_path):
    run_score(ScoreConfig(input=str(SAMPLE), output=str(tmp_path / "scores"), model=TEST_MODEL,
                          progress=False), log=lambda *a: None)
    page = tmp_path / "report.html"
    assert main(["report", str(tmp_path / "scores"), str(page), "--per-pattern",
                 r"^images/([^_]+)_", "--grid-size", "2"]) == 0
    text = page.read_text()
    # Self-contained: every image is inline, nothing is fetched.
    assert not re.search(r"""(src|href)=['"]?(https?:|//|file:)""", text)
    # 5 groups x (2 best, 2 worst quality, 2 worst alignment); glide has 2 images: 2 + 0 + 2
    assert len(re.findall(r"src='data:image/jpeg;base64,", text)) == 5 * 2 * 3 + 4
    dom, console = render(page)
    assert console == []
    for section in SECTIONS:
        assert f'id="{section}"' in dom
    for group in ("AttnGAN", "DALLE2", "glide", "midjourney", "sd1.5", "xl2.2"):
        assert f"<h3>{group}</h3>" in dom
    assert dom.count("<h4>worst alignment</h4>") == 6
    # each score's range and direction, as the run's footer recorded them (zero-shot model)
    meaning = dom[dom.index('id="meaning"'):dom.index('id="histograms"')]
    assert "<td>quality</td><td>1 – 5</td><td>higher is better</td>" in meaning
    assert "<td>alignment</td><td>0 – 2.5</td>" in meaning and "zero-shot" in meaning


def test_report_reads_s3_scores_and_shows_errors(ray_local, sample, s3_bucket, s3_endpoint,
                                                 tmp_path):
    fs, bucket = s3_bucket
    table = img2dataset_table(sample, 0, 6)
    jpg = table["jpg"].to_pylist()
    jpg[2] = b"not an image"
    table = table.set_column(table.column_names.index("jpg"), "jpg", [jpg])
    write_parquet(fs, f"{bucket}/in/part-00000.parquet", table)
    run_score(ScoreConfig(input=f"s3://{bucket}/in", output=f"s3://{bucket}/scores",
                          model=TEST_MODEL, progress=False, s3_endpoint=s3_endpoint,
                          max_error_fraction=0.5),
              log=lambda *a: None)
    page = tmp_path / "s3-report.html"
    assert main(["report", f"s3://{bucket}/scores", str(page), "--s3-endpoint", s3_endpoint,
                 "--title", "nightly run"]) == 0
    dom, console = render(page)
    assert console == []
    assert "<title>nightly run</title>" in dom
    errors = dom[dom.index('id="errors"'):]
    assert "<td>decode</td><td>1</td>" in errors


BPCLIP_OUTPUTS = ["quality", "aesthetics", "color", "exposure", "noise_free", "sharpness",
                  "structure"]


def test_report_of_a_bpclip_run_shows_every_output_its_footer_lists(ray_local, tmp_path):
    run_score(ScoreConfig(input=str(SAMPLE), output=str(tmp_path / "scores"),
                          model="bpclip-tiny-random", progress=False), log=lambda *a: None)
    page = tmp_path / "report.html"
    assert main(["report", str(tmp_path / "scores"), str(page), "--grid-size", "2"]) == 0
    dom, console = render(page)
    assert console == []
    summary = dom[dom.index('id="summary"'):dom.index('id="meaning"')]
    assert re.findall(r"<th>mean ([a-z_]+)</th>", summary) == BPCLIP_OUTPUTS
    meaning = dom[dom.index('id="meaning"'):dom.index('id="histograms"')]
    assert re.findall(r"<tr><td>([a-z_]+)</td><td>", meaning) == BPCLIP_OUTPUTS
    grids = dom[dom.index('id="grids"'):dom.index('id="errors"')]
    # no prompts, no alignment: best and worst by quality, every score in each caption
    assert grids.count("<h4>best quality</h4>") == 1 and "worst alignment" not in grids
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", grids)
    assert len(captions) == 4
    for caption in captions:
        assert re.findall(r"([a-z_]+) -?\d+\.\d\d", caption) == BPCLIP_OUTPUTS
    assert "quality against the other scores" in dom


def test_the_report_imports_neither_torch_nor_ray(ray_local, tmp_path):
    """The rule for ``pipeline/tables``, held over a whole report (thumbnails included) in a
    fresh interpreter."""
    run_score(ScoreConfig(input=str(SAMPLE), output=str(tmp_path / "scores"), model=TEST_MODEL,
                          progress=False), log=lambda *a: None)
    program = f"""
import sys
import iqray.pipeline.tables.filtering, iqray.pipeline.tables.joining
import iqray.pipeline.tables.preferences, iqray.pipeline.tables.report
import iqray.pipeline.tables.runs
from iqray.jobs.report import ReportConfig, run_report
done = run_report(ReportConfig(input={str(tmp_path / "scores")!r},
                               output={str(tmp_path / "page.html")!r}, grid_size=2),
                  log=lambda *a: None)
assert done["thumbnails"] > 0, done
print(sorted(m for m in ("torch", "ray", "open_clip") if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"
