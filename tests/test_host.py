"""host-sync backend on one node: round trip, chunking, conflicts, a refused path, a dead sink.

(On a node that cannot see the driver's disk: tests/test_cluster.py.)"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import ray

from raysync import isolated_export
from raysync.errors import ConfigError, DestinationError, ExportError, RunExistsError
from raysync.manifest import MANIFEST_NAME, Manifest, verify_files
from tests.conftest import files_under, kept_workspace

# Through a sink (a worker on the driver's node would write directly): the protocol under test.
SMALL_CHUNKS = {"chunk_size": 1024 * 1024, "window": 2, "direct": False}


def tree(seed: int) -> dict[str, bytes]:
    rnd = random.Random(seed)
    out = {
        "export/big.bin": rnd.randbytes(3 * 1024 * 1024 + 5),  # spans four chunks
        "export/empty.txt": b"",
        "data/table.csv": b"a,b\n1,2\n",
    }
    out |= {f"artifacts/many/{i}.txt": rnd.randbytes(rnd.randrange(1, 5000)) for i in range(50)}
    return out


def write(files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        Path(rel).parent.mkdir(parents=True, exist_ok=True)
        Path(rel).write_bytes(data)


def test_host_sync_round_trip_conflicts_and_overwrite(host: Path, tmp_path: Path) -> None:
    def body(run_id: str, seed: int) -> int:
        write(tree(seed))
        return seed

    run = ray.remote(max_retries=0)(
        isolated_export("host://out/{run_id}", storage_options=SMALL_CHUNKS)(body)
    )

    r = ray.get(run.remote("a", 1))
    dest = host / "out" / "a"
    assert r.uri == f"host://{dest}"
    got = files_under(dest)
    manifest = Manifest.from_bytes(got.pop(MANIFEST_NAME))
    assert got == tree(1)
    verify_files(manifest, dest, uri=r.uri)
    assert [p.name for p in (host / "out").iterdir() if "staging" in p.name] == []
    assert files_under(r.materialize(tmp_path / "copy")) == tree(1)

    # Another call to the same run: refused by the sink, the committed run untouched.
    with pytest.raises(RunExistsError) as info:
        ray.get(run.remote("a", 2))
    assert (kept_workspace(str(info.value)) / "export" / "big.bin").exists()
    assert files_under(dest)["export/big.bin"] == tree(1)["export/big.bin"]

    # conflict="overwrite" replaces a run of the same function.
    again = ray.remote(max_retries=0)(
        isolated_export("host://out/{run_id}", conflict="overwrite", storage_options=SMALL_CHUNKS)(
            body
        )
    )
    ray.get(again.remote("a", 3))
    got = files_under(dest)
    got.pop(MANIFEST_NAME)
    assert got == tree(3)


def test_the_sink_refuses_paths_outside_the_roots_the_driver_prepared(host: Path) -> None:
    from raysync_builtins.host import Options, get_or_create_sink

    @isolated_export("host://allowed/{run_id}")
    def f(run_id: str) -> None:
        pass

    sink = get_or_create_sink(Options())
    job = ray.get_runtime_context().get_job_id()
    # As a worker that tried to write elsewhere on the driver's machine would.
    for path in ("/etc/raysync-evil", str(host / "elsewhere" / "x")):
        with pytest.raises(DestinationError, match="outside every root"):
            run = {"session": "s", "job_id": job, "task_id": "t1", "function": "f"}
            ray.get(sink.open.remote(path, run, "error", job))
    assert not (host / "elsewhere").exists()


def test_a_dead_sink_fails_the_export_clearly_and_keeps_the_files(host: Path) -> None:
    from raysync_builtins.host import Options, get_or_create_sink

    # Its own sink settings, so that killing it does not touch the other tests' sink.
    opts = {"sink_slots": 3, "direct": False}

    @ray.remote(max_retries=0)
    @isolated_export("host://doomed/{run_id}", storage_options=opts)
    def run(run_id: str) -> None:
        Path("export/result.txt").write_text("precious")

    for index in range(Options.parse(opts).sinks):  # every sink of these settings
        ray.kill(get_or_create_sink(Options.parse(opts), index))
    with pytest.raises(ExportError) as info:
        ray.get(run.remote("d1"))
    text = str(info.value)
    assert "sink actor is gone" in text
    assert (kept_workspace(text) / "export" / "result.txt").read_text() == "precious"


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"chunk": 1}, "unknown storage_options"),
        ({"window": 0}, "positive number"),
        ({"chunk_size": 1000}, "at least 64 KiB"),
        ({"sinks": 100}, "from 1 to 64"),
    ],
)
def test_bad_host_options_fail_at_decoration(options: dict[str, int], says: str) -> None:
    with pytest.raises(ConfigError, match=says):

        @isolated_export("host://x/{run_id}", storage_options=options)
        def f(run_id: str) -> None:
            pass
