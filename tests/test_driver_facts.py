"""Driver-side facts reach workers even when the function is decorated at import time, before
ray.init(), in a module that workers import again (so decoration re-runs in the worker)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import NODE_IP, files_under, stop_ray

TASKS = """
import os
from pathlib import Path
import ray
from raysync import isolated_export

@ray.remote
@isolated_export("artifacts/{run_id}")
def run(run_id):
    Path("export/out.txt").write_text(run_id)
    return os.getcwd()
"""

DRIVER = f'''
import json, os, sys
import ray
import tasks  # decorated here, before ray.init()

os.chdir(sys.argv[1])  # the driver's cwd at ray.init is what relative paths mean
ray.init(address="local", _node_ip_address="{NODE_IP}", include_dashboard=False,
         runtime_env={{"working_dir": sys.argv[2]}}, log_to_driver=False)
r = ray.get(tasks.run.remote("r1"))
print(json.dumps({{"uri": r.uri, "cwd": r.value}}))
ray.shutdown()
'''


def test_importable_module_decorated_before_ray_init_resolves_to_driver_cwd(
    tmp_path: Path,
) -> None:
    stop_ray()  # this test's driver starts its own local Ray; run one cluster at a time
    code = tmp_path / "code"
    code.mkdir()
    (code / "tasks.py").write_text(TASKS)
    (code / "driver.py").write_text(DRIVER)
    host = tmp_path / "host"
    host.mkdir()
    proc = subprocess.run(
        [sys.executable, str(code / "driver.py"), str(host), str(code)],
        cwd=code,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={"PYTHONPATH": str(code), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["uri"] == f"file://{host / 'artifacts' / 'r1'}"
    assert not out["cwd"].startswith(str(host))
    assert files_under(host / "artifacts" / "r1")["export/out.txt"] == b"r1"
    assert not (code / "artifacts").exists()  # not the cwd at import time, nor the worker's


def make_task() -> object:
    from raysync import isolated_export

    @isolated_export("out/{run_id}")
    def task(run_id: str) -> None:
        Path("export/x.txt").write_text(run_id)

    return task


def test_decorating_again_after_a_chdir_resolves_against_the_new_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same function and URI decorated twice in one driver (a notebook cell re-run after
    # os.chdir): each decoration's relative path means its own cwd.
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        r = make_task()(run_id="r")  # type: ignore[operator]
        assert r.uri == f"file://{tmp_path / name / 'out' / 'r'}"
    assert (tmp_path / "second" / "out" / "r" / "export" / "x.txt").read_text() == "r"
