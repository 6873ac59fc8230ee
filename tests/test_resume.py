"""``isolated_export(resume=True)`` (issue 17): a call whose worker died is retried by Ray and
starts from the checkpoint its first attempt committed, not from empty trees; a live call's
run is never taken over; ``validate`` refuses in a Ray task as in a direct call."""

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
from raysync.errors import ConfigError, RunExistsError, ValidationError
from tests.destinations import Dest, make_dest

STEPS = 6


def _steps(marks: str, kill_after: int | None, sync: bool = False) -> dict[str, Any]:
    """The body of a long call: steps 0..STEPS-1, each a file and a line of a log, skipping
    the steps its trees already hold; the first attempt (nothing resumed) commits a
    checkpoint after step ``kill_after`` and SIGKILLs its own worker."""
    ws = raysync.current_workspace()
    resumed = ws.resumed_from
    done = sorted(int(p.stem.split("-")[1]) for p in ws.export_dir.glob("step-*.txt"))
    attempt = ray.get_runtime_context().get_task_id() if ray.is_initialized() else "direct"
    with open(marks, "a") as f:  # what each attempt found, for the test to check
        f.write(json.dumps({"pid": os.getpid(), "done": done, "resumed": repr(resumed)}) + "\n")
    for step in range(len(done), STEPS):
        (ws.export_dir / f"step-{step}.txt").write_text(f"step {step} by {os.getpid()}")
        with (ws.export_dir / "log.txt").open("a") as log:
            log.write(f"step {step}\n")
        if resumed is None and step == kill_after:
            if sync:  # wait (bounded) for sync_every to commit this step
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and not _committed_step(step):
                    time.sleep(0.05)
            else:
                raysync.checkpoint()
            os.kill(os.getpid(), signal.SIGKILL)
    return {
        "pid": os.getpid(),
        "checkpoint": resumed.checkpoint if resumed else None,
        "task_id": resumed.task_id if resumed else None,
        "files": resumed.files if resumed else 0,
        "attempt": ray.get_runtime_context().get_task_id() if ray.is_initialized() else attempt,
    }


