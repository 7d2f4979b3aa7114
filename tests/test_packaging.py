"""The wheel a user installs: subpackages mapped under grit_pipeline, no stray top-level modules, runnable."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # builds a wheel with pip, installs it in a fresh venv

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True, cwd=out,
    )
    (path,) = out.glob("grit_pipeline-*.whl")
    return path


def test_wheel_maps_subpackages_and_installs_no_top_level_names(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"grit_pipeline"}
    for module in ("grit_pipeline/stages/serialize.py", "grit_pipeline/stages/text.py", "grit_pipeline/records.py",
                   "grit_pipeline/model/__init__.py", "grit_pipeline/manifests/__init__.py",
                   "grit_pipeline/data/captions_sample.txt"):
        assert module in names


def test_wheel_in_a_clean_venv_imports_and_runs(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(purelib)
    # Dependencies come from the dev environment as a plain path entry: its .pth files (the editable
    # install of this repo among them) are not processed, so grit_pipeline can only come from the wheel.
    Path(purelib, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = (
        "import grit_pipeline, grit_pipeline.stages.serialize as s, grit_pipeline.records as r;"
        f"assert grit_pipeline.__file__.startswith({purelib!r}), grit_pipeline.__file__;"
        "import importlib.util as u; assert all(u.find_spec(m) is None for m in ('stages','model','manifests'));"
        "from click.testing import CliRunner; from grit_pipeline.cli import main;"
        "res = CliRunner().invoke(main, ['phrases', 'a dog in a field of flowers']);"
        "assert res.exit_code == 0, res.output; print(res.output)"
    )
    done = subprocess.run([str(python), "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert '"ref_exps": [[0, 27], [9, 27], [20, 27]]' in done.stdout
