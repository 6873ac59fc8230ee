"""Actor methods: plain, threaded (max_concurrency=4), async, chdir=False, and decorating
objects that ray.remote already made."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import ray

import raysync
from raysync import isolated_export
from raysync.manifest import MANIFEST_NAME
from tests.conftest import files_under


def _expected(i: int) -> dict[str, bytes]:
    return {"export/out.txt": f"call {i}".encode(), f"data/{i}.txt": b"x" * i}


def test_plain_actor_exports_each_call(ray_wd: Path, host: Path) -> None:
    @ray.remote
    class Worker:
        def __init__(self) -> None:
            self.calls = 0

        @isolated_export("plain/{i}")
        def run(self, i: int) -> int:
            self.calls += 1
            Path("export/out.txt").write_text(f"call {i}")
            Path(f"data/{i}.txt").write_bytes(b"x" * i)
            return self.calls

    w = Worker.remote()
    results = [ray.get(w.run.remote(i)) for i in range(1, 4)]
    assert [r.value for r in results] == [1, 2, 3]  # actor state is kept across calls
    for i in range(1, 4):
        got = files_under(host / "plain" / str(i))
        got.pop(MANIFEST_NAME)
        assert got == _expected(i)


def test_threaded_actor_serialises_chdir_calls_and_each_exports_its_own(
    ray_wd: Path, host: Path
) -> None:
    @ray.remote(max_concurrency=4)
    class Threaded:
        @isolated_export("threaded/{i}")
        def run(self, i: int) -> str:
            Path("export/out.txt").write_text(f"call {i}")
            time.sleep(0.05)
            Path(f"data/{i}.txt").write_bytes(b"x" * i)
            assert Path("export/out.txt").read_text() == f"call {i}"
            return os.getcwd()

    a = Threaded.remote()
    results = ray.get([a.run.remote(i) for i in range(1, 9)])
    assert len({r.value for r in results}) == 8  # eight distinct workspaces
    for i in range(1, 9):
        got = files_under(host / "threaded" / str(i))
        got.pop(MANIFEST_NAME)
        assert got == _expected(i)


def test_threaded_actor_without_chdir_runs_calls_concurrently(ray_wd: Path, host: Path) -> None:
    @ray.remote(max_concurrency=4)
    class Concurrent:
        def __init__(self) -> None:
            self.start_cwd = os.getcwd()

        @isolated_export("concurrent/{i}", chdir=False)
        def run(self, i: int) -> tuple[float, float, bool]:
            ws = raysync.current_workspace()
            t0 = time.monotonic()
            (ws.export_dir / "out.txt").write_text(f"call {i}")
            time.sleep(0.5)
            (ws.data_dir / f"{i}.txt").write_bytes(b"x" * i)
            return t0, time.monotonic(), os.getcwd() == self.start_cwd

    a = Concurrent.remote()
    results = ray.get([a.run.remote(i) for i in range(1, 5)])
    spans = [r.value for r in results]
    assert all(s[2] for s in spans)  # the process cwd was left alone
    # Calls overlapped: the latest start comes before the earliest end.
    assert max(s[0] for s in spans) < min(s[1] for s in spans)
    for i in range(1, 5):
        got = files_under(host / "concurrent" / str(i))
        got.pop(MANIFEST_NAME)
        assert got == _expected(i)


def test_async_actor_exports_each_call(ray_wd: Path, host: Path) -> None:
    @ray.remote
    class Async:
        @isolated_export("async/{i}")
        async def run(self, i: int) -> int:
            Path("export/out.txt").write_text(f"call {i}")
            await asyncio.sleep(0.05)
            Path(f"data/{i}.txt").write_bytes(b"x" * i)
            assert Path("export/out.txt").read_text() == f"call {i}"
            return i

    a = Async.remote()
    results = ray.get([a.run.remote(i) for i in range(1, 6)])
    assert [r.value for r in results] == [1, 2, 3, 4, 5]
    for i in range(1, 6):
        got = files_under(host / "async" / str(i))
        got.pop(MANIFEST_NAME)
        assert got == _expected(i)


def test_decorating_an_existing_remote_function_keeps_its_options(ray_wd: Path, host: Path) -> None:
    @ray.remote(num_cpus=0.5, max_retries=0)
    def f(i: int) -> float:
        Path("export/out.txt").write_text(f"call {i}")
        return float(ray.get_runtime_context().get_assigned_resources().get("CPU", 0))

    g = isolated_export("on-top/{i}")(f)
    assert isinstance(g, ray.remote_function.RemoteFunction)
    r = ray.get(g.remote(7))
    assert r.value == 0.5
    assert files_under(host / "on-top" / "7")["export/out.txt"] == b"call 7"


def test_decorating_an_existing_actor_class_wraps_its_public_methods(
    ray_wd: Path, host: Path
) -> None:
    @ray.remote(max_concurrency=2)
    class A:
        def run(self, i: int) -> int:
            Path("export/out.txt").write_text(f"call {i}")
            return i

        def _private(self) -> str:
            return os.getcwd()

    B = isolated_export("actor-on-top/{i}")(A)
    b = B.remote()
    r = ray.get(b.run.remote(3))
    assert r.value == 3 and r.uri.endswith("actor-on-top/3")
    assert files_under(host / "actor-on-top" / "3")["export/out.txt"] == b"call 3"