def _committed_step(step: int) -> bool:
    """For the sync_every variant (local destination): the last checkpoint holds ``step``."""
    from raysync.manifest import MANIFEST_NAME

    dest = Path(os.environ["RESUME_TEST_DEST"])
    try:
        doc = json.loads((dest / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    return any(f["path"] == f"export/step-{step}.txt" for f in doc["files"])


def _check_resumed(dest: Dest, rel: str, result: Any, marks: Path) -> None:
    attempts = [json.loads(line) for line in marks.read_text().splitlines()]
    assert len(attempts) == 2, attempts
    first, second = attempts
    assert first["done"] == [] and first["resumed"] == "None"
    assert second["done"] == [0, 1, 2], "the retry found the first attempt's steps"
    assert second["pid"] != first["pid"]
    value = result.value
    assert value["checkpoint"] >= 1 and value["files"] == 4  # three steps and the log
    manifest = result.manifest
    assert manifest.status == "succeeded"
    assert manifest.run["attempt"] == 1
    assert manifest.run["resumed_from"]["attempt"] == 0
    assert manifest.run["resumed_from"]["checkpoint"] == value["checkpoint"]
    files = dest.files(rel)
    assert files["export/log.txt"].decode().splitlines() == [
        f"step {i}" for i in range(STEPS)
    ]  # every step once: the first attempt's three, then the retry's
    for i in range(STEPS):
        by = first["pid"] if i <= 2 else second["pid"]
        assert files[f"export/step-{i}.txt"] == f"step {i} by {by}".encode()
    assert dest.verify(rel) == 0


@pytest.mark.parametrize("backend", ["local", "s3", "host"])
def test_a_worker_killed_after_a_checkpoint_is_retried_from_that_checkpoint(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, ray_wd: Path
) -> None:
    dest = make_dest(request, backend, tmp_path)
    marks = tmp_path / "marks.jsonl"

    @ray.remote(max_retries=1)
    @isolated_export(dest.uri("{name}"), storage_options=dest.options, resume=True)
    def long_call(name: str, marks: str) -> dict[str, Any]:
        return _steps(marks, kill_after=2)

    result = ray.get(long_call.remote("r1", str(marks)), timeout=180)
    _check_resumed(dest, "r1", result, marks)


def test_sync_every_checkpoints_are_resumed_too(ray_wd: Path, tmp_path: Path) -> None:
    dest = tmp_path / "runs"
    marks = tmp_path / "marks.jsonl"

    @ray.remote(max_retries=1, runtime_env={"env_vars": {"RESUME_TEST_DEST": str(dest / "s")}})
    @isolated_export(str(dest / "{name}"), sync_every=0.2, resume=True)
    def long_call(name: str, marks: str) -> dict[str, Any]:
        return _steps(marks, kill_after=2, sync=True)

    result = ray.get(long_call.remote("s", str(marks)), timeout=180)
    _check_resumed(Dest("local", str(dest), disk=dest), "s", result, marks)


def test_a_live_calls_run_is_never_taken_over(ray_wd: Path, tmp_path: Path) -> None:
    """Two calls with one URI and resume=True: the second is refused at its start while the
    first runs (it holds the URI's lease), and the first commits its own run."""
    dest = tmp_path / "runs"
    go = tmp_path / "go"

    @ray.remote(max_retries=0)
    @isolated_export(str(dest / "{name}"), resume=True)
    def call(name: str, wait_for: str) -> str:
        Path("export/mine.txt").write_text(ray.get_runtime_context().get_task_id())
        raysync.checkpoint()
        deadline = time.monotonic() + 60
        while wait_for and not Path(wait_for).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return "done"

    first = call.remote("one", str(go))
    deadline = time.monotonic() + 60
    while not (dest / "one" / "raysync-manifest.json").exists():
        assert time.monotonic() < deadline, "the first call never checkpointed"
        time.sleep(0.05)
    with pytest.raises(RunExistsError, match="writing this run right now"):
        ray.get(call.remote("one", ""), timeout=60)
    go.touch()
    result = ray.get(first, timeout=60)
    assert result.manifest.status == "succeeded" and "resumed_from" not in result.manifest.run
    assert (dest / "one" / "export" / "mine.txt").read_text() == result.manifest.run["task_id"]


def test_another_calls_abandoned_checkpoint_is_resumed_and_replaced(
    ray_wd: Path, tmp_path: Path
) -> None:
    """A call of this cluster that died for good (no retries left) holds no lease once it
    expires: a new call with the same URI and resume=True carries its run on."""
    dest = tmp_path / "runs"

    @ray.remote(max_retries=0)
    @isolated_export(str(dest / "{name}"), resume=True)
    def call(name: str, die: bool) -> list[str]:
        ws = raysync.current_workspace()
        found = sorted(p.name for p in ws.export_dir.iterdir())
        (ws.export_dir / f"by-{'first' if die else 'second'}.txt").write_text("x")
        if die:
            raysync.checkpoint()
            os.kill(os.getpid(), signal.SIGKILL)
        return found

    short_lease = {"env_vars": {"RAYSYNC_LEASE_SECONDS": "1"}}
    with pytest.raises(ray.exceptions.WorkerCrashedError):
        ray.get(call.options(runtime_env=short_lease).remote("a", True), timeout=60)
    time.sleep(1.5)  # the dead call's lease expires
    result = ray.get(call.remote("a", False), timeout=60)
    assert result.value == ["by-first.txt"]
    resumed = result.manifest.run["resumed_from"]
    assert resumed["task_id"] != result.manifest.run["task_id"]
    assert resumed["checkpoint"] == 1
    assert sorted(p.name for p in (dest / "a" / "export").iterdir()) == [
        "by-first.txt",
        "by-second.txt",
    ]


def test_a_succeeded_run_is_never_resumed_and_the_conflict_comes_first(tmp_path: Path) -> None:
    dest = tmp_path / "runs"
    ran = []

    @isolated_export(str(dest / "{name}"), resume=True)
    def call(name: str) -> None:
        ran.append(raysync.current_workspace().resumed_from)
        Path("export/a.txt").write_text("a")

    call(name="x")
    with pytest.raises(RunExistsError, match="committed run already exists"):
        call(name="x")
    assert ran == [None]  # the second call's function never ran


def test_a_failed_run_is_resumed_by_the_next_direct_call(tmp_path: Path) -> None:
    dest = tmp_path / "runs"

    @isolated_export(str(dest / "{name}"), resume=True)
    def call(name: str, fail: bool) -> Any:
        ws = raysync.current_workspace()
        if fail:
            (ws.export_dir / "half.txt").write_text("half")
            raise RuntimeError("out of time")
        (ws.export_dir / "rest.txt").write_text("rest")
        return ws.resumed_from

    with pytest.raises(RuntimeError):
        call(name="f", fail=True)
    resumed = call(name="f", fail=False)
    assert resumed.value is not None and resumed.value.status == "failed"
    assert resumed.value.files == 1 and resumed.value.checkpoint == 0
    assert sorted(p.name for p in (dest / "f" / "export").iterdir()) == ["half.txt", "rest.txt"]


def test_resume_is_refused_at_decoration_without_a_destination() -> None:
    with pytest.raises(ConfigError, match=r"returns the\s+files by value"):
        isolated_export(None, resume=True)
    with pytest.raises(ConfigError, match="True or False"):
        isolated_export("out/{x}", resume="yes")  # type: ignore[arg-type]


def test_validate_in_a_ray_task_refuses_and_the_run_says_failed(
    ray_wd: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "runs"

    def model_is_there(ws: Any) -> None:
        if not (ws.export_dir / "model.pt").exists():
            raise FileNotFoundError("model.pt was not written")

    @ray.remote(max_retries=0)
    @isolated_export(str(dest / "{name}"), validate=model_is_there)
    def train(name: str) -> int:
        Path("export/log.txt").write_text("trained, forgot to save")
        return 1

    with pytest.raises(ValidationError, match="model_is_there refused the output"):
        ray.get(train.remote("v"), timeout=60)
    doc = json.loads((dest / "v" / "raysync-manifest.json").read_text())
    assert doc["run"]["status"] == "failed"
    assert "model.pt was not written" in doc["run"]["error"]


# -- found by the adversarial review of resume (leases, spellings, pinning, the sink) --------


def test_a_stalled_holder_never_takes_its_lease_back_nor_releases_the_new_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from raysync import leases
    from raysync.errors import LeaseHeldError
    from raysync.rules import run_record

    monkeypatch.setenv("RAYSYNC_LEASE_SECONDS", "1")
    base = leases.key("f", f"file:///stall/{time.monotonic_ns()}")
    a = leases.Lease(base, run_record("f", "task-a"), "here")
    a.acquire()
    a.stop.set()  # A stalls: its renewer stops (as in a long GIL hold)
    a.thread.join()  # type: ignore[union-attr]
    a.stop.clear()
    time.sleep(1.2)  # A's lease expires
    b = leases.Lease(base, run_record("f", "task-b"), "here")
    b.acquire()
    assert not a.owns() and b.owns()
    a._renew_once = None
    a.thread = threading.Thread(target=a._renew)
    a.thread.start()
    time.sleep(0.5)
    assert leases.holder(base)["task_id"] == "task-b"  # type: ignore[index]
    a.release()  # releases nothing of B's
    assert b.owns()
    with pytest.raises(LeaseHeldError, match="task-b"):
        leases.Lease(base, run_record("f", "task-c"), "here").acquire()
    b.release()
    assert leases.holder(base) is None


def test_of_two_calls_racing_for_an_expired_lease_exactly_one_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from raysync import leases
    from raysync.errors import LeaseHeldError
    from raysync.rules import run_record

    monkeypatch.setenv("RAYSYNC_LEASE_SECONDS", "1")
    for round_ in range(5):
        base = leases.key("f", f"file:///race/{round_}/{time.monotonic_ns()}")
        dead = leases.Lease(base, run_record("f", "dead"), "here")
        dead.acquire()
        dead.stop.set()
        dead.thread.join()  # type: ignore[union-attr]
        time.sleep(1.1)
        got: list[str] = []
        barrier = threading.Barrier(3)

        def take(
            name: str,
            base: bytes = base,
            barrier: threading.Barrier = barrier,
            got: list[str] = got,
        ) -> None:
            lease = leases.Lease(base, run_record("f", name), "here")
            barrier.wait(10)
            try:
                lease.acquire()
            except LeaseHeldError:
                return
            got.append(name)

        threads = [threading.Thread(target=take, args=(n,)) for n in ("b", "c", "d")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(got) == 1, (round_, got)


def test_two_spellings_of_one_directory_share_one_lease(tmp_path: Path) -> None:
    """A live call writing through a symlinked path is seen by a resumer writing the real
    path: the resumer is refused, the live call's run stays its own."""
    from raysync.errors import LeaseHeldError

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    started, finish = threading.Event(), threading.Event()

    def body(name: str) -> str:
        raysync.current_workspace().export_dir.joinpath("a.txt").write_text(name)
        raysync.checkpoint()
        started.set()
        finish.wait(30)
        return name

    live = isolated_export(str(tmp_path / "link/{name}"), chdir=False)(body)
    resumer = isolated_export(str(tmp_path / "real/{name}"), chdir=False, resume=True)(body)
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(live(name="r")))
    t.start()
    assert started.wait(30)
    with pytest.raises(LeaseHeldError, match="writing this run right now"):
        resumer(name="r")
    finish.set()
    t.join(30)
    assert out and out[0].manifest.status == "succeeded"


def test_overwrite_calls_with_sync_every_still_run_side_by_side(tmp_path: Path) -> None:
    """conflict="overwrite" lets two calls write one run: a checkpoint of the second, while
    the first is alive and holds the lease, goes on without the lease instead of failing."""
    a_checkpointed, b_checkpointed = threading.Event(), threading.Event()
    a_finished = threading.Event()

    @isolated_export(str(tmp_path / "{name}"), chdir=False, conflict="overwrite")
    def call(name: str, who: str) -> int:
        raysync.current_workspace().export_dir.joinpath(f"{who}.txt").write_text(who)
        if who == "b":
            assert a_checkpointed.wait(30)
        number = raysync.checkpoint().number
        if who == "a":
            a_checkpointed.set()
            assert b_checkpointed.wait(30)  # alive, holding the lease, while b checkpoints
        else:
            b_checkpointed.set()
            assert a_finished.wait(30)  # the final exports one after the other
        return number

    out: dict[str, Any] = {}
    threads = [
        threading.Thread(target=lambda w=w: out.setdefault(w, call(name="x", who=w))) for w in "ab"
    ]
    for t in threads:
        t.start()
    threads[0].join(60)
    a_finished.set()
    threads[1].join(60)
    assert sorted(out) == ["a", "b"] and out["a"].value == 1 and out["b"].value == 1


def test_a_continuation_replaces_only_the_checkpoint_it_resumed() -> None:
    from raysync.rules import claim_record, continues, run_record

    old = {**run_record("f", "task-a"), "status": "running", "checkpoint": 3}
    mine = {**run_record("f", "task-b"), "resumed_from": {**claim_record(old), "checkpoint": 3}}
    assert continues(old, mine)
    assert not continues({**old, "checkpoint": 4}, mine)  # task-a lived on: not ours
    assert not continues({**old, "status": "succeeded"}, mine)
    assert continues(claim_record(old), mine)  # the lock task-a left when it died


def test_the_sink_serves_resumers_only_files_the_run_lists(ray_wd: Path, tmp_path: Path) -> None:
    from raysync_builtins.host.sink import Options, get_or_create_sink, sink_key, sink_name

    from raysync.errors import DestinationError

    root = tmp_path / "root"
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key").write_text("PRIVATE")

    @isolated_export(f"host://{root}/{{name}}")
    def call(name: str) -> None:
        Path("export/a.txt").write_text("a")

    call(name="r")
    (root / "r" / "export" / "link").symlink_to(secret)
    (root / "r2").symlink_to(root / "r")
    ctx = ray.get_runtime_context()
    sink = get_or_create_sink(Options())
    ray.get(
        sink.allow.remote(
            str(root), sink_key((ctx.gcs_address, sink_name(ctx.get_job_id(), Options())))
        )
    )
    job = ctx.get_job_id()
    assert ray.get(sink.read.remote(str(root / "r"), job, "export/a.txt", 0, 10)) == b"a"
    for dest, rel in ((root / "r", "export/link/key"), (root / "r2", "export/a.txt")):
        with pytest.raises(DestinationError):
            ray.get(sink.read.remote(str(dest), job, rel, 0, 10))
