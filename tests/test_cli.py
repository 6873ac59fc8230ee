"""The raysync command, run as a user would: as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from raysync import isolated_export
from raysync.cli import main as cli
from raysync.manifest import MANIFEST_NAME


def _raysync(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "raysync", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_backends_lists_the_builtins_with_source_and_capabilities() -> None:
    proc = _raysync("backends", "--json")
    assert proc.returncode == 0
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["local"]["schemes"] == ["file"]
    assert "atomic_rename" in rows["local"]["capabilities"]
    assert rows["value"]["default"] is True and rows["value"]["source"] == "raysync"


def test_verify_passes_on_a_committed_run_and_names_a_tampered_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    @isolated_export("runs/one")
    def f() -> None:
        Path("export/a.txt").write_text("a")
        Path("data/b.txt").write_text("b")

    f()
    run = tmp_path / "runs" / "one"
    ok = _raysync("verify", str(run))
    assert ok.returncode == 0 and "2 files" in ok.stdout
    (run / "data" / "b.txt").write_text("B")
    bad = _raysync("verify", f"file://{run}")
    assert bad.returncode == 1 and "data/b.txt" in bad.stdout and "export/a.txt" not in bad.stdout
    missing = _raysync("verify", str(tmp_path / "nothing"))
    assert missing.returncode == 1 and "no committed run" in missing.stderr


def test_bench_subcommand_passes_its_options_on() -> None:
    proc = _raysync(
        "bench", "--backend", "rsync", "--tree", "small=5x4K", "--repeat", "1", "--json"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert list(report["backends"]) == ["rsync"]
    assert report["backends"]["rsync"]["shapes"]["small"]["files"] == 5


def test_ls_verify_and_pull_local_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    @isolated_export("runs/{name}")
    def ok(name: str) -> None:
        Path("export/a.txt").write_text(name)
        Path("data/b.bin").write_bytes(bytes(range(256)) * 40)

    @isolated_export("runs/{name}", export_on_failure=True)
    def broken(name: str) -> None:
        Path("export/partial.txt").write_text("half")
        raise ValueError("boom")

    ok(name="one")
    ok(name="two")
    with pytest.raises(ValueError):
        broken(name="bad")
    (tmp_path / "runs" / ".dead.raysync-staging-0123456789ab").mkdir()  # a dead export's

    listing = _raysync("ls", "runs", "--json")
    assert listing.returncode == 0, listing.stderr
    runs = {Path(r["uri"]).name: r for r in json.loads(listing.stdout)}
    assert {k: r["status"] for k, r in runs.items()} == {
        "one": "committed",
        "two": "committed",
        "bad": "failed",
        "dead": "incomplete",
    }
    assert runs["one"]["files"] == 2 and runs["one"]["bytes"] == 3 + 10240
    table = _raysync("ls", str(tmp_path / "runs"))
    assert table.returncode == 0 and "committed" in table.stdout and "incomplete" in table.stdout

    pulled = _raysync("pull", "runs/one", "out", "--json")
    assert pulled.returncode == 0, pulled.stderr
    assert json.loads(pulled.stdout)["files"] == 2
    assert (tmp_path / "out" / "data" / "b.bin").read_bytes() == bytes(range(256)) * 40
    assert _raysync("verify", "out").returncode == 0  # the pulled run verifies in place
    clash = _raysync("pull", "runs/two", "out")  # out holds run one (and its manifest)
    assert clash.returncode == 2 and "another run's manifest" in clash.stderr
    assert "--overwrite" in clash.stderr and "Traceback" not in clash.stderr
    (tmp_path / "out" / MANIFEST_NAME).unlink()
    clash = _raysync("pull", "runs/two", "out")  # out/export/a.txt holds "one"
    assert clash.returncode == 2 and "exists with other contents" in clash.stderr
    assert "--overwrite" in clash.stderr and "overwrite=True" not in clash.stderr

    (tmp_path / "runs" / "two" / "export" / "a.txt").write_text("TWO")  # tampered
    bad = _raysync("verify", "runs/two", "--json")
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["bad"] == ["export/a.txt"]
    refused = _raysync("pull", "runs/two", "fresh")
    assert refused.returncode == 1 and "export/a.txt" in refused.stdout
    assert not (tmp_path / "fresh" / "export").exists()  # all or nothing


def test_ls_verify_and_pull_s3_runs(tmp_path: Path, moto_endpoint: str, bucket: str) -> None:
    import boto3

    from tests.conftest import s3_options

    options = s3_options(moto_endpoint)

    @isolated_export(f"s3://{bucket}/cli/{{name}}", storage_options=options)
    def run(name: str) -> None:
        Path("export/model.bin").write_bytes(name.encode() * 1000)
        Path("artifacts/log.txt").write_text(f"log of {name}")

    run(name="r1")
    run(name="r2")
    client = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        region_name="us-east-1",
        aws_access_key_id="k",
        aws_secret_access_key="s",  # the local moto server
    )
    # What a dead export leaves: data and a lock, no manifest.
    client.put_object(Bucket=bucket, Key="cli/r3/.raysync-lock", Body=b"{}")
    client.put_object(Bucket=bucket, Key="cli/r3/export/x", Body=b"x")
    so = ["--storage-options", json.dumps(options)]

    listing = _raysync("ls", f"s3://{bucket}/cli", *so, "--json")
    assert listing.returncode == 0, listing.stderr
    status = {r["uri"]: r["status"] for r in json.loads(listing.stdout)}
    assert status == {
        f"s3://{bucket}/cli/r1": "committed",
        f"s3://{bucket}/cli/r2": "committed",
        f"s3://{bucket}/cli/r3": "incomplete",
    }
    assert _raysync("verify", f"s3://{bucket}/cli/r1", *so).returncode == 0
    pulled = _raysync("pull", f"s3://{bucket}/cli/r1", str(tmp_path / "r1"), *so)
    assert pulled.returncode == 0, pulled.stderr
    assert (tmp_path / "r1" / "export" / "model.bin").read_bytes() == b"r1" * 1000

    client.put_object(Bucket=bucket, Key="cli/r2/artifacts/log.txt", Body=b"forged")
    bad = _raysync("verify", f"s3://{bucket}/cli/r2", *so)
    assert bad.returncode == 1 and "artifacts/log.txt" in bad.stdout
    none = _raysync("verify", f"s3://{bucket}/cli/r3", *so)
    assert none.returncode == 1 and "no committed run" in none.stderr
    unknown = _raysync("ls", "nosuchscheme://x")
    assert unknown.returncode == 2 and "no backend for scheme" in unknown.stderr


def test_docs_cli_documents_every_command_and_the_exit_codes() -> None:
    import re

    from raysync import cli

    parser_commands = set(cli.command.commands)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    documented = set(re.findall(r"^## `raysync (\w+)", doc, re.M))
    assert parser_commands >= {"backends", "ls", "verify", "pull", "doctor", "bench", "demo"}
    assert parser_commands == documented
    table = doc.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    assert all(f"| {code} |" in table for code in (0, 1, 2, 3, 4))


def test_a_return_by_value_run_materialized_with_its_manifest_verifies_and_lists(
    tmp_path: Path,
) -> None:
    @isolated_export(None)
    def f() -> None:
        Path("export/a.txt").write_text("by value")
        Path("artifacts/b.bin").write_bytes(b"\x00\x01" * 5000)

    r = f()
    out = r.materialize(tmp_path / "home", with_manifest=True)
    ok = _raysync("verify", str(out))
    assert ok.returncode == 0 and "2 files" in ok.stdout
    listing = _raysync("ls", str(tmp_path), "--json")
    assert [(x["status"], x["files"]) for x in json.loads(listing.stdout)] == [("committed", 2)]
    (out / "artifacts" / "b.bin").write_bytes(b"changed")
    bad = _raysync("verify", str(out))
    assert bad.returncode == 1 and "artifacts/b.bin" in bad.stdout


@pytest.mark.parametrize("command", [["ls", "x"], ["verify", "x"], ["pull", "x", "d"], ["doctor"]])
@pytest.mark.parametrize("bad", ["[1]", "{x", '"s3"'])
def test_storage_options_that_are_not_a_json_object_are_a_usage_error(
    command: list[str], bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli([*command, "--storage-options", bad]) == 2  # returned, not a SystemExit
    assert "--storage-options" in capsys.readouterr().err


def _damaged_runs(root: Path) -> None:
    """runs/good (a committed run), runs/nochecksum and runs/future (manifests raysync cannot
    read: no checksum; a version from the future)."""
    from raysync.exporting import export_once, prepare
    from raysync.registry import get_registry
    from raysync.rules import run_record
    from raysync.target import Target

    work = root / "work"
    (work / "export").mkdir(parents=True)
    (work / "export" / "a.txt").write_text("a")
    backend = get_registry().for_scheme("file")
    for name in ("good", "nochecksum", "future"):
        target = Target(str(root / "runs" / name), "file", {})
        export_once(
            backend,
            target,
            work,
            run_record("cli.table", name),
            trees=["export"],
            conflict="error",
            prepared=prepare(backend, Target(str(root / "runs" / "{x}"), "file", {})),
        )
    doc = json.loads((root / "runs" / "nochecksum" / MANIFEST_NAME).read_text())
    del doc["checksum"]
    (root / "runs" / "nochecksum" / MANIFEST_NAME).write_text(json.dumps(doc))
    doc["version"] = 99
    (root / "runs" / "future" / MANIFEST_NAME).write_text(json.dumps(doc))


#: (arguments, exit code, what stdout or stderr must say, JSON on stdout)
TABLE: list[tuple[list[str], int, str, bool]] = [
    (["--version"], 0, "raysync 0.", False),
    (["--help"], 0, "Exit codes", False),
    (["backends", "--help"], 0, "--json", False),
    (["ls", "--help"], 0, "--storage-options", False),
    (["verify", "--help"], 0, "URI", False),
    (["pull", "--help"], 0, "--overwrite", False),
    (["doctor", "--help"], 0, "--working-dir", False),
    (["bench", "--help"], 0, "--s3-server", False),  # the bench's own help, not a stub
    (["demo", "--help"], 0, "--runs", False),
    (["frobnicate"], 2, "No such command", False),
    (["pull", "runs/good"], 2, "Missing argument", False),
    (["ls", "runs", "--storage-options", "[1]"], 2, "JSON object", False),
    (["ls", "runs", "--frobnicate"], 2, "No such option", False),
    (["ls", "s3:/bucket/x"], 2, "s3://", False),
    (["ls", "simplecache::s3://bucket/x"], 2, "chained", False),
    (["ls", "nonexistent"], 3, "no such directory", False),
    (["ls", "nonexistent", "--json"], 3, '"exit": 3', True),
    (["verify", "ftp://127.0.0.1:9/y"], 3, "Connection refused", False),
    (["verify", "ftp://127.0.0.1:9/y", "--json"], 3, "Connection refused", True),
    (["ls", "ftp://127.0.0.1:9/x", "--json"], 3, '"ok": false', True),
    (["ls", "runs"], 0, "damaged", False),  # the good run listed, the others marked
    (["ls", "runs", "--json"], 0, '"damaged"', True),
    (["verify", "runs/good"], 0, "OK", False),
    (["verify", "runs/nochecksum"], 1, "checksum", False),
    (["verify", "runs/future", "--json"], 1, "upgrade raysync", True),
    (["verify", "memory://nothing", "--json"], 1, "no committed run", True),
    (["pull", "runs/nochecksum", "out"], 1, "checksum", False),
    (["backends", "--json"], 0, '"name"', True),
]


@pytest.mark.parametrize(("argv", "code", "says", "as_json"), TABLE)
def test_every_invocation_exits_as_documented_without_a_traceback(
    argv: list[str], code: int, says: str, as_json: bool, tmp_path: Path
) -> None:
    _damaged_runs(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "raysync", *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == code, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert says in proc.stdout + proc.stderr
    if as_json:
        json.loads(proc.stdout)
    if argv == ["ls", "runs"]:
        rows = proc.stdout.splitlines()
        assert any(r.startswith("committed") and r.endswith("runs/good") for r in rows)
        assert sum(r.startswith("damaged") for r in rows) == 2


def test_a_closed_pipe_ends_the_command_quietly(tmp_path: Path) -> None:
    """`raysync ls ... | head`: the listing (far more than a pipe's 64 KiB buffer) stops
    when head exits, without a BrokenPipeError traceback."""
    _damaged_runs(tmp_path)
    good = (tmp_path / "runs" / "good" / MANIFEST_NAME).read_bytes()
    for i in range(2_000):
        (tmp_path / "many" / f"run-{i:05d}").mkdir(parents=True)
        (tmp_path / "many" / f"run-{i:05d}" / MANIFEST_NAME).write_bytes(good)
    proc = subprocess.run(  # noqa: S602 - a fixed command line: the pipe is the point
        f"{sys.executable} -m raysync ls many | head -n 2",
        shell=True,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert len(proc.stdout.splitlines()) == 2 and "run-00000" in proc.stdout
    assert proc.stderr == ""


def test_shell_completion_completes_commands_and_options(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "_RAYSYNC_COMPLETE": "bash_complete", "COMP_CWORD": "1"}
    commands = subprocess.run(
        [sys.executable, "-m", "raysync"],
        env={**env, "COMP_WORDS": "raysync ve"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert commands.returncode == 0 and "plain,verify" in commands.stdout.splitlines()
    options = subprocess.run(
        [sys.executable, "-m", "raysync"],
        env={**env, "COMP_WORDS": "raysync pull --ov", "COMP_CWORD": "2"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "plain,--overwrite" in options.stdout.splitlines()


def test_pull_shows_a_progress_bar_on_a_terminal_and_nothing_in_a_log(tmp_path: Path) -> None:
    import os
    import pty
    import select
    import time

    _damaged_runs(tmp_path)
    logged = subprocess.run(
        [sys.executable, "-m", "raysync", "pull", "runs/good", "logged"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert logged.returncode == 0 and "pulling" not in logged.stderr
    leader, follower = pty.openpty()
    try:
        shown = subprocess.run(
            [sys.executable, "-m", "raysync", "pull", "runs/good", "shown"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=follower,
            timeout=120,
            check=False,
        )
        os.close(follower)
        follower = -1
        seen = b""
        deadline = time.monotonic() + 30  # bounded: the pull has exited already
        while time.monotonic() < deadline:
            if not select.select([leader], [], [], 1.0)[0]:
                break
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal's other end is closed: all read
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)
    assert shown.returncode == 0
    assert b"pulling [" in seen and b"MB/s" in seen and b"100.0%" in seen
