"""Faults injected for real (docs/reliability.md): concurrent commits to one run, a full
destination, a read-only destination, a worker killed in the middle of an export.

Every test ends in one of two states: a complete committed run that verifies, or a clear
raysync error with the files still on the node — never a partial run that looks committed."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from raysync import isolated_export
from raysync.errors import DestinationError, RaySyncError, RunExistsError
from raysync.manifest import MANIFEST_NAME, Manifest
from tests.conftest import committed, files_under, kept_workspace, polling_reader, s3_options


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small tmpfs at ``path`` (root only; skips otherwise), unmounted at the end."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def two_writers(uri: str, options: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """Two different calls that commit to the same run at the same moment."""

    @ray.remote(max_retries=0)
    @isolated_export(uri, storage_options=options)
    def write(run_id: str, who: str, start_at: float) -> str:
        for i in range(40):
            Path(f"export/{i}.txt").write_text(f"{who} {i}")
        time.sleep(max(0.0, start_at - time.time()))  # both exports start together
        return who

    start = time.time() + 2
    return write.remote("same", "A", start), write.remote("same", "B", start)


def outcome(refs: tuple[Any, Any]) -> tuple[list[str], list[BaseException]]:
    won, lost = [], []
    for ref in refs:
        try:
            won.append(ray.get(ref, timeout=120).value)
        except RunExistsError as e:
            lost.append(e)
    return won, lost


def test_two_calls_committing_one_local_run_at_once_exactly_one_wins(host: Path) -> None:
    won, lost = outcome(two_writers("runs/{run_id}"))
    assert len(won) == 1 and len(lost) == 1
    files = files_under(host / "runs" / "same")
    files.pop(MANIFEST_NAME)
    assert set(files.values()) == {f"{won[0]} {i}".encode() for i in range(40)}  # never a mix
    committed(host / "runs" / "same")
    assert (kept_workspace(str(lost[0])) / "export" / "0.txt").exists()


def test_two_calls_committing_one_s3_run_at_once_exactly_one_wins(
    ray_wd: Path, moto_endpoint: str, bucket: str
) -> None:
    import s3fs

    won, lost = outcome(two_writers(f"s3://{bucket}/runs/{{run_id}}", s3_options(moto_endpoint)))
    assert len(won) == 1 and len(lost) == 1
    fs = s3fs.S3FileSystem(**s3_options(moto_endpoint))
    manifest = Manifest.from_bytes(fs.cat_file(f"{bucket}/runs/same/{MANIFEST_NAME}"))
    for f in manifest.files:
        assert fs.cat_file(f"{bucket}/runs/same/{f.path}").startswith(won[0].encode())


def test_a_full_destination_is_a_clear_error_with_the_bytes_needed(
    host: Path, tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "small", "1m") as small:

        @ray.remote(max_retries=0)
        @isolated_export(f"{small}/runs/{{run_id}}")
        def big(run_id: str) -> None:
            Path("data/big.bin").write_bytes(random.Random(1).randbytes(3 * 1024 * 1024))

        with pytest.raises(DestinationError) as info:
            ray.get(big.remote("f1"))
        text = str(info.value)
        assert "full" in text and f"{3 * 1024 * 1024:,} bytes" in text
        assert [p.name for p in (small / "runs").iterdir()] == [".raysync-visible"]  # no staging
        assert (kept_workspace(text) / "data" / "big.bin").stat().st_size == 3 * 1024 * 1024


def test_a_destination_turned_read_only_is_a_clear_error_and_keeps_the_files(
    host: Path, tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "ro", "8m") as ro:

        @ray.remote(max_retries=0)
        @isolated_export(f"{ro}/runs/{{run_id}}")
        def run(run_id: str) -> None:
            Path("export/result.txt").write_text("precious")

        ray.get(run.remote("before"))  # writable: the run lands
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        with pytest.raises(DestinationError) as info:
            ray.get(run.remote("after"))
        text = str(info.value)
        assert "read-only" in text
        assert (kept_workspace(text) / "export" / "result.txt").read_text() == "precious"
        committed(ro / "runs" / "before")  # the earlier run is untouched


def test_worker_killed_mid_export_the_retry_commits_and_no_reader_sees_a_partial_run(
    ray_wd: Path, tmp_path: Path
) -> None:
    mount, pids = tmp_path / "mount", tmp_path / "pids"
    pids.mkdir()
    content = random.Random(9).randbytes(20 * 1024 * 1024)

    # rsync with --bwlimit makes the export take seconds: time to kill the worker during it.
    @ray.remote(max_retries=1)
    @isolated_export(
        f"rsync://{mount}/runs/{{run_id}}",
        storage_options={"bwlimit": 5000, "retry_base_delay": 0.05},
    )
    def run(run_id: str, pid_dir: str) -> int:
        Path(pid_dir, f"{os.getpid()}").touch()
        Path("data/big.bin").write_bytes(content)
        return os.getpid()

    dest = mount / "runs" / "k1"
    with polling_reader(dest) as seen_bad:
        ref = run.remote("k1", str(pids))
        killed = None
        deadline = time.monotonic() + 60
        while killed is None and time.monotonic() < deadline:
            staged = list((mount / "runs").glob(".k1.raysync-staging-*/**/*big.bin*"))
            first = sorted(pids.iterdir())
            if first and staged and any(p.stat().st_size > 0 for p in staged):
                killed = int(first[0].name)
                os.kill(killed, signal.SIGKILL)  # the worker, in the middle of its export
            time.sleep(0.05)
        assert killed is not None, "the export never started"
        r = ray.get(ref, timeout=180)
    assert r.value != killed  # the second attempt, in another worker process
    assert seen_bad == []  # no reader ever saw a partial run
    assert (dest / "data" / "big.bin").read_bytes() == content
    assert committed(dest).run["attempt"] == 1
    assert [p.name for p in (mount / "runs").iterdir() if "staging" in p.name] == []


def make_special(kind: str) -> None:
    import stat as st

    if kind == "symlink outside the workspace":
        os.symlink("/etc/hostname", "export/link")
    elif kind == "symlink loop":
        os.symlink("b", "export/a")
        os.symlink("a", "export/b")
    elif kind == "FIFO":
        os.mkfifo("export/pipe")
    elif kind == "device file":
        try:
            os.mknod("export/null", 0o600 | st.S_IFCHR, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("creating a device node needs root")


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("symlink outside the workspace", "UnsafePathError"),
        ("symlink loop", "UnsafePathError"),
        ("FIFO", "TreeError"),
        ("device file", "TreeError"),
    ],
)
def test_special_files_in_a_tree_are_refused_and_nothing_is_committed(
    kind: str, error: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    @isolated_export("runs/{name}", keep_workspace=False)
    def run(name: str) -> None:
        Path("export/good.txt").write_text("good")
        make_special(kind)

    with pytest.raises(Exception) as info:
        run(name="x")
    assert type(info.value).__name__ == error
    assert not (tmp_path / "runs" / "x").exists()  # nothing committed
    assert (kept_workspace(str(info.value)) / "export" / "good.txt").read_text() == "good"


NAMES = {
    "newline": "a\nb.txt",
    "non-UTF-8 bytes": os.fsdecode(b"caf\xe9.txt"),
    "255 bytes": "x" * 251 + ".txt",
    "spaces": "  spaced  name .txt",
    "leading dashes": "-rf --no-preserve-root",
}


@pytest.fixture(params=["local", "rsync", "host", "s3"])
def any_backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, str, dict[str, Any] | None]:
    """(name, output_uri template with {run}, storage_options) for each backend."""
    monkeypatch.chdir(tmp_path)
    if request.param == "local":
        return "local", "runs/{run}", None
    if request.param == "rsync":
        return "rsync", f"rsync://{tmp_path}/runs/{{run}}", None
    if request.param == "host":
        request.getfixturevalue("ray_wd")
        monkeypatch.chdir(tmp_path)
        return "host", "host://runs/{run}", None
    endpoint = request.getfixturevalue("moto_endpoint")
    bucket = request.getfixturevalue("bucket")
    return "s3", f"s3://{bucket}/runs/{{run}}", s3_options(endpoint)


@pytest.mark.parametrize("label", sorted(NAMES))
def test_unusual_file_names_round_trip_exactly_or_are_refused_clearly(
    label: str, any_backend: tuple[str, str, dict[str, Any] | None], tmp_path: Path
) -> None:
    backend, uri, options = any_backend
    name = NAMES[label]

    @isolated_export(uri, storage_options=options)
    def run(run: str) -> None:
        Path("export", name).write_bytes(label.encode())

    if backend == "s3" and label in ("non-UTF-8 bytes", "newline"):
        # An S3 key is UTF-8; obstore refuses a control character in a key before sending
        # anything (and moto answers 404 to a key with a newline, which s3fs sends).
        # Either way: a clear error naming the file, nothing committed, the files kept.
        import s3fs

        with pytest.raises(RaySyncError) as info:
            run(run="n")
        said = str(info.value)
        assert any(
            clear in said
            for clear in (
                "not a valid UTF-8 name",
                "cannot be an object name on this store",
                "1 of 1 file(s) could not be uploaded",
            )
        )
        assert "UTF-8" in said or any(n in said for n in ("a\\nb.txt", "a\nb.txt"))  # named
        assert (kept_workspace(str(info.value)) / "export" / name).exists()
        fs = s3fs.S3FileSystem(**(options or {}))
        assert not fs.exists(uri.format(run="n") + "/" + MANIFEST_NAME)
        return
    r = run(run="n")
    assert [f.path for f in r.manifest.files] == [f"export/{name}"]
    back = r.materialize(tmp_path / "back")
    assert (back / "export" / name).read_bytes() == label.encode()


def test_a_direct_call_outside_ray_does_not_start_ray() -> None:
    code = (
        "import os, tempfile, ray\n"
        "from pathlib import Path\n"
        "from raysync import isolated_export\n"
        "os.chdir(tempfile.mkdtemp())\n"
        "@isolated_export(None)\n"
        "def f():\n"
        "    Path('export/a.txt').write_text('a')\n"
        "r = f()\n"
        "print(r.manifest.files[0].path, ray.is_initialized())\n"
    )
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["export/a.txt", "False"]


DYING_DRIVER = """
import os, sys, time
from pathlib import Path
import ray
import raysync
from raysync import isolated_export

