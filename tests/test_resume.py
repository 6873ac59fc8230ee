"""``isolated_export(resume=True)`` (issue 17): a call whose worker died is retried by Ray and
starts from the checkpoint its first attempt committed, not from empty trees; a live call's
run is never taken over; ``validate`` refuses in a Ray task as in a direct call."""

from __future__ import annotations

import json
import os
import signal
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
