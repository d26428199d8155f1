"""The wheel is the product: built from the source tree, installed into a fresh virtual
environment, it runs `streamrec demo` from an empty folder, with nothing of the repository beside it.

It catches package data missing from the wheel (the console's static files, ...), code that reads
files relative to the checkout (`deploy/`, `docs/`, `../shared`), and dependencies missing from
pyproject.toml. torch is installed first, pinned, as the Makefile does (an open range would pull a
CUDA build); the rest comes from the package index.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TORCH = "torch==2.13.0"  # the Makefile's pin
UNPACKAGED = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".hypothesis", ".ruff_cache", ".import_linter_cache", "node_modules")


def run(args: list[str | Path], timeout: float, **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], check=False, capture_output=True, text=True, timeout=timeout,
                            **kwargs)
    assert result.returncode == 0, f"{args}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def runtime_files() -> set[str]:
    """Every file of the package that is not Python source: what the wheel must carry as data."""
    package = REPO / "streamrec"
    return {path.relative_to(REPO).as_posix() for path in package.rglob("*")
            if path.is_file() and path.suffix not in {".py", ".pyc"} and "__pycache__" not in path.parts}


@pytest.mark.slow
@pytest.mark.timeout(2400)  # build, two installs and a demo on a busy machine
def test_wheel_in_a_fresh_venv_runs_the_demo(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(REPO, source, ignore=UNPACKAGED)
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "build", "--wheel", "--outdir", dist, source], timeout=600)
    (wheel,) = dist.glob("streamrec-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    missing = sorted(runtime_files() - names)
    assert not missing, f"package data missing from the wheel: {missing}"

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], timeout=120)
    python = venv / "bin" / "python"
    run([python, "-m", "pip", "install", "-q", TORCH], timeout=900)
    run([python, "-m", "pip", "install", "-q", wheel], timeout=900)

    empty, home = tmp_path / "empty", tmp_path / "home"
    empty.mkdir()
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("STREAMREC_") and key not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    env |= {"STREAMREC_HOME": str(home), "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"}
    where = run([python, "-c", "import streamrec; print(streamrec.__file__)"], timeout=60, cwd=empty, env=env)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout  # the installed copy, not the checkout

    demo = run([venv / "bin" / "streamrec", "demo", "--data", "synthetic", "--duration", "30"],
               timeout=900, cwd=empty, env=env)
    assert "streamrec demo summary" in demo.stdout, demo.stdout[-3000:]
    assert "hr@10" in demo.stdout, demo.stdout[-3000:]
    plots = list((home / "demo").glob("*/prequential_hr10.png"))
    assert plots and plots[0].stat().st_size > 1000, list(home.rglob("*"))
    assert not any(empty.iterdir()), list(empty.iterdir())  # everything went under STREAMREC_HOME
