"""``raysync.checkpoint()`` (issue 17, first slice): a call commits its trees now as a
checkpoint, numbered with ``sync_every``'s, and gets the number and the run's URI."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import ray

import raysync
from raysync import isolated_export
from raysync.errors import ConfigError
from raysync.manifest import MANIFEST_NAME


def _manifest(run: Path) -> dict[str, object]:
    doc: dict[str, object] = json.loads((run / MANIFEST_NAME).read_text())
    return doc


def test_checkpoint_commits_the_trees_now_and_the_final_export_replaces_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    dest = tmp_path / "runs" / "r1"

    @isolated_export("runs/{name}")
    def work(name: str) -> list[tuple[int, str, int]]:
        seen = []
        for step in (1, 2):
            Path(f"export/step-{step}.txt").write_text(f"step {step}")
            c = raysync.checkpoint()
            doc = _manifest(dest)
            run = doc["run"]
            assert isinstance(run, dict) and isinstance(doc["files"], list)
            assert (run["status"], run["checkpoint"]) == ("running", c.number)
            seen.append((c.number, c.uri, len(doc["files"])))
        return seen

    r = work(name="r1")
    assert [(n, k) for n, _, k in r.value] == [(1, 1), (2, 2)]  # numbered; the tree so far
    assert {u for _, u, _ in r.value} == {r.uri}  # the run the final export commits
    run = _manifest(dest)["run"]
    assert isinstance(run, dict) and run["status"] == "succeeded" and run["checkpoints"] == 2
    assert r.stats.extra["checkpoints"] == 2
    assert sorted(p.name for p in (dest / "export").iterdir()) == ["step-1.txt", "step-2.txt"]


def test_checkpoint_outside_a_call_or_without_a_destination_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="only available inside a call"):
        raysync.checkpoint()

    @isolated_export(None)
    def by_value() -> None:
        Path("export/a.txt").write_text("a")
        raysync.checkpoint()

    with pytest.raises(ConfigError, match="needs a destination"):
        by_value()


def test_checkpoint_in_a_ray_task_and_an_async_actor(ray_wd: Path) -> None:
    @ray.remote(max_retries=0)
    @isolated_export("out/task/{name}")
    def task(name: str) -> int:
        Path("export/a.txt").write_text("a")
        return raysync.checkpoint().number

    @ray.remote
    class Worker:
        @isolated_export("out/actor/{name}", chdir=False)
        async def run(self, name: str) -> int:
            raysync.current_workspace().export_dir.joinpath("b.txt").write_text("b")
            first = await asyncio.to_thread(raysync.checkpoint)
            second = await asyncio.to_thread(raysync.checkpoint)
            return first.number * 10 + second.number

    assert ray.get(task.remote("t1")).value == 1
    assert ray.get(Worker.remote().run.remote("a1")).value == 12
    run = _manifest(ray_wd / "out" / "actor" / "a1")["run"]
    assert isinstance(run, dict) and run["checkpoints"] == 2 and run["status"] == "succeeded"


def test_validate_refusing_the_output_leaves_no_succeeded_run_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from raysync.errors import ValidationError

    monkeypatch.chdir(tmp_path)

    def has_model(ws: raysync.Workspace) -> None:
        if not (ws.export_dir / "model.pt").exists():
            raise FileNotFoundError("export/model.pt was not written")

    @isolated_export("runs/{name}", validate=has_model)
    def train(name: str, write: bool) -> str:
        Path("export/log.txt").write_text("trained")
        if write:
            Path("export/model.pt").write_bytes(b"weights")
        return "done"

    with pytest.raises(ValidationError) as info:
        train(name="bad", write=False)
    said = str(info.value)
    assert "has_model" in said and "export/model.pt was not written" in said
    run = _manifest(tmp_path / "runs" / "bad")["run"]  # exported, as failed, with the reason
    assert isinstance(run, dict) and run["status"] == "failed"
    assert "export/model.pt was not written" in str(run["error"])

    ok = train(name="good", write=True)
    assert ok.value == "done" and _manifest(tmp_path / "runs" / "good")["run"]["status"] == (  # type: ignore[index]
        "succeeded"
    )
    with pytest.raises(ConfigError, match="validate must be a function"):
        isolated_export("runs/{name}", validate="yes")  # type: ignore[arg-type]


def test_validate_runs_for_an_async_function_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from raysync.errors import ValidationError

    monkeypatch.chdir(tmp_path)

    def never(ws: raysync.Workspace) -> None:
        raise ValueError(f"nothing in {ws.export_dir.name}")

    @isolated_export("runs/{name}", validate=never)
    async def produce(name: str) -> None:
        Path("export/a.txt").write_text("a")

    with pytest.raises(ValidationError, match="never refused the output"):
        asyncio.run(produce(name="a1"))
    run = _manifest(tmp_path / "runs" / "a1")["run"]
    assert isinstance(run, dict) and run["status"] == "failed"
