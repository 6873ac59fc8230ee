"""On a two-node cluster whose second node cannot see the host's files (CRAFT.md): the seed's
validation (§4.3), bringing files home without shared storage, and refusing invisible paths."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest
import ray

from raysync import isolated_export
from raysync.errors import DestinationNotVisibleError
from raysync.manifest import MANIFEST_NAME, Manifest, verify_files
from tests.conftest import NODE_IP, Node2, files_under, s3_options


def seed_probe(host_cwd: str) -> dict[str, Any]:
    """What the seed's meta_ray_test checks from inside a call, and the files it writes."""
    Path("export/report.txt").write_text(f"from {ray.get_runtime_context().get_node_id()}")
    Path("artifacts/model.bin").write_bytes(random.Random(1).randbytes(300_000))
    return {
        "cwd": os.getcwd(),
        "host_cwd_exists": os.path.exists(host_cwd),
        "node_id": ray.get_runtime_context().get_node_id(),
    }


def check_seed(value: dict[str, Any], host: Path, node2: Node2) -> None:
    assert value["node_id"] == node2.node_id
    assert value["cwd"] != str(host) and not value["cwd"].startswith(str(host))
    assert value["host_cwd_exists"] is False  # the host's directory does not exist there


def test_seed_validation_on_node2_files_come_home_by_host_sync_value_and_s3(
    node2: Node2, host: Path, moto_endpoint: str, bucket: str
) -> None:
    # 1. host-sync: straight into the host's artifacts/ folder, no shared storage.
    @ray.remote(**node2.options)
    @isolated_export("host://artifacts/runs/{run_id}")
    def by_host(run_id: str, host_cwd: str) -> dict[str, Any]:
        return seed_probe(host_cwd)

    r = ray.get(by_host.remote("h1", str(host)))
    check_seed(r.value, host, node2)
    run = host / "artifacts" / "runs" / "h1"
    assert r.uri == f"host://{run}"
    verify_files(Manifest.from_bytes((run / MANIFEST_NAME).read_bytes()), run, uri=r.uri)
    assert set(files_under(run)) == {"artifacts/model.bin", MANIFEST_NAME, "export/report.txt"}

    # 2. return-by-value: the files travel in the result; the driver writes them home.
    @ray.remote(**node2.options)
    @isolated_export(None)
    def by_value(host_cwd: str) -> dict[str, Any]:
        return seed_probe(host_cwd)

    rv = ray.get(by_value.remote(str(host)))
    check_seed(rv.value, host, node2)
    out = rv.materialize(host / "artifacts" / "by-value")
    assert files_under(out)["artifacts/model.bin"] == random.Random(1).randbytes(300_000)

    # 3. fsspec to the S3 API (moto on loopback), read back into the host's artifacts/.
    @ray.remote(**node2.options)
    @isolated_export(f"s3://{bucket}/runs/{{run_id}}", storage_options=s3_options(moto_endpoint))
    def by_s3(run_id: str, host_cwd: str) -> dict[str, Any]:
        return seed_probe(host_cwd)

    rs = ray.get(by_s3.remote("s1", str(host)))
    check_seed(rs.value, host, node2)
    out = rs.materialize(host / "artifacts" / "from-s3")
    assert files_under(out)["export/report.txt"] == f"from {node2.node_id}".encode()


def test_a_host_path_is_refused_on_node2_and_nothing_lands_on_its_disk(
    node2: Node2, host: Path
) -> None:
    @ray.remote
    def exists_on_node2(path: str) -> bool:
        return os.path.exists(path)

    for uri in ("artifacts/local/{run_id}", f"rsync://{host}/artifacts/rsync/{{run_id}}"):

        @ray.remote(max_retries=0, **node2.options)
        @isolated_export(uri)
        def run(run_id: str) -> None:
            Path("export/result.txt").write_text("precious")

        with pytest.raises(DestinationNotVisibleError) as info:
            ray.get(run.remote("n2"))
        assert "not visible on this node" in str(info.value)
        # Nothing was created on node 2's own disk at the host's path...
        assert not ray.get(exists_on_node2.options(**node2.options).remote(str(host)))
        # ...and the run is not on the host either (it never got there).
        assert not list(host.rglob("n2"))


