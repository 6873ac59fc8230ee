"""One run from many calls (issue 18): ``isolated_export(shard=..., shards=N)`` commits one
run, all or nothing, when the last shard has exported."""

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

import raysync
from raysync import isolated_export
from raysync.cli import main
from raysync.errors import ConfigError, RunExistsError, ShardClashError
from raysync.manifest import MANIFEST_NAME, Manifest
from tests.destinations import Dest, make_dest

N = 8


def _watch(dest: Dest, rel: str, stop: threading.Event) -> list[str]:
    """Poll the run's manifest until ``stop``: every manifest seen must hold all N shards."""
    bad: list[str] = []

    def poll() -> None:
        while not stop.is_set():
            data = dest.read(f"{rel}/{MANIFEST_NAME}")
            if data is not None:
                m = Manifest.from_bytes(data)
                shards = {f.shard for f in m.files}
                if len(shards) != N or m.run.get("shards") != N:
                    bad.append(f"a committed run with shards {sorted(map(str, shards))}")
            time.sleep(0.01)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    return bad


@pytest.mark.parametrize("backend", ["local", "s3", "host", "rsync-mount"])
def test_eight_tasks_commit_one_run_once_and_no_reader_sees_less(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, ray_wd: Path
) -> None:
    dest = make_dest(request, backend, tmp_path)

    @ray.remote(max_retries=0)
    @isolated_export(
        dest.uri("{step}"), storage_options=dest.options, shard="{rank}", shards="{world}"
    )
    def save(step: str, rank: int, world: int) -> int:
        Path(f"export/rank-{rank}.bin").write_bytes(os.urandom(50_000 + rank))
        Path(f"data/rank-{rank}").mkdir()
        Path(f"data/rank-{rank}/log.txt").write_text(f"rank {rank} of {world}")
        return rank

    stop = threading.Event()
    bad = _watch(dest, "step-1", stop)
    try:
        results = ray.get([save.remote("step-1", r, N) for r in range(N)], timeout=180)
        manifest = raysync.wait_run(results[0].uri, 60, storage_options=dest.options)
    finally:
        stop.set()
    assert bad == []
    assert [r.value for r in results] == list(range(N))
    assert sorted(r.shard for r in results if r.shard) == [str(r) for r in range(N)]
    assert sum(r.committed_run for r in results) == 1  # exactly one shard committed it
    assert manifest.status == "succeeded" and manifest.run["shards"] == N
    assert {f.path: f.shard for f in manifest.files} == {
        **{f"export/rank-{r}.bin": str(r) for r in range(N)},
        **{f"data/rank-{r}/log.txt": str(r) for r in range(N)},
    }
    assert set(manifest.run["shard_calls"]) == {str(r) for r in range(N)}
    assert dest.verify("step-1") == 0
    leftovers = [k for k in dest.files() if "raysync-shards" in k]
    assert leftovers == []  # the shard area is gone once committed


def _kill_mid_export(area_glob: str, big: str) -> None:
    """Kill this worker as soon as its own export has started copying ``big``."""

    def watch() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for p in Path("/").glob(area_glob.lstrip("/")):
                if (p / big).exists():
                    os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.001)

    threading.Thread(target=watch, daemon=True).start()


