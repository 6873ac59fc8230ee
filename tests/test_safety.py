"""Data safety: ordinary inputs never delete or silently replace anyone's data (issue 13).

Each test is named after the item of the adversarial review it guards (docs/reliability.md,
"Data safety"), and runs on every backend it applies to, through the public API: a decorated
function called directly on the driver (no task scheduling, the same render, rules and
backend code as in a Ray worker), against real files, a real rsync daemon and sshd, and a
real S3 endpoint (moto on loopback).
"""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from raysync import isolated_export
from raysync.cli import main as cli
from raysync.errors import RaySyncError, RunExistsError, TemplateError, TreeError, UnsafePathError
from raysync.manifest import MANIFEST_NAME
from tests.destinations import BACKENDS, REMOTE_RSYNC, Dest, make_dest


@pytest.fixture(params=BACKENDS)
def dest(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Dest:
    monkeypatch.chdir(tmp_path)
    return make_dest(request, request.param, tmp_path)


def exporter(dest: Dest, tail: str = "runs/{name}", **kwargs: Any) -> Callable[..., Any]:
    """A decorated function writing ``files`` into its workspace, exported to ``tail``."""

    @isolated_export(dest.uri(tail), storage_options=dest.options, **kwargs)
    def write(name: str, files: dict[str, bytes]) -> str:
        for rel, data in files.items():
            p = Path(rel)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        return name

    return write


# -- 1. a field value of '.' (and friends) -----------------------------------------------------


@pytest.mark.parametrize("value", [".", "./", "%2e", "a/.", "%2e%2e", "%252e", "a\nb"])
def test_item1_a_dot_value_never_names_the_root_and_siblings_survive(
    dest: Dest, value: str
) -> None:
    write = exporter(dest, conflict="overwrite")
    write(name="r1", files={"export/a.txt": b"sibling run"})
    dest.plant("runs/user-notes.txt", b"the user's notes")
    with pytest.raises(TemplateError, match="cannot name a run"):
        write(name=value, files={"export/a.txt": b"evil"})
    assert dest.read("runs/user-notes.txt") == b"the user's notes"
    assert dest.read("runs/r1/export/a.txt") == b"sibling run"
    assert dest.verify("runs/r1") == 0


def test_item1_a_template_of_one_field_never_replaces_the_project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "train.py").write_text("print('train')\n")
    (project / "data" / "set.csv").write_text("1,2\n")
    monkeypatch.chdir(project)

    @isolated_export("{name}", conflict="overwrite")
    def run(name: str) -> None:
        Path("export/x").write_text("x")

    for value in (".", "./", "%2e", "a/..", ""):
        with pytest.raises(TemplateError):
            run(name=value)
    assert (project / "train.py").read_text() == "print('train')\n"
    assert (project / "data" / "set.csv").read_text() == "1,2\n"
    # A template whose written parts can never name a run fails at decoration.
    with pytest.raises(TemplateError, match="segment below its root"):
        isolated_export(".", conflict="overwrite")(lambda: None)
    with pytest.raises(TemplateError, match="whatever its fields hold"):
        isolated_export("runs/{name}/..", conflict="overwrite")(lambda name: None)
    assert not (project / "runs").exists()


@pytest.mark.parametrize("conflict", ["error", "overwrite"])
def test_item1_a_run_uri_at_the_root_is_refused_by_the_backend_itself(
    dest: Dest, conflict: str
) -> None:
    """Defence in depth: a request that names the root itself (bypassing the template
    check) is refused by every backend, and the sibling runs are intact."""
    from tests.raw import raw_export

    exporter(dest)(name="r1", files={"export/a.txt": b"sibling run"})
    with pytest.raises(RaySyncError):
        raw_export(
            dest,
            dest.uri("runs"),
            {"export/a.txt": b"evil"},
            conflict=conflict,
            template=dest.uri("runs/{name}"),
        )
    assert dest.read("runs/r1/export/a.txt") == b"sibling run"
    assert dest.verify("runs/r1") == 0


# -- 2. an existing directory of someone's data ------------------------------------------------


@pytest.mark.parametrize("conflict", ["error", "overwrite"])
def test_item2_a_directory_of_user_data_is_never_written_into_or_wiped(
    dest: Dest, conflict: str
) -> None:
    dest.plant("home/datasets/train.csv", b"a,b\n1,2\n")
    write = exporter(dest, "home/{name}", conflict=conflict)
    with pytest.raises(RunExistsError, match="not a raysync run"):
        write(name="datasets", files={"export/a.txt": b"x"})
    assert dest.files("home/datasets") == {"train.csv": b"a,b\n1,2\n"}