gcs, info = sys.argv[1], sys.argv[2]
ray.init(address=gcs, _node_ip_address="127.0.0.2", log_to_driver=False)

@ray.remote
@isolated_export(
    "host://out/{run_id}",
    storage_options={"chunk_size": 65536, "window": 1, "direct": False},  # through the sink
)
def run(run_id, info):
    Path(info, "workspace").write_text(f"{raysync.current_workspace().root} {os.getpid()}")
    Path("data/big.bin").write_bytes(bytes(range(256)) * 160_000)  # 40 MB
    return run_id

ray.get(run.remote("r1", info))
print("the export finished before the driver was killed")
"""


def test_the_driver_dying_during_host_sync_commits_nothing_and_the_files_stay_on_the_node(
    ray_wd: Path, tmp_path: Path
) -> None:
    import sys

    import psutil

    cwd, info = tmp_path / "driver", tmp_path / "info"
    cwd.mkdir()
    info.mkdir()
    (cwd / "driver.py").write_text(DYING_DRIVER)
    gcs = ray.get_runtime_context().gcs_address
    driver = subprocess.Popen(
        [sys.executable, "driver.py", gcs, str(info)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            staged = list((cwd / "out").glob(".r1.raysync-staging-*/data/big.bin"))
            if staged and staged[0].stat().st_size > 0:
                break
            assert driver.poll() is None, driver.communicate()[1][-2000:]
            time.sleep(0.05)
        else:
            pytest.fail("the export never started")
        driver.kill()  # the driver dies while its sink receives
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=30)
    workspace, pid = (info / "workspace").read_text().split()
    deadline = time.monotonic() + 60  # Ray ends the dead job's worker
    while psutil.pid_exists(int(pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not psutil.pid_exists(int(pid))
    assert not (cwd / "out" / "r1").exists()  # nothing committed
    kept = Path(workspace) / "data" / "big.bin"
    assert kept.read_bytes() == bytes(range(256)) * 160_000  # the files stay on the node
    # What the dead sink was receiving is shown for what it is: an incomplete run.
    listing = subprocess.run(
        [sys.executable, "-m", "raysync", "ls", "host://out", "--json"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    import json

    runs = json.loads(listing.stdout)
    assert [(Path(r["uri"]).name, r["status"]) for r in runs] == [("r1", "incomplete")]