@pytest.mark.parametrize("retries", [1, 0])
def test_a_shard_killed_mid_export_is_retried_or_the_run_stays_incomplete(
    retries: int, ray_wd: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    marks = tmp_path / "marks"
    marks.mkdir()

    @ray.remote(max_retries=retries)
    @isolated_export(str(runs / "{step}"), shard="{rank}", shards=N)
    def save(step: str, rank: int) -> int:
        Path(f"export/rank-{rank}.txt").write_text(str(rank))
        first = not (marks / str(rank)).exists()
        (marks / str(rank)).touch()
        if rank == 3 and first:
            Path("export/big.bin").write_bytes(b"\0" * 300_000_000)
            _kill_mid_export(f"{runs}/.s.raysync-shards-*/.tmp-*", "export/big.bin")
        return rank

    refs = [save.remote("s", r) for r in range(N)]
    others = ray.get([r for i, r in enumerate(refs) if i != 3], timeout=180)
    assert not any(r.committed_run for r in others)  # shard 3 is still missing
    if retries:
        third = ray.get(refs[3], timeout=180)
        assert third.committed_run
        m = raysync.wait_run(str(runs / "s"), 30)
        assert len({f.shard for f in m.files}) == N
        # The retry replaced the dead attempt's shard: its half-copied file is not in the run.
        assert not (runs / "s" / "export" / "big.bin").exists()
        assert {f.path for f in m.files if f.shard == "3"} == {"export/rank-3.txt"}
    else:
        with pytest.raises(ray.exceptions.WorkerCrashedError):
            ray.get(refs[3], timeout=180)
        assert not (runs / "s" / MANIFEST_NAME).exists()
        capsys.readouterr()
        assert main(["ls", str(runs)]) == 0
        listing = capsys.readouterr().out
        assert "incomplete" in listing and "7/8 shards" in listing
        with pytest.raises(raysync.errors.RunTimeoutError):
            raysync.wait_run(str(runs / "s"), 0.5)


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_two_shards_finishing_at_the_same_instant_commit_exactly_one_manifest(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, ray_wd: Path
) -> None:
    dest = make_dest(request, backend, tmp_path)
    gate = tmp_path / "gate"
    gate.mkdir()

    @ray.remote(max_retries=0)
    @isolated_export(dest.uri("{step}"), storage_options=dest.options, shard="{rank}", shards=2)
    def save(step: str, rank: int) -> None:
        Path(f"export/{rank}.txt").write_text(str(rank))
        (gate / f"{step}-{rank}").touch()
        deadline = time.monotonic() + 30  # a barrier: both shards export at once
        while not (gate / f"{step}-{1 - rank}").exists() and time.monotonic() < deadline:
            time.sleep(0.001)

    for i in range(4):
        results = ray.get([save.remote(f"b{i}", r) for r in (0, 1)], timeout=120)
        assert sum(r.committed_run for r in results) == 1, i
        m = Manifest.from_bytes(dest.read(f"b{i}/{MANIFEST_NAME}") or b"")
        assert sorted(f.path for f in m.files) == ["export/0.txt", "export/1.txt"]


@pytest.mark.parametrize("backend", ["local", "s3", "rsync-mount"])
def test_two_shards_writing_one_path_fail_naming_both_and_nothing_is_committed(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = make_dest(request, backend, tmp_path)
    monkeypatch.chdir(tmp_path)
    if backend == "rsync-mount":
        request.getfixturevalue("ray_wd")  # the driver prepares the mount through Ray
        monkeypatch.chdir(tmp_path)

    @isolated_export(dest.uri("{step}"), storage_options=dest.options, shard="{rank}", shards=3)
    def save(step: str, rank: int) -> None:
        Path(f"export/own-{rank}.txt").write_text(str(rank))
        Path("export/model.pt").write_text(f"rank {rank}")

    save(step="c", rank=0)
    with pytest.raises(ShardClashError) as e:
        save(step="c", rank=2)
    assert set(e.value.shards) == {"0", "2"} and e.value.path == "export/model.pt"
    assert "'2' and '0' both wrote 'export/model.pt'" in str(e.value)
    assert dest.read(f"c/{MANIFEST_NAME}") is None


def test_a_shard_name_taken_by_another_call_is_a_conflict(tmp_path: Path) -> None:
    @isolated_export(str(tmp_path / "runs/{step}"), shard="{rank}", shards=2)
    def save(step: str, rank: int) -> None:
        Path(f"export/{rank}-{os.getpid()}-{time.monotonic_ns()}.txt").write_text("x")

    save(step="t", rank=0)
    with pytest.raises(RunExistsError, match="shard '0' of this run was exported by another"):
        save(step="t", rank=0)
    save(step="t", rank=1)
    with pytest.raises(RunExistsError, match="already committed"):
        save(step="t", rank=1)


def test_a_failed_shard_marks_the_run_failed_naming_it(tmp_path: Path) -> None:
    @isolated_export(str(tmp_path / "runs/{step}"), shard="{rank}", shards=2)
    def save(step: str, rank: int) -> None:
        Path(f"export/{rank}.txt").write_text("x")
        if rank == 1:
            raise RuntimeError("rank 1 ran out of memory")

    save(step="f", rank=0)
    with pytest.raises(RuntimeError):
        save(step="f", rank=1)
    doc = json.loads((tmp_path / "runs/f" / MANIFEST_NAME).read_text())
    assert doc["run"]["status"] == "failed"
    assert "shard 1 failed" in doc["run"]["error"] and "out of memory" in doc["run"]["error"]


def test_shards_are_refused_where_they_cannot_work() -> None:
    with pytest.raises(ConfigError, match="go together"):
        isolated_export("out/{s}", shard="{rank}")
    with pytest.raises(ConfigError, match="cannot commit one run from many calls"):
        isolated_export(None, shard="{rank}", shards=2)
    with pytest.raises(ConfigError, match="rsync daemon or ssh"):
        isolated_export("rsync://127.0.0.1/mod/{s}", shard="{rank}", shards=2)
    with pytest.raises(ConfigError, match="sync_every does not work with shards"):
        isolated_export("out/{s}", shard="{rank}", shards=2, sync_every=5)
    with pytest.raises(ConfigError, match="at least 1"):
        isolated_export("out/{s}", shard="{rank}", shards=0)

    @isolated_export("out/{s}", shard="{rank}", shards=2)
    def bad(s: str, rank: str) -> None: ...

    with pytest.raises(raysync.errors.TemplateError, match="shard name"):
        bad(s="x", rank="a/b")


# -- found by the adversarial review of shards ------------------------------------------------


def _shard_export(dest: Dest, rel: str, ws: Path, name: str, count: int, attempt: int = 0) -> Any:
    """One shard exported the way the core does it, with a chosen call identity."""
    from raysync.backend import Shard
    from raysync.exporting import export_once, prepare
    from raysync.registry import get_registry
    from raysync.rules import run_record
    from raysync.shards import set_id
    from raysync.target import Target, split_scheme

    uri = dest.uri(rel)
    backend = get_registry().for_scheme(split_scheme(uri)[0])
    target = Target(uri, split_scheme(uri)[0], dict(dest.options or {}), str(ws.parent))
    run = run_record("shards.fn", f"task-{name}", attempt=attempt, shard=name, shards=count)
    shard = Shard(name, count, set_id(run))
    root = Target(dest.uri(""), target.scheme, target.options, target.base_dir)
    _, _, outcome = export_once(
        backend, target, ws, run, trees=["export"], prepared=prepare(backend, root), shard=shard
    )
    return outcome


def _ws(tmp_path: Path, files: dict[str, bytes]) -> Path:
    ws = tmp_path / f"ws-{os.urandom(4).hex()}"
    for rel, data in files.items():
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_bytes(data)
    (ws / "export").mkdir(parents=True, exist_ok=True)
    return ws


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_a_shard_retried_after_the_commit_succeeds_without_touching_the_run(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    dest = make_dest(request, backend, tmp_path)
    a = _shard_export(dest, "r", _ws(tmp_path, {"export/0.txt": b"zero"}), "0", 2)
    b = _shard_export(dest, "r", _ws(tmp_path, {"export/1.txt": b"one"}), "1", 2)
    assert (a.committed, b.committed) == (False, True)
    # Shard 1's worker died after the commit; Ray retries it with other bytes.
    again = _shard_export(dest, "r", _ws(tmp_path, {"export/1.txt": b"ONE!"}), "1", 2, attempt=1)
    assert again.committed is False
    assert dest.read("r/export/1.txt") == b"one" and dest.verify("r") == 0


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_a_retried_shard_replaces_its_shard_and_the_run_holds_one_attempt(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    dest = make_dest(request, backend, tmp_path)
    _shard_export(dest, "r", _ws(tmp_path, {"export/0.txt": b"attempt 0"}), "0", 2)
    _shard_export(dest, "r", _ws(tmp_path, {"export/0.txt": b"attempt 1!"}), "0", 2, attempt=1)
    last = _shard_export(dest, "r", _ws(tmp_path, {"export/1.txt": b"one"}), "1", 2)
    assert last.committed
    m = Manifest.from_bytes(dest.read(f"r/{MANIFEST_NAME}") or b"")
    assert m.run["shard_calls"]["0"]["attempt"] == 1
    assert dest.read("r/export/0.txt") == b"attempt 1!" and dest.verify("r") == 0


def test_the_host_sink_derives_the_shard_area_itself(ray_wd: Path, tmp_path: Path) -> None:
    """A worker's Shard naming a set id with '..' never reaches outside the sink's roots."""
    from raysync_builtins.host.sink import Options, get_or_create_sink, sink_key, sink_name

    from raysync.backend import Shard
    from raysync.rules import run_record

    root, victim = tmp_path / "root", tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    root.mkdir()
    ctx = ray.get_runtime_context()
    sink = get_or_create_sink(Options())
    ray.get(
        sink.allow.remote(
            str(root), sink_key((ctx.gcs_address, sink_name(ctx.get_job_id(), Options())))
        )
    )
    run = run_record("fn", "t1", job_id=ctx.get_job_id(), shard="0", shards=1)
    evil = Shard("0", 1, "x/../../victim")
    sid, _ = ray.get(sink.open.remote(str(root / "r"), run, "error", ctx.get_job_id(), evil))
    ray.get(sink.abort.remote(sid))
    assert (victim / "keep.txt").read_text() == "keep"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_field_value_naming_raysyncs_hidden_files_is_refused(tmp_path: Path) -> None:
    @isolated_export(str(tmp_path / "runs/{x}"))
    def call(x: str) -> None: ...

    for value in ("a/.raysync-shards/0123456789abcdef", ".raysync-lock", "r.raysync-staging-1"):
        with pytest.raises(raysync.errors.TemplateError, match="hidden files"):
            call(x=value)