def test_32_tasks_over_both_nodes_to_host_sync_memory_stays_bounded(
    node2: Node2, host: Path
) -> None:
    chunk, slots = 256 * 1024, 2
    options = {"chunk_size": chunk, "window": 2, "sink_slots": slots, "direct": False}

    def body(i: int, j: int) -> bytes:
        return random.Random(i * 1000 + j).randbytes(1000 + (i * 37 + j * 11) % 9000)

    @isolated_export("host://fleet/{i}", storage_options=options)
    def work(i: int) -> str:
        for j in range(200):
            d = Path(f"data/{j % 7}")
            d.mkdir(exist_ok=True)
            (d / f"f{j}.bin").write_bytes(body(i, j))
        return ray.get_runtime_context().get_node_id()

    on_node2 = ray.remote(**node2.options)(work)
    on_head = ray.remote(resources={})(work)
    refs = [(on_node2 if i % 2 else on_head).remote(i) for i in range(32)]
    results = ray.get(refs, timeout=600)
    assert {r.value for r in results} == {node2.node_id, node2.driver_node_id}
    for i, r in enumerate(results):
        run = host / "fleet" / str(i)
        got = files_under(run)
        manifest = Manifest.from_bytes(got.pop(MANIFEST_NAME))
        assert manifest.run["task_id"] == r.manifest.run["task_id"]
        assert got == {f"data/{j % 7}/f{j}.bin": body(i, j) for j in range(200)}  # exactly its own
    stats = sink_stats(options)
    assert sum(st["received"] for st in stats) >= sum(r.stats.bytes for r in results)
    for st in stats:  # the stated bound per sink, whatever the senders
        assert st["peak_held"] <= slots * chunk
        assert st["sessions"] == 0 and st["held"] == 0
    assert max(st["peak_held"] for st in stats) > 0


def sink_stats(options: dict[str, Any]) -> list[dict[str, int]]:
    """The stats of every sink of this job for ``options``."""
    from raysync_builtins.host import Options, sink_name

    opts = Options.parse(options)
    ns = ray.get_runtime_context().namespace
    job = ray.get_runtime_context().get_job_id()
    sinks = [ray.get_actor(sink_name(job, opts, k), namespace=ns) for k in range(opts.sinks)]
    return list(ray.get([s.stats.remote() for s in sinks]))


def test_200_host_sync_calls_from_both_nodes_commit_with_the_drivers_memory_bounded(
    node2: Node2, host: Path
) -> None:
    """Issue 20: many short calls from both nodes through the job's sinks; every run is
    committed whole and each sink held at most sink_slots chunks at once."""
    chunk, slots, sinks = 128 * 1024, 3, 4  # its own sinks (others use 2 slots)
    options = {"chunk_size": chunk, "window": 2, "sink_slots": slots, "sinks": sinks}

    @isolated_export("host://many/{i}", storage_options=options)
    def call(i: int) -> str:
        for j in range(5):
            Path(f"export/f{j}.bin").write_bytes(bytes([i % 256, j]) * 1000)
        return ray.get_runtime_context().get_node_id()

    on_node2 = ray.remote(**node2.options)(call)
    on_head = ray.remote(resources={})(call)
    results = ray.get([(on_node2 if i % 2 else on_head).remote(i) for i in range(200)], timeout=600)
    assert {r.value for r in results} == {node2.node_id, node2.driver_node_id}
    for i in range(200):
        got = files_under(host / "many" / str(i))
        got.pop(MANIFEST_NAME)
        assert got == {f"export/f{j}.bin": bytes([i % 256, j]) * 1000 for j in range(5)}
    stats = sink_stats(options)
    assert sum(st["received"] > 0 for st in stats) >= 2  # the runs spread over the sinks
    assert all(st["peak_held"] <= slots * chunk for st in stats)  # memory: sinks x slots x chunk


