"""The distribution (issue 16): the wheel builds with the lowest setuptools declared, and it
holds raysync and raysync_builtins, the license, and nothing else."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _build(python: str, out: Path, *, isolated: bool) -> Path:
    argv = [python, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)]
    if not isolated:
        argv.insert(4, "--no-build-isolation")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheels = list(out.glob("raysync-*.whl"))
    assert len(wheels) == 1
    return wheels[0]


def _check(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        tops = {n.split("/")[0] for n in names}
        dist = next(t for t in tops if t.endswith(".dist-info"))
        assert tops == {"raysync", "raysync_builtins", dist}, tops
        assert f"{dist}/licenses/LICENSE" in names
        assert "Apache License" in z.read(f"{dist}/licenses/LICENSE").decode()
        meta = z.read(f"{dist}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in meta
    assert "Classifier: Typing :: Typed" in meta
    assert "raysync/py.typed" in names and "raysync_builtins/py.typed" in names
    assert "raysync/demo/pipeline/pipeline.py" in names  # the demo's data files
    assert not any("test" in n.split("/")[0] for n in names)


def test_the_wheel_holds_the_two_packages_and_the_license(tmp_path: Path) -> None:
    _check(_build(sys.executable, tmp_path, isolated=True))


def test_the_wheel_builds_with_the_lowest_setuptools_declared(tmp_path: Path) -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    (floor,) = [r for r in declared if r.startswith("setuptools")]
    lowest = floor.split(">=")[1]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    proc = subprocess.run(
        [python, "-m", "pip", "install", "-q", f"setuptools=={lowest}"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0 and "No matching distribution" in proc.stderr:
        pytest.fail(f"setuptools=={lowest} cannot be installed: declare a version that exists")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check(_build(python, tmp_path / "out", isolated=False))
