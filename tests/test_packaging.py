"""The distribution: one import namespace from three folders, in editable and wheel form."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]



def fresh_python(code: str) -> str:
    """What ``code`` prints in a new interpreter (outside the repo: the installed package)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd="/").stdout

def test_the_three_packages_import_from_one_namespace():
    code = "import iqray.model, iqray.pipeline, iqray.jobs; print(iqray.model.load.__module__)"
    out = fresh_python(code)
    assert out.strip() == "iqray.model"


def test_every_public_model_name_resolves_and_the_star_import_gets_them():
    code = ("import iqray.model as m; names = {}; exec('from iqray.model import *', names); "
            "missing = [n for n in m.__all__ if n not in names]; "
            "print(len(m.__all__), missing, 'save_checkpoint' in names, "
            "'read_checkpoint_config' in names)")
    out = fresh_python(code)
    count, rest = out.split(" ", 1)
    assert int(count) > 20 and rest.strip() == "[] True True"


def test_the_model_package_never_imports_ray():
    code = "import sys, iqray.model; print('ray' in sys.modules)"
    out = fresh_python(code)
    assert out.strip() == "False"


def test_read_and_write_tasks_start_without_torch():
    # Ray runs read_shards and the writer in worker processes that import these modules; torch
    # and open_clip would add about 7 s to each worker's start on a 2-core machine.
    code = ("import sys, iqray.model, iqray.pipeline.graph, iqray.pipeline.io.writer; "
            "print(sorted(m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules))")
    out = fresh_python(code)
    assert out.strip() == "[]"


def test_the_wheel_holds_the_packages_their_data_and_the_console_script(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(REPO)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("iqray-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("iqray/model/__init__.py", "iqray/model/mst_clipiqa.py",
                     "iqray/model/configs/towers/iqray-tiny-ViT-32.json",
                     "iqray/model/configs/presets/mst-clipiqa.json",
                     "iqray/pipeline/__init__.py", "iqray/jobs/cli.py",
                     # the shipped offline model travels inside the wheel
                     "iqray/model/shipped/iqray-small-agiqa3k/config.json",
                     "iqray/model/shipped/iqray-small-agiqa3k/model.safetensors",
                     "iqray/model/shipped/iqray-small-agiqa3k/towers/coarse.safetensors",
                     "iqray/model/shipped/iqray-small-agiqa3k/towers/fine.safetensors"):
        assert expected in names
    assert not any(n.startswith(("tests/", "iqray/tests")) for n in names)
    # benchmarks are their own package (benchmarks/, iqray-bench), not the product's
    assert not any("bench" in n for n in names), [n for n in names if "bench" in n]
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "iqray = iqray.jobs.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_io_and_table_packages_import_neither_ray_nor_torch():
    modules = ["iqray.pipeline.io." + m for m in (
        "storage", "shards", "discovery", "tables", "webdataset", "folder", "read", "writer",
        "embed_cache")] + ["iqray.pipeline.tables." + m for m in (
            "runs", "filtering", "joining", "preferences", "report")] + ["iqray.pipeline.rows"]
    code = (f"import sys, importlib; [importlib.import_module(m) for m in {modules!r}]; "
            "print(sorted(m for m in ('ray', 'torch', 'open_clip') if m in sys.modules))")
    out = fresh_python(code)
    assert out.strip() == "[]"


def test_iqray_help_and_a_jobs_help_import_no_torch_ray_or_other_jobs():
    # `iqray --help` answers from the job table alone; `iqray score --help` imports score's
    # config, which needs neither torch nor Ray (staging a model does not either).
    code = ("import sys, contextlib, io\n"
            "from iqray.jobs.cli import main\n"
            "for argv in (['--help'], ['score', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try: main(argv)\n"
            "        except SystemExit: pass\n"
            "    print(sorted(m for m in ('torch', 'ray', 'open_clip', 'iqray.jobs.train',\n"
            "                             'iqray_bench') if m in sys.modules))\n")
    out = fresh_python(code)
    assert out.split("\n")[:2] == ["[]", "[]"]


def test_iqray_bench_without_its_package_says_how_to_get_it_in_one_line(monkeypatch, capsys):
    from iqray.jobs.cli import main

    monkeypatch.setitem(sys.modules, "iqray_bench", None)  # as on a machine without it
    with pytest.raises(SystemExit) as stop:
        main(["bench", "--images", "4"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        "iqray: this job lives in the iqray-bench package, which is not installed: "
        "pip install ./benchmarks (from iqray's source tree)\n")