TASKS = """
import os
from pathlib import Path
import ray
from raysync import isolated_export

@ray.remote(resources={"node2": 1})
@isolated_export("host://artifacts/{run_id}")
def run(run_id):
    Path("export/out.txt").write_text(run_id)
    return os.getcwd()
"""

DRIVER = """
import json, os, sys
import ray
import tasks  # an importable module, decorated here, before ray.init()

os.chdir(sys.argv[1])  # the driver's cwd at ray.init is what relative paths mean
ray.init(address=sys.argv[3], _node_ip_address="127.0.0.2",
         runtime_env={"working_dir": sys.argv[2]}, log_to_driver=False)
r = ray.get(tasks.run.remote("r1"), timeout=300)
print(json.dumps({"uri": r.uri, "cwd": r.value}))
"""


def test_module_decorated_before_ray_init_sends_node2_files_to_the_drivers_cwd(
    node2: Node2, tmp_path: Path
) -> None:
    import json
    import subprocess
    import sys

    code, host = tmp_path / "code", tmp_path / "driver-cwd"
    code.mkdir()
    host.mkdir()
    (code / "tasks.py").write_text(TASKS)
    (code / "driver.py").write_text(DRIVER)
    gcs = ray.get_runtime_context().gcs_address
    proc = subprocess.run(
        [sys.executable, str(code / "driver.py"), str(host), str(code), gcs],
        cwd=code,  # the cwd at import (decoration) time is NOT what relative paths mean
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONPATH": str(code)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, (proc.stdout[-2000:], proc.stderr[-2000:])
    out = json.loads(lines[-1])
    assert out["uri"] == f"host://{host / 'artifacts' / 'r1'}"
    assert not out["cwd"].startswith(str(tmp_path))  # it ran on node 2, in its workspace
    assert files_under(host / "artifacts" / "r1")["export/out.txt"] == b"r1"
    assert not (code / "artifacts").exists()


RUNTIME_ENV_DRIVER = """
import json, sys
import ray
import raysync

env = raysync.runtime_env(sys.argv[1])
built = json.loads(json.dumps(env))  # ray.init rewrites working_dir to the uploaded package
ray.init(address=sys.argv[2], _node_ip_address="127.0.0.2", runtime_env=env, log_to_driver=False)

@ray.remote(resources={"node2": 1})
def look():
    import os, pluggy, helper
    seen = sorted(os.path.relpath(os.path.join(d, f)) for d, _, fs in os.walk(".") for f in fs)
    return {"seen": seen, "helper": helper.VALUE, "pluggy": pluggy.__name__}

print(json.dumps({"env": built, "task": ray.get(look.remote(), timeout=600)}))
"""


def test_runtime_env_helper_is_accepted_by_ray_init_and_excludes_what_it_promises(
    node2: Node2, tmp_path: Path
) -> None:
    import json
    import subprocess
    import sys

    project = tmp_path / "proj"
    for rel, text in {
        "pyproject.toml": '[project]\nname = "p"\nversion = "0"\ndependencies = ["pluggy>=1"]\n',
        "helper.py": "VALUE = 42\n",
        "src/data/keep.txt": "inputs below the top level stay",
        "export/old.txt": "an earlier run's output",
        "data/old.bin": "output",
        "artifacts/old.txt": "output",
        "env1/pyvenv.cfg": "home = /usr/bin\n",
        "env1/lib/big.py": "x = 1\n",
        ".git/HEAD": "ref: refs/heads/main\n",
        "pkg/__pycache__/m.cpython-311.pyc": "",
    }.items():
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text(text)
    (tmp_path / "driver.py").write_text(RUNTIME_ENV_DRIVER)
    gcs = ray.get_runtime_context().gcs_address
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "driver.py"), str(project), gcs],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["env"]["pip"] == ["pluggy>=1"]  # from [project.dependencies]
    assert out["env"]["working_dir"] == str(project)
    # On node 2 (which cannot see the project): code and inputs are there, nothing else.
    assert out["task"]["helper"] == 42 and out["task"]["pluggy"] == "pluggy"
    assert sorted(out["task"]["seen"]) == ["helper.py", "pyproject.toml", "src/data/keep.txt"]


