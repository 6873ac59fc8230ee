"""Third-party backends: the example plugin (plugins/raysync-zip) installed for real with pip into
a temporary location, listed, used by a Ray task, removed; broken plugins warn and are skipped."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import ray

from raysync.testing import BackendConformance
from tests.conftest import NODE_IP, s3_options

EXAMPLE = Path(__file__).resolve().parents[1] / "plugins" / "raysync-zip"


def pip_install(source: Path, target: Path) -> None:
    """pip install into ``target`` only: the test's own environment is not changed."""
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
    proc = subprocess.run(
        [*pip, "--target", str(target), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def run_py(code: str, site: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if site is not None:
        env["PYTHONPATH"] = str(site)
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )


@pytest.fixture(scope="module")
def zip_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy: pip's setuptools build writes build/ and *.egg-info next to it.
    src = tmp_path_factory.mktemp("src") / "raysync-zip"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    site = tmp_path_factory.mktemp("site")
    pip_install(src, site)
    return site


DRIVER = textwrap.dedent(
    """
    import json, sys
    import ray
    from raysync import isolated_export

    site, gcs, uri, options, out = sys.argv[1:6]
    # Workers find the plugin the way the driver does: on their PYTHONPATH.
    ray.init(address=gcs, _node_ip_address="{ip}", log_to_driver=False,
             runtime_env={{"env_vars": {{"PYTHONPATH": site}}}})

    @ray.remote
    @isolated_export(uri, storage_options=json.loads(options))
    def run(run_id):
        from pathlib import Path
        Path("export/a.txt").write_text("through a third-party backend")
        Path("data/b.bin").write_bytes(bytes(range(256)) * 100)
        return run_id

    r = ray.get(run.remote("p1"), timeout=300)
    r.materialize(out)
    print(json.dumps({{"uri": r.uri, "backend": r.backend, "value": r.value}}))
    """
).format(ip=NODE_IP)


def test_the_example_plugin_installs_lists_exports_through_ray_and_uninstalls(
    zip_site: Path, ray_wd: Path, moto_endpoint: str, bucket: str, tmp_path: Path
) -> None:
    # raysync backends (a fresh process) lists it: name, schemes, version, capabilities.
    listing = run_py("import raysync.cli as c; c.main(['backends', '--json'])", zip_site)
    assert listing.returncode == 0, listing.stderr
    rows = {r["name"]: r for r in json.loads(listing.stdout)}
    assert rows["zip"]["source"] == "raysync-zip" and rows["zip"]["version"] == "0.1.0"
    assert "zip+" in rows["zip"]["schemes_label"]
    assert rows["zip"]["capabilities"] == ["read_back"]

    # A Ray task exports through its scheme; the archive reads back verified.
    uri = f"zip+s3://{bucket}/runs/{{run_id}}.zip"
    out = tmp_path / "out"
    gcs = ray.get_runtime_context().gcs_address
    opts = json.dumps(s3_options(moto_endpoint))
    proc = run_py(DRIVER, zip_site, str(zip_site), gcs, uri, opts, str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"uri": f"zip+s3://{bucket}/runs/p1.zip", "backend": "zip", "value": "p1"}
    assert (out / "export" / "a.txt").read_text() == "through a third-party backend"
    assert (out / "data" / "b.bin").read_bytes() == bytes(range(256)) * 100

    # Without the plugin, the scheme is a clear error that lists what is installed.
    gone = run_py(
        "from raysync import isolated_export\n"
        "isolated_export('zip+s3://b/{run_id}.zip')(lambda run_id: None)",
        None,
    )
    assert gone.returncode != 0
    assert "BackendNotFoundError: no backend for scheme 'zip+s3://'" in gone.stderr
    assert "installed backends: fsspec" in gone.stderr and "rsync (rsync://" in gone.stderr


def test_the_example_plugin_passes_the_conformance_suite_unchanged(zip_site: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(zip_site)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=EXAMPLE,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    # Every check of the suite ran and passed (some are parametrized: at least one each).
    checks = [n for n in dir(BackendConformance) if n.startswith("test_")]
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= len(checks) > 5, proc.stdout[-3000:]
    assert "skipped" not in proc.stdout and "failed" not in proc.stdout


BROKEN = {
    "raysync-broken-import": ("raysync_broken_import", "import no_such_module_anywhere\n"),
    "raysync-bad-hook": (
        "raysync_bad_hook",
        "import raysync\n\n"
        "@raysync.hookimpl\n"
        "def raysync_register_backends(register, unexpected):\n"
        "    pass\n",
    ),
}


def test_broken_third_party_plugins_warn_once_each_and_the_others_still_work(
    tmp_path: Path,
) -> None:
    site = tmp_path / "site"
    for dist, (module, code) in BROKEN.items():
        src = tmp_path / dist
        (src / module).mkdir(parents=True)
        (src / module / "__init__.py").write_text(code)
        (src / "pyproject.toml").write_text(
            '[build-system]\nrequires = ["setuptools>=68"]\n'
            'build-backend = "setuptools.build_meta"\n'
            f'[project]\nname = "{dist}"\nversion = "9.9"\n'
            f'[project.entry-points.raysync]\n{module} = "{module}"\n'
            f'[tool.setuptools]\npackages = ["{module}"]\n'
        )
        pip_install(src, site)
    proc = run_py("import raysync.cli as c; c.main(['backends', '--json'])", site)
    assert proc.returncode == 0, proc.stderr
    names = {r["name"] for r in json.loads(proc.stdout)}
    assert {"local", "value", "fsspec", "rsync", "host"} <= names
    warnings = [line for line in proc.stderr.splitlines() if "could not be loaded" in line]
    assert len(warnings) == 2, proc.stderr
    assert any("raysync-broken-import 9.9" in w and "ModuleNotFoundError" in w for w in warnings)
    assert any("raysync-bad-hook 9.9" in w and "unexpected" in w for w in warnings)