@pytest.mark.parametrize("backend", REMOTE_RSYNC)
def test_item2_a_percent_encoded_dot_dot_never_reaches_the_remote_side(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    dest = make_dest(request, backend, tmp_path)
    dest.plant("data/keep.txt", b"keep")
    write = exporter(dest, "runs/x/{name}", conflict="overwrite")
    for value in ("%2e%2e", "%2e%2e/%2e%2e", "%252e%252e"):
        with pytest.raises(TemplateError):
            write(name=value, files={"export/a.txt": b"x"})
    # A URI written with the escape itself (not from a field) is refused by the backend.
    with pytest.raises(RaySyncError, match=r"'\.\.'"):
        exporter(dest, "runs/%2e%2e/{name}")(name="n", files={"export/a.txt": b"x"})
    assert dest.files("data") == {"keep.txt": b"keep"}


@pytest.mark.parametrize("conflict", ["error", "overwrite"])
def test_item2_a_run_of_another_function_is_never_replaced(dest: Dest, conflict: str) -> None:
    exporter(dest)(name="r1", files={"export/a.txt": b"theirs"})

    @isolated_export(dest.uri("runs/{name}"), storage_options=dest.options, conflict=conflict)
    def other_function(name: str) -> None:
        Path("export/a.txt").write_bytes(b"mine")

    with pytest.raises(RunExistsError, match=r"another function|already exists"):
        other_function(name="r1")
    assert dest.read("runs/r1/export/a.txt") == b"theirs"
    assert dest.verify("runs/r1") == 0


@pytest.mark.parametrize("conflict", ["error", "overwrite"])
def test_item2_a_run_is_never_committed_inside_another_run(dest: Dest, conflict: str) -> None:
    """A value with '/' may name a run below another committed run, which would be deleted
    when the outer run is replaced: refused, whichever function and policy."""
    exporter(dest)(name="a", files={"export/a.txt": b"outer"})

    @isolated_export(dest.uri("runs/{name}"), storage_options=dest.options, conflict=conflict)
    def inner(name: str) -> None:
        Path("export/b.txt").write_bytes(b"inner")

    with pytest.raises(RunExistsError, match="inside the committed run"):
        inner(name="a/b")
    # Nor with a template whose root lies inside the run (every backend checks every
    # directory or prefix above the run, not only up to the template's root).
    with pytest.raises(RunExistsError, match="inside the committed run"):
        exporter(dest, tail="runs/a/eval/{name}")(name="r1", files={"export/e.txt": b"e"})
    assert dest.read("runs/a/b/export/b.txt") is None
    assert dest.read("runs/a/eval/r1/export/e.txt") is None
    assert dest.verify("runs/a") == 0


@pytest.mark.parametrize("backend", ["memory", "s3", *REMOTE_RSYNC])
def test_item2_a_run_is_never_committed_inside_a_run_being_written(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """An outer run being written (its lock or claim there, no manifest yet) would delete a
    run committed inside it when it commits: the inner export is refused."""
    from raysync.rules import claim_record, run_record

    monkeypatch.chdir(tmp_path)
    dest = make_dest(request, backend, tmp_path)
    marker = ".raysync-lock" if backend in ("memory", "s3") else ".raysync-claim-0123abcd"
    writer = claim_record(run_record("tests.outer", "outer-task"))
    dest.plant(f"runs/a/{marker}", json.dumps(writer).encode())
    with pytest.raises(RunExistsError, match="inside the committed run"):
        exporter(dest)(name="a/b", files={"export/b.txt": b"inner"})
    assert dest.read("runs/a/b/export/b.txt") is None
    assert dest.read(f"runs/a/{marker}") is not None


@pytest.mark.parametrize("backend", REMOTE_RSYNC)
def test_item2_what_a_killed_rsync_left_in_a_run_never_blocks_replacing_it(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """rsync keeps partial files of a killed transfer in '.raysync-partial' dirs; they are
    rsync's, not someone's data: the run can still be replaced (and retried)."""
    monkeypatch.chdir(tmp_path)
    dest = make_dest(request, backend, tmp_path)
    write = exporter(dest, conflict="overwrite")
    write(name="r", files={"export/a.txt": b"first"})
    dest.plant("runs/r/export/.raysync-partial/ckpt-100.bin", b"half a checkpoint")
    write(name="r", files={"export/a.txt": b"second"})
    assert dest.read("runs/r/export/a.txt") == b"second"
    assert dest.verify("runs/r") == 0


@pytest.mark.parametrize("planted", ["notes.txt", f"b/{MANIFEST_NAME}"])
def test_item2_replacing_a_run_never_deletes_what_its_manifest_does_not_list(
    dest: Dest, planted: str
) -> None:
    """Files put into a committed run by hand, or a run nested in it by an older raysync,
    are not the run's own: replacing the run (a retry, or overwrite) is refused."""
    write = exporter(dest, conflict="overwrite")
    write(name="a", files={"export/a.txt": b"first"})
    dest.plant(f"runs/a/{planted}", b"not the run's own")
    with pytest.raises(RunExistsError, match=r"does not list|another run lies inside"):
        write(name="a", files={"export/a.txt": b"second"})
    assert dest.read(f"runs/a/{planted}") == b"not the run's own"
    assert dest.read("runs/a/export/a.txt") == b"first"


@pytest.mark.parametrize("backend", REMOTE_RSYNC)
def test_item2_two_calls_claiming_one_rsync_run_at_once_never_both_commit(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    """rsync has no exclusive create: each call claims under its own name and looks again.
    Of two calls of different functions exporting one new run at once, at most one commits,
    and what is committed verifies and is the winner's."""
    from raysync.manifest import scan
    from raysync.rules import run_record
    from tests.raw import raw_export, workspace

    dest = make_dest(request, backend, tmp_path)

    def go(fn: str, uri: str, barrier: threading.Barrier, outcome: dict[str, str]) -> None:
        ws = workspace({f"export/{fn}.txt": fn.encode()})
        entries = scan(ws, ["export"])
        barrier.wait(timeout=30)
        try:
            raw_export(dest, uri, ws=ws, entries=entries, run=run_record(fn, f"task-{fn}"))
            outcome[fn] = "ok"
        except RunExistsError:
            outcome[fn] = "refused"

    wins = 0
    for i in range(5):
        outcome: dict[str, str] = {}
        barrier = threading.Barrier(2)
        args = (dest.uri(f"runs/race{i}"), barrier, outcome)
        threads = [threading.Thread(target=go, args=(fn, *args)) for fn in ("f", "g")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        winners = [fn for fn, v in outcome.items() if v == "ok"]
        assert len(winners) <= 1 and len(outcome) == 2, outcome
        if winners:
            wins += 1
            got = dest.files(f"runs/race{i}")
            assert got.keys() == {f"export/{winners[0]}.txt", MANIFEST_NAME}, got.keys()
            assert dest.verify(f"runs/race{i}") == 0
    assert wins >= 4  # calls that meet: the smaller claim holds, the other withdraws


# -- 3. Ray task ids repeat across clusters ----------------------------------------------------

TWO_CLUSTERS = r"""
import json, sys
import ray
from raysync import isolated_export

targets, stamp = json.loads(sys.argv[1]), sys.argv[2]
ray.init(address="local", _node_ip_address="127.0.0.2", include_dashboard=False, num_cpus=1,
         configure_logging=False)
out = {}
for name, (uri, options) in targets.items():
    @ray.remote(max_retries=0)
    @isolated_export(uri, storage_options=options)
    def first(stamp: str) -> str:
        with open("export/stamp.txt", "w") as f:
            f.write(stamp)
        return ray.get_runtime_context().get_task_id()
    try:
        r = ray.get(first.remote(stamp))
        out[name] = {"ok": r.uri, "task_id": r.value}
    except Exception as e:
        kinds = [c.__name__ for c in type(e).__mro__ if c.__module__ == "raysync.errors"]
        out[name] = {"error": (kinds or [type(e).__name__])[0], "text": str(e)[-300:]}
print("RESULT " + json.dumps(out))
ray.shutdown()
"""


def test_item3_the_same_script_on_a_fresh_cluster_never_replaces_yesterdays_run(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two fresh clusters, one after the other, run the same driver: the first call of each
    gets the same Ray task id. The second run must not take the first's committed run for
    an earlier attempt of its own call (conflict='error'), on every backend that persists
    across clusters; and ``{call_id}`` names the two calls differently."""
    import subprocess
    import sys

    monkeypatch.chdir(tmp_path)
    backends = ["local", "s3", "rsync-mount", "rsync-daemon", "rsync-ssh"]
    dests = {b: make_dest(request, b, tmp_path) for b in backends}
    targets: dict[str, tuple[str, Any]] = {
        b: (d.uri("runs/fixed"), d.options) for b, d in dests.items()
    }
    targets["by-call-id"] = (str(tmp_path / "ids" / "{call_id}"), None)

    def run(stamp: str) -> dict[str, Any]:
        proc = subprocess.run(
            [sys.executable, "-c", TWO_CLUSTERS, json.dumps(targets), stamp],
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
            cwd=tmp_path,
        )
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        assert lines, proc.stderr[-3000:]
        return dict(json.loads(lines[0][len("RESULT ") :]))

    first, second = run("yesterday"), run("today")
    for b in backends:
        assert "ok" in first[b], first[b]
        assert first[b]["task_id"] == second[b].get("task_id", first[b]["task_id"])
        assert second[b].get("error") == "RunExistsError", second[b]
        assert dests[b].read("runs/fixed/export/stamp.txt") == b"yesterday"
        assert dests[b].verify("runs/fixed") == 0
    assert "ok" in second["by-call-id"]
    assert first["by-call-id"]["ok"] != second["by-call-id"]["ok"]
    assert sorted(
        p.name for p in (tmp_path / "ids").iterdir() if not p.name.startswith(".")
    ) == sorted(Path(r["ok"]).name for r in (first["by-call-id"], second["by-call-id"]))


def test_item3_each_decorated_call_a_task_makes_is_its_own_call_and_its_retry_finds_it(
    host: Path,
) -> None:
    """One task calls decorated functions directly: each call is a call of its own
    ({call_id} differs; another function's run is never taken for a retry), and when the
    task is retried, each call finds its own earlier attempt's run."""
    import ray

    @isolated_export(str(host / "runs" / "{call_id}"))
    def prepare() -> None:
        Path("export/p.txt").write_text("prepare")

    @isolated_export(str(host / "runs" / "fixed"))
    def first() -> None:
        Path("export/who.txt").write_text("first")

    @isolated_export(str(host / "runs" / "fixed"))
    def second() -> None:
        Path("export/who.txt").write_text("second")

    @ray.remote(max_retries=1)
    def pipeline(marker: str) -> list[str]:
        uris = [prepare().uri, prepare().uri, first().uri]
        if not os.path.exists(marker):
            Path(marker).touch()
            os._exit(1)  # the worker dies after three commits: Ray retries the task
        try:
            second()
        except RunExistsError:
            return [*uris, "refused"]
        return [*uris, "replaced"]

    a, b, fixed, outcome = ray.get(pipeline.remote(str(host / "crashed-once")), timeout=120)
    assert a != b and fixed == (host / "runs" / "fixed").as_uri()
    assert outcome == "refused"
    assert (host / "runs" / "fixed" / "export" / "who.txt").read_text() == "first"
    runs = sorted(p.name for p in (host / "runs").iterdir() if not p.name.startswith("."))
    # The retry's calls found the first attempt's runs: two {call_id} runs, not four.
    assert runs == sorted([Path(a).name, Path(b).name, "fixed"])
    assert cli(["verify", str(host / "runs" / "fixed")]) == 0


def test_item3_a_retried_task_that_calls_in_another_order_finds_its_own_runs(host: Path) -> None:
    """A task exports shards in set order, which differs in the retry's fresh process: each
    retried call still finds its earlier attempt's run (conflict='error')."""
    import ray

    @isolated_export(str(host / "shards" / "{shard}"))
    def export_shard(shard: str, attempt_tag: str) -> None:
        Path("export/s.txt").write_text(f"{shard} {attempt_tag}")

    @ray.remote(max_retries=1)
    def pipeline(marker: str) -> str:
        shards = ["a", "b", "c"]
        if not os.path.exists(marker):
            for s in shards:
                export_shard(shard=s, attempt_tag="first")
            Path(marker).touch()
            os._exit(1)  # dies after committing every shard: Ray retries the task
        for s in reversed(shards):
            export_shard(shard=s, attempt_tag="retry")
        return "ok"

    assert ray.get(pipeline.remote(str(host / "crashed-once")), timeout=120) == "ok"
    for s in "abc":
        assert (host / "shards" / s / "export" / "s.txt").read_text() == f"{s} retry"
        assert cli(["verify", str(host / "shards" / s)]) == 0


def test_item3_two_scripts_with_a_function_of_the_same_name_never_replace_each_other(
    tmp_path: Path,
) -> None:
    import subprocess
    import sys

    script = (
        "import sys\nfrom pathlib import Path\nfrom raysync import isolated_export\n"
        "@isolated_export('results/{name}', conflict='overwrite')\n"
        "def run(name):\n    Path('export/' + sys.argv[1]).write_text(sys.argv[1])\n"
        "run(name='exp1')\n"
    )
    for name in ("train", "evaluate"):
        (tmp_path / f"{name}.py").write_text(script)
    repo = str(Path(__file__).parents[1])

    def run(name: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, f"{name}.py", f"{name}.out"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, "PYTHONPATH": repo},
        )

    assert run("train").returncode == 0
    refused = run("evaluate")
    assert refused.returncode != 0 and "RunExistsError" in refused.stderr, refused.stderr[-2000:]
    assert "train.run" in refused.stderr
    assert (tmp_path / "results" / "exp1" / "export" / "train.out").exists()
    assert not (tmp_path / "results" / "exp1" / "export" / "evaluate.out").exists()


# -- 4. names are literal, never globs (object stores) ----------------------------------------

OBJECT_STORES = ["memory", "s3"]


@pytest.fixture(params=OBJECT_STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Dest:
    monkeypatch.chdir(tmp_path)
    return make_dest(request, request.param, tmp_path)


def test_item4_a_failed_export_of_run_exp_q_never_deletes_exp1(store: Dest) -> None:
    from raysync.manifest import scan
    from tests.raw import raw_export, workspace

    exporter(store)(name="exp1", files={"export/a.txt": b"exp1's", "export/b.txt": b"b"})
    ws = workspace({"export/a.txt": b"new", "export/b.txt": b"b2"})
    entries = scan(ws, ["export"])
    (ws / "export" / "b.txt").write_bytes(b"grown after the scan")  # the export fails
    with pytest.raises(RaySyncError):
        raw_export(store, store.uri("runs/exp?"), ws=ws, entries=entries)
    assert store.files("runs/exp1") == {
        "export/a.txt": b"exp1's",
        "export/b.txt": b"b",
        MANIFEST_NAME: store.read(f"runs/exp1/{MANIFEST_NAME}"),
    }
    assert store.verify("runs/exp1") == 0


def test_item4_a_file_named_star_never_costs_a_run_its_other_files(store: Dest) -> None:
    write = exporter(store, conflict="overwrite")
    files = {"export/*": b"star", "export/a": b"a", "export/ab": b"ab", "export/[x]": b"x"}
    write(name="r", files=files)
    write(name="r", files={**files, "export/a": b"a2"})
    assert store.verify("runs/r") == 0
    got = store.files("runs/r")
    got.pop(MANIFEST_NAME)
    assert got == {**files, "export/a": b"a2"}


def test_item4_materializing_glob_like_names_works(store: Dest, tmp_path: Path) -> None:
    files = {"export/report[1].txt": b"one", "export/report1.txt": b"other", "export/?": b"q"}
    result = exporter(store)(name="r", files=files)
    out = result.materialize(tmp_path / "back")
    assert {
        p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()
    } == files


def test_item4_committing_run_a_star_never_deletes_the_lock_of_run_a1(store: Dest) -> None:
    lock = {"session": "s", "job_id": "j", "task_id": "in-flight", "function": "f"}
    store.plant("runs/a1/.raysync-lock", json.dumps(lock).encode())
    exporter(store)(name="a*", files={"export/x": b"x"})
    assert json.loads(store.read("runs/a1/.raysync-lock") or b"{}") == lock
    assert store.verify("runs/a*") == 0


def test_item4_a_key_the_store_reads_as_a_version_is_refused_or_kept_literally(
    store: Dest,
) -> None:
    files = {"export/page": b"the page", "export/page?versionId=3": b"not the page"}
    try:
        exporter(store)(name="r", files=files)
    except TreeError as e:
        assert "versionId" in str(e) or "version" in str(e)
        assert store.files("runs/r") == {}  # refused before anything was sent
        return
    assert store.read("runs/r/export/page") == b"the page"
    assert store.verify("runs/r") == 0


@pytest.mark.parametrize("backend", ["rsync-mount", *REMOTE_RSYNC])
@pytest.mark.parametrize(
    ("value", "sibling"), [("exp?", "exp"), ("exp#", "exp"), ("exp[1]", "exp1"), ("exp*", "exp1")]
)
def test_item4_an_rsync_run_named_with_url_or_wildcard_characters_never_touches_a_sibling(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    backend: str,
    value: str,
    sibling: str,
) -> None:
    """urlsplit cuts a path at '?' and '#', and the remote rsync expands wildcards: either
    the run is exported under exactly its own name, or it is refused; the sibling stays."""
    monkeypatch.chdir(tmp_path)
    dest = make_dest(request, backend, tmp_path)
    write = exporter(dest, conflict="overwrite")
    write(name=sibling, files={"export/a.txt": b"the sibling's"})
    try:
        result = write(name=value, files={"export/a.txt": b"evil"})
    except RaySyncError as e:
        assert "wildcard" in str(e) or "'?' and '#'" in str(e), e
    else:
        assert backend == "rsync-mount" and value in ("exp[1]", "exp*")
        assert result.uri.endswith(f"/runs/{value}")
        assert dest.read(f"runs/{value}/export/a.txt") == b"evil"
    assert dest.read(f"runs/{sibling}/export/a.txt") == b"the sibling's"
    assert dest.verify(f"runs/{sibling}") == 0


# -- 5. modes from a manifest ------------------------------------------------------------------


def _tamper_manifest(dest: Dest, run: str, change: Callable[[dict[str, Any]], None]) -> None:
    doc = json.loads(dest.read(f"{run}/{MANIFEST_NAME}") or b"{}")
    change(doc)
    dest.plant(f"{run}/{MANIFEST_NAME}", json.dumps(doc).encode())


def test_item5_pull_never_applies_setuid_setgid_or_world_writable_modes(
    dest: Dest, tmp_path: Path
) -> None:
    exporter(dest)(name="r", files={"export/tool": b"#!/bin/sh\n", "export/open": b"x"})

    def evil(doc: dict[str, Any]) -> None:
        for f in doc["files"]:
            f["mode"] = 0o6755 if f["path"] == "export/tool" else 0o777

    _tamper_manifest(dest, "runs/r", evil)
    out = tmp_path / "pulled"
    argv = ["pull", dest.run_uri("runs/r"), str(out)]
    if dest.options:
        argv += ["--storage-options", json.dumps(dest.options)]
    assert cli(argv) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((out / "export" / "tool").stat().st_mode) == 0o755 & ~umask
    assert stat.S_IMODE((out / "export" / "open").stat().st_mode) == 0o777 & ~umask


# -- 6. every commit verifies --------------------------------------------------------------------


def test_item6a_a_damaged_committed_file_is_never_reused(dest: Dest) -> None:
    write = exporter(dest, conflict="overwrite")
    files = {"export/a.txt": b"alpha" * 1000, "export/b.txt": b"bravo" * 1000}
    write(name="r", files=files)
    dest.plant("runs/r/export/a.txt", b"X" * 5000)  # same size, other bytes
    write(name="r", files=files)
    assert dest.verify("runs/r") == 0
    assert dest.read("runs/r/export/a.txt") == files["export/a.txt"]


REWRITER = r"""#!{python}
import os, sys
args = sys.argv[1:]
if "--copy-links" in args and not os.path.exists(os.environ["RAYSYNC_TEST_REWRITTEN"]):
    import time
    time.sleep(0.5)  # let raysync's own read of the sources finish first
    src = args[args.index("--") + 1]
    with open(os.path.join(src, "export", "a.txt"), "r+b") as f:  # through the symlink
        f.write(b"Z" * 8)
    open(os.environ["RAYSYNC_TEST_REWRITTEN"], "w").close()
os.execvp("rsync", ["rsync", *args])
"""


@pytest.mark.parametrize("backend", ["rsync-mount", *REMOTE_RSYNC])
def test_item6b_a_file_rewritten_in_place_during_an_rsync_export_is_never_committed_unverified(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    import sys

    monkeypatch.chdir(tmp_path)
    dest = make_dest(request, backend, tmp_path)
    wrapper = tmp_path / "rsync-rewriting"
    wrapper.write_text(REWRITER.replace("{python}", sys.executable))
    wrapper.chmod(0o755)
    monkeypatch.setenv("RAYSYNC_TEST_REWRITTEN", str(tmp_path / "rewritten"))
    dest.options = {**(dest.options or {}), "rsync_binary": str(wrapper)}
    try:
        exporter(dest)(name="r", files={"export/a.txt": b"original bytes", "export/b": b"b"})
    except TreeError as e:
        assert "changed" in str(e)
        assert dest.read(f"runs/r/{MANIFEST_NAME}") is None  # nothing committed
    else:
        assert dest.verify("runs/r") == 0
    assert (tmp_path / "rewritten").exists()  # the rewrite did happen


@pytest.mark.slow
def test_item6c_two_concurrent_overwrites_of_one_object_store_run_never_commit_a_mix(
    store: Dest,
) -> None:
    write = exporter(store, conflict="overwrite")
    write(name="r", files={"export/0.txt": b"first"})
    for round_ in range(3):
        outcomes: list[str] = []

        def one(tag: str, r: int = round_, outcomes: list[str] = outcomes) -> None:
            files = {f"export/{i}.txt": f"{tag}-{r}-{i}".encode() * 50 for i in range(120)}
            try:
                write(name="r", files=files)
                outcomes.append(f"ok:{tag}")
            except RunExistsError:
                outcomes.append(f"refused:{tag}")

        threads = [threading.Thread(target=one, args=(t,)) for t in ("A", "B")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert any(o.startswith("ok") for o in outcomes), outcomes
        assert store.verify("runs/r") == 0
        got = store.files("runs/r")
        got.pop(MANIFEST_NAME)
        assert len({v.split(b"-")[0] for v in got.values()}) == 1  # one call's files only
        assert store.read("runs/r/.raysync-lock") is None


# -- 7. placing files is all or nothing ------------------------------------------------------


def test_item7_pull_into_a_destination_with_a_file_in_the_way_writes_nothing(
    dest: Dest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exporter(dest)(name="r", files={"export/a.txt": b"a", "data/b.txt": b"b"})
    out = tmp_path / "pulled"
    out.mkdir()
    (out / "data").write_text("a file where a directory goes")
    argv = ["pull", dest.run_uri("runs/r"), str(out)]
    if dest.options:
        argv += ["--storage-options", json.dumps(dest.options)]
    assert cli(argv) != 0
    err = capsys.readouterr().err
    assert "'data'" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["data"]  # export/ was not placed
    assert (out / "data").read_text() == "a file where a directory goes"


def test_item7_materialize_never_follows_a_symlink_out_of_the_destination(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()

    @isolated_export(None)
    def f() -> None:
        Path("export/a.txt").write_text("a")

    result = f()
    out = tmp_path / "out"
    out.mkdir()
    (out / "export").symlink_to(outside)
    with pytest.raises(RaySyncError, match="symbolic link"):
        result.materialize(out)
    assert list(outside.iterdir()) == []


# -- 8. credentials ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "secret", ["Se/cr+et@with=chars-0001", "plainsecretvalue0002", "p%40ss%2Fword0003"]
)
def test_item8_a_secret_in_the_uri_never_reaches_errors_or_logs(
    moto_endpoint: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    secret: str,
) -> None:
    import logging

    from raysync.redaction import redact

    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.DEBUG, logger="raysync")
    uri = f"s3://AKIDSAFETYTEST:{secret}@no-such-bucket-{tmp_path.name[-6:]}/runs/{{name}}"
    opts = {
        "client_kwargs": {"endpoint_url": moto_endpoint, "region_name": "us-east-1"},
        "upload_retries": 1,
        "upload_retry_base_delay": 0.01,
    }
    with pytest.raises(Exception) as info:

        @isolated_export(uri, storage_options=opts)
        def f(name: str) -> None:
            Path("export/a.txt").write_text("a")

        f(name="r")
    shown = str(info.value) + repr(info.value) + caplog.text
    for part in {secret, secret.split("@")[0], secret.replace("%40", "@").replace("%2F", "/")}:
        assert part not in shown
    assert secret not in redact(f"see {uri} and s3://AKIDSAFETYTEST:{secret}@b/x")


def test_item8_a_secret_in_storage_options_never_reaches_errors_or_logs(
    moto_endpoint: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.DEBUG, logger="raysync")
    secret = "opt-secret-Zq9/+@x"
    opts = {
        "key": "AKIDOPTIONS",
        "secret": secret,
        # The endpoint quotes the secret back in its URL: any client error shows it.
        "client_kwargs": {
            "endpoint_url": f"http://127.0.0.1:1/{secret}",
            "region_name": "us-east-1",
        },
        "config_kwargs": {"retries": {"max_attempts": 1}},  # port 1 refuses: fail fast
        "upload_retries": 1,
        "upload_retry_base_delay": 0.01,
    }

    @isolated_export("s3://bucket/runs/{name}", storage_options=opts)
    def f(name: str) -> None:
        Path("export/a.txt").write_text("a")

    with pytest.raises(RaySyncError) as info:
        f(name="r")
    assert secret not in str(info.value) + caplog.text
    assert info.value.__cause__ is None  # the store's own error (which quotes it) is cut


def test_item8_a_secret_in_the_users_own_error_never_reaches_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    @isolated_export("runs/{name}")
    def f(name: str) -> None:
        Path("export/partial.txt").write_text("half")
        raise ConnectionError("upload to ftp://alice:Hunter2-Secret@files.corp/out timed out")

    with pytest.raises(ConnectionError):
        f(name="r")
    record = json.loads((tmp_path / "runs" / "r" / MANIFEST_NAME).read_text())["run"]
    assert record["status"] == "failed" and "ConnectionError" in record["error"]
    assert "Hunter2-Secret" not in (tmp_path / "runs" / "r" / MANIFEST_NAME).read_text()


def test_a_password_with_spaces_or_quotes_never_reaches_an_export_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for password in ["s3cret pass", "s3cret'pass", 's3cr"et<>pass']:

        @isolated_export(f"ftp://alice:{password}@127.0.0.1:1/runs/{{name}}")
        def f(name: str) -> None:
            Path("export/a.txt").write_text("a")

        with pytest.raises(RaySyncError) as info:
            f(name="r")
        text = str(info.value)
        assert password not in text and "pass" not in text.split("127.0.0.1")[0], text


def test_item8_a_request_the_client_itself_refuses_is_not_retried(
    moto_endpoint: str, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from tests.conftest import s3_options

    monkeypatch.chdir(tmp_path)
    opts = s3_options(
        moto_endpoint,
        s3_additional_kwargs={"ACL": 5},  # botocore: ParamValidationError, before any request
        upload_retries=5,
        upload_retry_base_delay=2.0,
        upload_retry_max_delay=2.0,
    )

    @isolated_export(f"s3://{bucket}/runs/{{name}}", storage_options=opts)
    def f(name: str) -> None:
        Path("export/a.txt").write_text("a")

    t0 = time.monotonic()
    with pytest.raises(RaySyncError, match=r"ParamValidation|Invalid type"):
        f(name="r")
    assert time.monotonic() - t0 < 2.0  # five retries would take about 5 s


# -- 9. symlinks in the tree --------------------------------------------------------------------


def test_item9_a_tree_under_a_symlinked_directory_is_refused(dest: Dest, tmp_path: Path) -> None:
    outside = tmp_path / "outside-secrets"
    (outside / "summaries").mkdir(parents=True)
    (outside / "summaries" / "id_rsa").write_text("PRIVATE KEY")

    @isolated_export(
        dest.uri("runs/{name}"), storage_options=dest.options, trees=["artifacts/summaries"]
    )
    def f(name: str) -> None:
        os.rmdir("artifacts/summaries")
        os.rmdir("artifacts")
        os.symlink(outside, "artifacts")

    with pytest.raises(UnsafePathError, match="symbolic link"):
        f(name="r")
    assert dest.files("runs") == {} or dest.read("runs/r/artifacts/summaries/id_rsa") is None


def test_item9_a_directory_swapped_for_a_symlink_after_the_scan_is_never_followed(
    dest: Dest, tmp_path: Path
) -> None:
    from raysync.manifest import scan
    from tests.raw import raw_export, workspace

    if dest.backend == "host":
        pytest.skip("host-sync reads the workspace in the worker like every other backend")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "id_rsa").write_bytes(b"PRIVATEKEY!")  # the same size as the scanned file
    ws = workspace({"export/sub/id_rsa": b"harmless!!!", "export/ok.txt": b"ok"})
    entries = scan(ws, ["export"])
    (ws / "export" / "sub" / "id_rsa").unlink()
    (ws / "export" / "sub").rmdir()
    (ws / "export" / "sub").symlink_to(outside)
    with pytest.raises(RaySyncError, match=r"replaced|changed"):
        raw_export(dest, dest.uri("runs/r"), ws=ws, entries=entries)
    assert dest.read("runs/r/export/sub/id_rsa") in (None, b"harmless!!!")
    assert dest.read(f"runs/r/{MANIFEST_NAME}") is None


@pytest.mark.parametrize("backend", ["local", "rsync-mount", *REMOTE_RSYNC])
def test_item9_an_overwrite_whose_tree_fails_its_check_keeps_the_old_run(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    """A source replaced after the scan fails the export before the old run is touched."""
    from raysync.manifest import scan
    from raysync.rules import run_record
    from tests.raw import raw_export, workspace

    dest = make_dest(request, backend, tmp_path)
    run = run_record("f", "t1")
    old = workspace({"export/a.txt": b"old"})
    raw_export(dest, dest.uri("runs/r"), ws=old, entries=scan(old, ["export"]), run=run)
    ws = workspace({"export/a.txt": b"new", "export/b.txt": b"new b"})
    entries = scan(ws, ["export"])
    (ws / "export" / "b.txt").unlink()
    (ws / "export" / "b.txt").write_bytes(b"another b")  # another file now: refused
    with pytest.raises(RaySyncError, match=r"replaced|changed"):
        raw_export(dest, dest.uri("runs/r"), ws=ws, entries=entries, run=run, conflict="overwrite")
    assert dest.read("runs/r/export/a.txt") == b"old"
    assert dest.verify("runs/r") == 0


# -- 10. smaller items ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tamper",
    [
        lambda d: d["files"][0].pop("size"),
        lambda d: d["files"][0].update(size="12"),
        lambda d: d["files"][0].update(mode=2**70),
        lambda d: d["files"][0].update(digest=None),
        lambda d: d.pop("run"),
        lambda d: d.update(files={"a": 1}),
        lambda d: d["files"].append(dict(d["files"][0])),
    ],
    ids=["missing key", "wrong type", "huge mode", "null digest", "no run", "files dict", "dup"],
)
def test_item10_a_damaged_manifest_is_a_clear_error_in_verify_pull_and_ls(
    dest: Dest,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    tamper: Callable[[dict[str, Any]], Any],
) -> None:
    exporter(dest)(name="r", files={"export/a.txt": b"a"})
    _tamper_manifest(dest, "runs/r", tamper)
    opts = ["--storage-options", json.dumps(dest.options)] if dest.options else []
    uri = dest.run_uri("runs/r")
    assert cli(["verify", uri, *opts]) != 0
    assert cli(["pull", uri, str(tmp_path / "p"), *opts]) != 0
    cli(["ls", dest.run_uri("runs"), *opts])  # lists it as damaged, or says so: no traceback
    err = capsys.readouterr().err
    assert "Traceback" not in err and "manifest" in err
    assert not (tmp_path / "p" / "export").exists()


def test_item10_ls_lists_a_run_whose_record_holds_other_types(
    dest: Dest, capsys: pytest.CaptureFixture[str]
) -> None:
    if dest.backend in REMOTE_RSYNC:
        pytest.skip("rsync daemon and ssh destinations cannot be listed yet")
    exporter(dest)(name="r", files={"export/a.txt": b"a"})
    _tamper_manifest(dest, "runs/r", lambda d: d["run"].update(ended_at=1767225600, task_id=[1]))
    opts = ["--storage-options", json.dumps(dest.options)] if dest.options else []
    assert cli(["ls", dest.run_uri("runs"), *opts]) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    assert "committed" in out.out and "runs/r" in out.out


@pytest.mark.parametrize("backend", ["local", "rsync-mount", "memory"])
def test_item10_an_unreadable_source_file_is_reported_as_such(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    """Run without the capabilities that let root read every file (``setpriv``): the error
    names the file that cannot be read, not the destination."""
    import subprocess
    import sys

    dest = make_dest(request, backend, tmp_path)
    ws = tmp_path / "ws"
    (ws / "export").mkdir(parents=True)
    (ws / "export" / "ok.txt").write_text("ok")
    (ws / "export" / "secret.txt").write_text("no")
    (ws / "export" / "secret.txt").chmod(0)
    script = (
        "import json, sys, os\n"
        "from pathlib import Path\n"
        "from tests.raw import raw_export\n"
        "from tests.destinations import Dest\n"
        "d = Dest(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]) or None,"
        " disk=Path(sys.argv[4]) if sys.argv[4] else None)\n"
        "if d.backend == 'memory':\n"
        "    import fsspec; d.fs = fsspec.filesystem('memory'); d.fs_root = d.prefix[9:]\n"
        "try:\n"
        "    raw_export(d, d.uri('runs/r'), ws=Path(sys.argv[5]))\n"
        "except Exception as e:\n"
        "    print('ERROR', type(e).__name__, e)\n"
    )
    import shutil

    drop: list[str] = []
    if os.getuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv (util-linux) to drop DAC override")
        drop = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--"]
    proc = subprocess.run(
        [
            *drop,
            sys.executable,
            "-c",
            script,
            dest.backend,
            dest.prefix,
            json.dumps(dest.options),
            str(dest.disk or ""),
            str(ws),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).parents[1],
    )
    out = proc.stdout + proc.stderr
    assert "ERROR" in out, out
    assert "secret.txt" in out and ("cannot read" in out or "not readable" in out), out
    assert "destination is" not in out, out


def test_item10_a_thousand_deep_tree_exports_or_fails_clearly(dest: Dest) -> None:
    from raysync.fsops import makedirs

    @isolated_export(dest.uri("runs/{name}"), storage_options=dest.options)
    def deep(name: str) -> None:
        leaf = Path("export", *(["d"] * 1000))
        makedirs(leaf)
        (leaf / "f.txt").write_text("deep")

    from raysync.fsops import remove_tree

    try:
        deep(name="r")
    except RaySyncError as e:
        assert not isinstance(e.__cause__, RecursionError)
        assert dest.read(f"runs/r/{MANIFEST_NAME}") is None
        assert dest.backend == "s3", e  # only S3 limits keys (1,024 bytes)
    else:
        assert dest.verify("runs/r") == 0
    finally:
        if dest.disk is not None:
            remove_tree(dest.disk)  # pytest's own clean-up recurses once per level


def test_item10_a_newline_in_a_run_directory_never_forges_rows_in_ls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)

    @isolated_export("runs/{name}")
    def f(name: str) -> None:
        Path("export/a").write_text("a")

    f(name="real")
    forged = tmp_path / "runs" / "x\ncommitted      1      1 2026-12-01 forged"
    (tmp_path / "runs" / "real").rename(forged)
    assert cli(["ls", "runs"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2  # the header and one run
    assert "\\n" in lines[1]


def test_item10_the_host_sink_takes_roots_only_from_its_own_driver(
    ray_wd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    monkeypatch.chdir(tmp_path)

    @isolated_export("host://runs/{name}")
    def f(name: str) -> None:
        Path("export/a").write_text("a")

    f(name="r")  # the sink exists
    name = next(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "host-sink" in a["name"]
    )
    sink = ray.get_actor(name, namespace=ray.get_runtime_context().namespace)
    with pytest.raises(ray.exceptions.RayTaskError, match="only the driver"):
        ray.get(sink.allow.remote("/", "guessed-key"))
    run = {"session": "s", "job_id": "j", "task_id": "t", "function": "f"}
    with pytest.raises(ray.exceptions.RayTaskError, match="serves job"):
        ray.get(sink.open.remote("/etc/evil", run, "overwrite", "ffffffff"))
    job = ray.get_runtime_context().get_job_id()
    with pytest.raises(ray.exceptions.RayTaskError, match="outside every root"):
        ray.get(sink.open.remote("/etc/evil", run, "overwrite", job))


def _one_local_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A committed local run at ``tmp_path/runs/r`` holding ``export/a.txt``."""
    monkeypatch.chdir(tmp_path)

    @isolated_export(str(tmp_path / "runs" / "{name}"))
    def f(name: str) -> None:
        Path("export/a.txt").write_text("a")

    f(name="r")


def test_item7_pull_never_writes_through_a_link_planted_in_the_destination(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A link in the pull's destination where raysync used to stage the manifest (a fixed
    name) pointed the write at any file; the manifest now goes through a fresh file."""
    _one_local_run(tmp_path, monkeypatch)
    victim = tmp_path / "victim.txt"
    victim.write_text("someone's data")
    out = tmp_path / "pulled"
    out.mkdir()
    for name in (".raysync-manifest.json.pulling", ".raysync-manifest.json.tmp"):
        (out / name).symlink_to(victim)
    assert cli(["pull", str(tmp_path / "runs" / "r"), str(out)]) == 0
    assert victim.read_text() == "someone's data"
    assert cli(["verify", str(out)]) == 0
    assert (out / "export" / "a.txt").read_text() == "a"


def test_item7_the_pulled_manifest_follows_the_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _one_local_run(tmp_path, monkeypatch)
    out = tmp_path / "pulled"
    old = os.umask(0o077)
    try:
        assert cli(["pull", str(tmp_path / "runs" / "r"), str(out)]) == 0
    finally:
        os.umask(old)
    manifest = out / "raysync-manifest.json"
    assert manifest.stat().st_mode & 0o777 == 0o600  # not readable by others under umask 077
    assert cli(["verify", str(out)]) == 0