def doctor(cwd: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    import json
    import subprocess
    import sys

    connect = ["--address", ray.get_runtime_context().gcs_address, "--node-ip-address", NODE_IP]
    proc = subprocess.run(
        [sys.executable, "-m", "raysync", "doctor", *args, "--json", *connect],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    report = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}
    return proc.returncode, report, proc.stderr


def test_doctor_passes_host_sync_and_s3_on_both_nodes_and_fails_node2_for_a_host_path(
    node2: Node2, tmp_path: Path, moto_endpoint: str, bucket: str
) -> None:
    import json

    cwd = tmp_path / "driver"
    cwd.mkdir()
    (cwd / "main.py").write_text("print('a project')\n")
    nodes = {node2.node_id, node2.driver_node_id}

    code, report, err = doctor(cwd, "host://doctor-out", "--working-dir", ".")
    assert code == 0, (report, err[-2000:])
    assert {r["node_id"] for r in report["nodes"]} == nodes
    assert all(r["isolated"] and r["exported"] and r["verified"] for r in report["nodes"])
    by_node = {r["node_id"]: r for r in report["nodes"]}
    assert by_node[node2.node_id]["host_cwd_visible"] is False  # node 2 cannot see the driver
    probes = [p for p in (cwd / "doctor-out" / ".raysync-doctor").iterdir() if p.name[0] != "."]
    assert len(probes) == 2  # a probe each (besides the root's visibility token)

    opts = json.dumps(s3_options(moto_endpoint))
    code, report, err = doctor(cwd, f"s3://{bucket}/doctor", "--storage-options", opts)
    assert [r["ok"] for r in report["nodes"]] == [True, True], [
        r["problem"] for r in report["nodes"]
    ]

    code, report, err = doctor(cwd, "only-here/{run_id}")
    assert code == 1
    by_node = {r["node_id"]: r for r in report["nodes"]}
    assert by_node[node2.driver_node_id]["ok"] is True
    bad = by_node[node2.node_id]
    assert bad["ok"] is False and bad["exported"] is False
    assert "not visible on this node" in bad["problem"] and "mount" in bad["fix"]


def test_node_killed_mid_export_the_retry_on_another_node_commits_and_no_reader_sees_partial(
    node2: Node2, host: Path
) -> None:
    import time

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from tests.conftest import committed, polling_reader, stop_node2

    content = random.Random(4).randbytes(40 * 1024 * 1024)
    slow = {"chunk_size": 65536, "window": 1, "direct": False}

    # Small chunks, one in flight: the export takes seconds, time to kill the node during it.
    @ray.remote(max_retries=1)
    @isolated_export("host://fleet-kill/{run_id}", storage_options=slow)
    def run(run_id: str) -> str:
        Path("data/big.bin").write_bytes(content)
        return ray.get_runtime_context().get_node_id()

    # Prefer node 2 (soft), so that the retry may run on the head once node 2 is gone.
    prefer2 = NodeAffinitySchedulingStrategy(node2.node_id, soft=True)
    dest = host / "fleet-kill" / "nk"
    with polling_reader(dest) as seen_bad:
        ref = run.options(scheduling_strategy=prefer2).remote("nk")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            staging = list((host / "fleet-kill").glob(".nk.raysync-staging-*/data/big.bin"))
            if staging and staging[0].stat().st_size:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the export from node 2 never started")
        stop_node2()  # the whole node, in the middle of the export
        value = ray.get(ref, timeout=300).value
    assert value == node2.driver_node_id  # the retry ran on the head
    assert seen_bad == []
    assert (dest / "data" / "big.bin").read_bytes() == content
    manifest = committed(dest)
    assert manifest.run["attempt"] == 1 and manifest.run["node_id"] == node2.driver_node_id
    assert [p.name for p in (host / "fleet-kill").iterdir() if "staging" in p.name] == []


@pytest.mark.parametrize("where", ["host", "s3"])
def test_a_call_whose_node_dies_after_a_checkpoint_resumes_on_the_head(
    where: str, node2: Node2, host: Path, moto_endpoint: str, bucket: str
) -> None:
    """Issue 17: the first attempt runs on node 2, commits a checkpoint and its node dies;
    Ray retries the task on the head, which resumes from that checkpoint."""
    import time

    import s3fs
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    import raysync
    from tests.conftest import stop_node2

    if where == "host":
        uri, options = "host://resume-runs/{run_id}", None
        manifest_at = host / "resume-runs" / "r" / MANIFEST_NAME

        def checkpointed() -> bool:
            return manifest_at.exists()
    else:
        uri, options = f"s3://{bucket}/resume/{{run_id}}", s3_options(moto_endpoint)
        fs = s3fs.S3FileSystem(**options)

        def checkpointed() -> bool:
            fs.invalidate_cache()
            return bool(fs.exists(f"{bucket}/resume/r/{MANIFEST_NAME}"))

    @ray.remote(max_retries=1)
    @isolated_export(uri, storage_options=options, resume=True)
    def long_call(run_id: str) -> dict[str, Any]:
        ws = raysync.current_workspace()
        node = ray.get_runtime_context().get_node_id()
        if ws.resumed_from is None:
            (ws.export_dir / "first-half.txt").write_text(node)
            raysync.checkpoint()
            time.sleep(120)  # the test kills this node long before
        (ws.export_dir / "second-half.txt").write_text(node)
        return {"resumed": ws.resumed_from, "node": node}

    prefer2 = NodeAffinitySchedulingStrategy(node2.node_id, soft=True)
    ref = long_call.options(scheduling_strategy=prefer2).remote("r")
    deadline = time.monotonic() + 90
    while not checkpointed():
        assert time.monotonic() < deadline, "the first attempt never checkpointed"
        time.sleep(0.1)
    stop_node2()
    result = ray.get(ref, timeout=300)
    assert result.value["node"] == node2.driver_node_id  # the retry ran on the head
    resumed = result.value["resumed"]
    assert resumed is not None and resumed.checkpoint == 1 and resumed.attempt == 0
    out = result.materialize(host / "back" / where)
    assert (out / "export" / "first-half.txt").read_text() == node2.node_id
    assert (out / "export" / "second-half.txt").read_text() == node2.driver_node_id
    assert result.manifest.run["attempt"] == 1


@pytest.mark.parametrize("where", ["host", "s3"])
def test_shards_on_both_nodes_commit_one_run(
    where: str, node2: Node2, host: Path, moto_endpoint: str, bucket: str
) -> None:
    """Issue 18: four shards on node 2 and four on the head, one run, committed once."""
    import raysync

    if where == "host":
        uri, options = "host://sharded/{step}", None
    else:
        uri, options = f"s3://{bucket}/sharded/{{step}}", s3_options(moto_endpoint)

    @ray.remote(max_retries=0)
    @isolated_export(uri, storage_options=options, shard="{rank}", shards=8)
    def save(step: str, rank: int) -> str:
        node = ray.get_runtime_context().get_node_id()
        Path(f"export/rank-{rank}.txt").write_text(node)
        return node

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    head = {"scheduling_strategy": NodeAffinitySchedulingStrategy(node2.driver_node_id, False)}
    refs = [
        save.options(**(node2.options if rank % 2 else head)).remote("s", rank) for rank in range(8)
    ]
    results = ray.get(refs, timeout=180)
    assert {r.value for r in results} == {node2.node_id, node2.driver_node_id}
    assert sum(r.committed_run for r in results) == 1
    manifest = raysync.wait_run(results[0].uri, 60, storage_options=options)
    assert len({f.shard for f in manifest.files}) == 8
    out = results[0].materialize(host / "back" / where)
    for rank in range(8):
        node = node2.node_id if rank % 2 else node2.driver_node_id
        assert (out / "export" / f"rank-{rank}.txt").read_text() == node
