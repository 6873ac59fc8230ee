"""The raysync command, run as a user would: as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from raysync import isolated_export


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
        "bench", "--backend", "rsync", "--shape", "small", "--files", "5", "--repeat", "1", "--json"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert list(report["backends"]) == ["rsync"]
    assert report["backends"]["rsync"]["shapes"]["small"]["files"] == 5
