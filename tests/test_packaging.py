"""A normal (non-editable) install carries every package and its data: build the wheel, install it
into a temporary folder and import everything from there, away from the source tree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def source_packages() -> list[str]:
    """Every package of the source tree, found by walking it (not by asking setuptools): folders
    under kvdiag/ holding Python files or package data, plus kernels/ as kvdiag.kernels."""
    found = {"kvdiag.kernels"}
    for path in (ROOT / "kvdiag").rglob("*"):
        if path.is_dir() and not path.is_symlink() and path.name != "__pycache__" and any(path.iterdir()):
            if not any(p.is_symlink() for p in path.relative_to(ROOT).parents if p != Path(".")):
                found.add(".".join(path.relative_to(ROOT).parts))
    return sorted({"kvdiag", *found})


CHECK = """
import importlib, json, sys
import kvdiag
names = json.loads(sys.argv[1])
where = {}
for name in names:
    module = importlib.import_module(name)
    where[name] = list(module.__path__)
from kvdiag.quant.grids import grid_names, grid_shape, load_grid
from kvdiag.plots import style
grids = {name: [list(load_grid(name).shape), list(grid_shape(name))] for name in grid_names()}
with style():
    import matplotlib
    constrained = bool(matplotlib.rcParams["figure.constrained_layout.use"])
from importlib.resources import files
data = sorted(str(p.relative_to(files("kvdiag"))) for p in files("kvdiag").joinpath("data").rglob("*") if p.is_file())
print(json.dumps({"file": kvdiag.__file__, "where": where, "grids": grids, "style": constrained, "data": data}))
"""


@pytest.mark.slow
def test_the_wheel_installs_every_package_and_its_data(tmp_path):
    # build from a clean copy: an in-tree build/ folder could carry stale modules into the wheel
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "runs", ".*_cache", "notebooks", "tests"))  # fmt: skip
    if (source / "kvdiag" / "kernels").is_symlink():  # a developer's convenience link; a fresh clone has none
        (source / "kvdiag" / "kernels").unlink()
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "wheel"),
         str(source)], capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    assert "importable" not in build.stderr, build.stderr  # setuptools' "absent from packages" warning
    (wheel,) = (tmp_path / "wheel").glob("kvdiag-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not any(n.startswith("kernels/") for n in names), "kernels installed as a top-level package"

    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr

    packages = source_packages()
    env = {**os.environ, "PYTHONPATH": str(target), "MPLBACKEND": "Agg"}
    run = subprocess.run(
        [sys.executable, "-s", "-c", CHECK, json.dumps(packages)], capture_output=True, text=True,
        cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(result["file"]).is_relative_to(target), result["file"]  # not the source tree
    for name, paths in result["where"].items():
        assert paths and all(Path(p).is_relative_to(target) for p in paths), (name, paths)
    assert len(result["grids"]) >= 8
    for name, (loaded, declared) in result["grids"].items():
        assert sorted(loaded) == sorted(declared) and len(loaded) == 2, name  # loads, with its declared size
    assert result["style"] is True
    shipped = sorted(
        str(p.relative_to(ROOT / "kvdiag")) for p in (ROOT / "kvdiag" / "data").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )  # fmt: skip
    assert result["data"] == shipped  # every data file of the source tree is installed
