"""The life of runs after they are written (issue 19): ``raysync rm``, ``raysync gc``,
``isolated_export(keep_last=N)`` and ``raysync diff``."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import ray

from raysync import isolated_export
from raysync.cli import main
from raysync.dirgc import busy
from raysync.errors import ConfigError
from raysync.manifest import MANIFEST_NAME, Manifest
from tests.destinations import Dest, make_dest


def _cli(capsys: pytest.CaptureFixture[str], dest: Dest, *argv: str) -> tuple[int, Any]:
    args = [*argv]
    if dest.options:
        args += ["--storage-options", json.dumps(dest.options)]
    capsys.readouterr()
    code = main([*args, "--json"])
    out = capsys.readouterr().out
    # Ray may print a dead worker's notice to the driver's stdout first.
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("{"))
    return code, json.loads("\n".join(lines[start:]))


def _watch_ok(dest: Dest, rel: str) -> tuple[threading.Event, list[str]]:
    """A reader polling ``rel``: whenever it finds a manifest, every file it lists must be
    there and whole, unless the manifest itself was gone by the end of the look."""
    stop, bad = threading.Event(), []

    def poll() -> None:
        while not stop.is_set():
            data = dest.read(f"{rel}/{MANIFEST_NAME}")
            if data is not None:
                m = Manifest.from_bytes(data)
                missing = [f.path for f in m.files if dest.read(f"{rel}/{f.path}") is None]
                if missing and dest.read(f"{rel}/{MANIFEST_NAME}") is not None:
                    bad.append(f"run present without {missing[:3]}")
            time.sleep(0.005)

    threading.Thread(target=poll, daemon=True).start()
    return stop, bad


@pytest.mark.parametrize("backend", ["local", "s3", "rsync-mount"])
def test_rm_removes_a_run_whole_while_a_reader_polls(
    backend: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dest = make_dest(request, backend, tmp_path)
    if backend == "rsync-mount":
        request.getfixturevalue("ray_wd")
    monkeypatch.chdir(tmp_path)

    @isolated_export(dest.uri("{name}"), storage_options=dest.options)
    def call(name: str) -> None:
        for i in range(40):
            Path(f"export/f{i:02d}.bin").write_bytes(os.urandom(20_000))

    call(name="gone")
    call(name="kept")
    stop, bad = _watch_ok(dest, "gone")
    time.sleep(0.05)
    try:
        code, out = _cli(capsys, dest, "rm", dest.run_uri("gone"), "--dry-run")
        assert code == 0 and out["dry_run"] and out["bytes"] == 40 * 20_000
        assert dest.read(f"gone/{MANIFEST_NAME}") is not None  # a dry run removes nothing
        code, out = _cli(capsys, dest, "rm", dest.run_uri("gone"))
        time.sleep(0.1)
    finally:
        stop.set()
    assert code == 0 and out["bytes"] == 40 * 20_000
    assert bad == []
    assert dest.files("gone") == {}
    assert dest.verify("kept") == 0
    code, out = _cli(capsys, dest, "rm", dest.run_uri("gone"))
    assert code == 3 and "no committed run" in out["error"]


def test_rm_never_removes_what_is_not_a_run_or_holds_unlisted_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"meow")

    @isolated_export("runs/{name}")
    def call(name: str) -> None:
        Path("export/a.txt").write_text("a")

    call(name="r")
    (tmp_path / "runs" / "r" / "export" / "notes.txt").write_text("mine")
    assert main(["rm", str(tmp_path / "photos")]) == 3
    assert main(["rm", str(tmp_path / "runs" / "r")]) == 3
    err = capsys.readouterr().err
    assert "no committed raysync run" in err or "no committed run" in err
    assert "notes.txt" in err and "never deletes" in err
    assert (tmp_path / "photos" / "cat.jpg").read_bytes() == b"meow"
    assert (tmp_path / "runs" / "r" / "export" / "notes.txt").read_text() == "mine"


def _kill_when(pattern: str) -> None:
    """In a worker: SIGKILL this process as soon as a path matching ``pattern`` exists."""

    def watch() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if list(Path("/").glob(pattern.lstrip("/"))):
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.001)

    threading.Thread(target=watch, daemon=True).start()


@pytest.mark.parametrize("backend", ["local", "rsync-mount"])
def test_gc_removes_what_killed_exports_left_on_a_directory_and_keeps_the_rest(
    backend: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    ray_wd: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dest = make_dest(request, backend, tmp_path)
    assert dest.disk is not None
    root = dest.disk

    @ray.remote(max_retries=0)
    @isolated_export(dest.uri("{name}"), storage_options=dest.options)
    def call(name: str, die: bool) -> None:
        Path("export/big.bin").write_bytes(b"\1" * 200_000_000 if die else b"small")
        if die:
            _kill_when(f"{root}/.{name}.raysync-staging-*/export/*")

    ray.get(call.remote("done", False), timeout=120)
    for name in ("k1", "k2"):
        with pytest.raises(ray.exceptions.WorkerCrashedError):
            ray.get(call.remote(name, True), timeout=120)
    dead = sorted(p.name for p in root.iterdir() if "raysync-staging" in p.name)
    assert len(dead) == 2
    # An export in progress: its staging directory is marked busy by a live process.
    live = root / ".live.raysync-staging-0123456789ab"
    (live / "export").mkdir(parents=True)
    (live / "export" / "part.bin").write_bytes(b"x" * 1000)
    # A user's directory that only looks like raysync's is never a leftover.
    mine = root / ".notes.raysync-staging-mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("mine")
    time.sleep(1.1)  # leftovers younger than a second are never removed
    with busy(live):
        code, out = _cli(capsys, dest, "gc", dest.run_uri(""), "--incomplete-older-than", "0s")
    assert code == 0, out
    assert len(out["leftovers"]) == 2 and out["bytes"] > 0
    assert sorted(p.name for p in root.iterdir() if "raysync-staging" in p.name) == sorted(
        [mine.name, live.name]
    )
    assert (mine / "precious.txt").read_text() == "mine"
    assert (live / "export" / "part.bin").exists()  # the live export is untouched
    assert dest.verify("done") == 0
    # Once its process lets go, it is a leftover like the others.
    time.sleep(1.1)
    code, out = _cli(capsys, dest, "gc", dest.run_uri(""), "--incomplete-older-than", "0s")
    assert code == 0 and [x["kind"] for x in out["leftovers"]] == ["staging"]
    assert not live.exists()


def test_gc_on_s3_removes_dead_locks_objects_and_multipart_uploads(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    ray_wd: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import boto3
    from raysync_builtins.blob import BlobBackend
    from raysync_builtins.blob.gc import Heartbeat

    base = make_dest(request, "s3", tmp_path)
    opts = {**(base.options or {}), "upload_part_size": 5 * 1024 * 1024, "engine": "fsspec"}
    bucket = base.fs_root
    dest = Dest("s3", f"s3://{bucket}/runs", opts, fs=base.fs, fs_root=f"{bucket}/runs")
    endpoint = opts["client_kwargs"]["endpoint_url"]
    creds = {"aws_access_key_id": "x", "aws_secret_access_key": "x", "region_name": "us-east-1"}
    s3 = boto3.client("s3", endpoint_url=endpoint, **creds)

    @ray.remote(max_retries=0)
    @isolated_export(dest.uri("{name}"), storage_options=opts)
    def call(name: str, die: bool) -> None:
        Path("export/small.txt").write_text("small")
        if not die:
            return
        Path("export/big.bin").write_bytes(os.urandom(40 * 1024 * 1024))

        def watch() -> None:  # die once the multipart upload of big.bin has started
            import boto3

            c = boto3.client("s3", endpoint_url=endpoint, **creds)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                ups = c.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
                if any(f"/{name}/" in u["Key"] for u in ups):
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(0.01)

        threading.Thread(target=watch, daemon=True).start()

    ray.get(call.remote("done", False), timeout=120)
    beats = {"env_vars": {"RAYSYNC_HEARTBEAT_SECONDS": "0.3"}}  # its lock beats fast
    with pytest.raises(ray.exceptions.WorkerCrashedError):
        ray.get(call.options(runtime_env=beats).remote("dead", True), timeout=120)
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads")
    assert dest.read("dead/.raysync-lock") is not None
    monkeypatch.setenv("RAYSYNC_HEARTBEAT_SECONDS", "0.3")
    # A user's own multipart uploads: one under the prefix with no raysync lock above it,
    # one in a sibling prefix whose name starts the same: never aborted.
    user_ups = {
        s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        for key in ("runs/user/backup.tar", "runs-archive/x.tar")
    }
    # An export in progress elsewhere under the prefix: its lock beats.
    live_key = f"{dest.fs_root}/live/.raysync-lock"
    dest.fs.pipe_file(live_key, b"{}")
    dest.fs.pipe_file(f"{dest.fs_root}/live/export/part.bin", b"partial")
    engine, _, _ = BlobBackend._open(dest.uri("live"), opts)
    beat = Heartbeat(engine, live_key, b"{}")
    try:
        time.sleep(2.5)  # the dead lock is older than three heartbeats and a store second now
        dest.fs.pipe_file(f"{dest.fs_root}/dead/later/readme.txt", b"put here after it died")
        code, out = _cli(capsys, dest, "gc", dest.prefix, "--incomplete-older-than", "0s")
    finally:
        beat.stop()
    assert code == 0, (out["errors"], out)
    kinds = sorted(x["kind"] for x in out["leftovers"])
    assert kinds == ["dead export (lock)", "incomplete multipart upload"], out
    left = {u["UploadId"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])}
    assert left == user_ups  # the dead export's upload aborted, the user's kept
    assert dest.files("dead") == {"later/readme.txt": b"put here after it died"}
    assert dest.read("live/export/part.bin") == b"partial"  # in progress: untouched
    assert dest.read("live/.raysync-lock") is not None
    assert dest.verify("done") == 0
    for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        s3.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_keep_last_3_over_6_runs_leaves_the_3_newest(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = make_dest(request, backend, tmp_path)
    monkeypatch.chdir(tmp_path)

    @isolated_export(dest.uri("runs/{name}"), storage_options=dest.options, keep_last=3)
    def call(name: str) -> None:
        Path("export/which.txt").write_text(name)

    @isolated_export(dest.uri("runs/{name}"), storage_options=dest.options)
    def other(name: str) -> None:
        Path("export/which.txt").write_text(name)

    other(name="other-fn")  # another function's run: never pruned by this one
    for i in range(6):
        call(name=f"r{i}")
    left = sorted({p.split("/", 1)[0] for p in dest.files("runs") if not p.startswith(".")})
    assert left == ["other-fn", "r3", "r4", "r5"]
    for name in left:
        assert dest.verify(f"runs/{name}") == 0


def test_keep_last_is_refused_where_it_cannot_work() -> None:
    with pytest.raises(ConfigError, match="cannot list runs"):
        isolated_export(None, keep_last=3)
    with pytest.raises(ConfigError, match="positive number"):
        isolated_export("out/{x}", keep_last=0)
    with pytest.raises(ConfigError, match="from a worker"):
        isolated_export("host://out/{x}", keep_last=2)


def test_gc_keep_last_and_older_than_on_committed_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)

    @isolated_export("runs/{name}")
    def call(name: str, fail: bool = False) -> None:
        Path("export/a.txt").write_text(name)
        if fail:
            raise RuntimeError("no")

    for i in range(4):
        call(name=f"r{i}")
    with pytest.raises(RuntimeError):
        call(name="bad", fail=True)
    dest = Dest("local", str(tmp_path), disk=tmp_path)
    code, out = _cli(capsys, dest, "gc", "runs", "--keep-last", "2", "--dry-run")
    assert code == 0 and sorted(out["runs"]) == [
        f"file://{tmp_path}/runs/r0",
        f"file://{tmp_path}/runs/r1",
    ]
    assert (tmp_path / "runs" / "r0").exists()  # dry run
    code, out = _cli(capsys, dest, "gc", "runs", "--keep-last", "2", "--older-than", "1h")
    assert code == 0 and out["runs"] == []  # none is an hour old
    code, out = _cli(capsys, dest, "gc", "runs", "--keep-last", "2")
    assert code == 0 and len(out["runs"]) == 2
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")) == [
        "bad",
        "r2",
        "r3",
    ]  # the failed run is kept unless --include-failed
    assert main(["gc", "runs"]) == 2  # no policy: a usage error
    assert main(["gc", "runs", "--older-than", "soon"]) == 2


def test_diff_names_each_change_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)

    @isolated_export("runs/{name}")
    def call(name: str, files: dict[str, str]) -> None:
        for path, text in files.items():
            Path(path).write_text(text)

    call(name="a", files={"export/same.txt": "s", "export/changed.txt": "1", "export/old.txt": "o"})
    call(name="b", files={"export/same.txt": "s", "export/changed.txt": "2", "export/new.txt": "n"})
    capsys.readouterr()
    assert main(["diff", "runs/a", "runs/b"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "* export/changed.txt",
        "+ export/new.txt",
        "- export/old.txt",
        "1 same, 1 only in B, 1 only in A, 1 changed",
    ]
    assert main(["diff", "runs/a", "runs/a"]) == 0
    capsys.readouterr()
    assert main(["diff", "runs/a", "runs/b", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["counts"] == {"same": 1, "added": 1, "removed": 1, "changed": 1}
    assert doc["identical"] is False


def test_keep_last_keeps_its_own_run_and_counts_only_runs_its_template_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    @isolated_export("exp/{name}/out", keep_last=2)
    def call(name: str) -> None:
        Path("export/x.txt").write_text(name)

    for name in ("a", "b", "c"):
        call(name=name)
    assert sorted(p.name for p in (tmp_path / "exp").iterdir() if (p / "out").exists()) == [
        "b",
        "c",
    ]
    # A run the user moved aside to keep, deeper than the template reaches: never counted.
    (tmp_path / "exp" / "best").mkdir()
    os.rename(tmp_path / "exp" / "b" / "out", tmp_path / "exp" / "best" / "b-out")
    call(name="d")
    call(name="e")
    assert (tmp_path / "exp" / "best" / "b-out" / MANIFEST_NAME).exists()
    assert sorted(p.name for p in (tmp_path / "exp").iterdir() if (p / "out").exists()) == [
        "d",
        "e",
    ]


def test_rm_gc_and_diff_refuse_what_they_cannot_do_safely(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)

    @isolated_export("runs/{name}", checksum="sha256")
    def sha(name: str) -> None:
        Path("export/f.txt").write_text("aaaa")

    @isolated_export("runs/{name}")
    def xxh(name: str) -> None:
        Path("export/f.txt").write_text("bbbb")

    sha(name="s")
    xxh(name="x")
    (tmp_path / "link").symlink_to(tmp_path / "runs" / "s")
    assert main(["rm", str(tmp_path / "link")]) == 3  # a link to a run: not the run
    assert (tmp_path / "runs" / "s" / MANIFEST_NAME).exists()
    assert main(["gc", "/", "--keep-last", "1"]) == 2  # never the whole machine
    capsys.readouterr()
    assert main(["diff", "runs/s", "runs/x"]) == 1  # same size, other bytes, other checksums
    out = capsys.readouterr().out
    assert "? export/f.txt" in out and "1 not compared" in out
    with pytest.raises(ConfigError, match="daemon or over ssh"):
        isolated_export("rsync://127.0.0.1/mod/{x}", keep_last=2)
