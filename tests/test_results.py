"""ExportResult.materialize and raysync.collect for the built-in backends."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import pytest
import ray

import raysync
from raysync import isolated_export
from raysync.errors import IntegrityError, MaterializeError, UnsafePathError
from raysync.manifest import FileEntry
from tests.conftest import files_under


def _writer(uri: str | None) -> ray.remote_function.RemoteFunction:
    @ray.remote(max_retries=0)
    @isolated_export(uri)
    def f(run_id: str, size: int) -> str:
        Path(f"export/{run_id}").mkdir()
        Path(f"export/{run_id}/result.json").write_text(f'{{"run": "{run_id}"}}')
        rng = hashlib.sha256(run_id.encode()).digest()
        Path(f"data/{run_id}.bin").write_bytes(rng * (size // 32))
        return run_id

    return f


def test_return_by_value_round_trips_a_large_binary_file_byte_for_byte(
    ray_wd: Path, tmp_path: Path
) -> None:
    r = ray.get(_writer(None).remote("big", 32 * 1024 * 1024))
    assert r.backend == "value" and r.uri.startswith("return://")
    assert r.stats.bytes == 32 * 1024 * 1024 + len('{"run": "big"}')
    out = r.materialize(tmp_path / "out")
    got = files_under(out)
    assert got["data/big.bin"] == hashlib.sha256(b"big").digest() * (1024 * 1024)
    assert got["export/big/result.json"] == b'{"run": "big"}'
    assert not list(out.glob(".raysync-staging-*"))


def test_collect_merges_many_results_and_refuses_conflicting_contents(
    ray_wd: Path, tmp_path: Path
) -> None:
    f = _writer(None)
    refs = [f.remote(f"r{i}", 1024) for i in range(4)]
    results = raysync.collect(refs, tmp_path / "all")
    assert [r.value for r in results] == ["r0", "r1", "r2", "r3"]
    got = files_under(tmp_path / "all")
    assert sorted(got) == sorted(
        [f"export/r{i}/result.json" for i in range(4)] + [f"data/r{i}.bin" for i in range(4)]
    )
    # The same files again are fine; other contents at the same path are refused.
    raysync.collect(results, tmp_path / "all")
    (tmp_path / "all" / "data" / "r0.bin").write_bytes(b"changed")
    with pytest.raises(MaterializeError, match="exists with other contents"):
        raysync.collect(results[:1], tmp_path / "all")
    raysync.collect(results[:1], tmp_path / "all", overwrite=True)
    assert files_under(tmp_path / "all")["data/r0.bin"] == got["data/r0.bin"]


def test_local_copy_results_materialize_elsewhere(ray_wd: Path, host: Path) -> None:
    r = ray.get(_writer("runs/{run_id}").remote("loc", 4096))
    out = r.materialize(host / "copy")
    assert files_under(out) == {
        k: v
        for k, v in files_under(host / "runs" / "loc").items()
        if k.startswith(("export", "data"))
    }


def test_materialize_refuses_paths_that_escape_dest_and_writes_nothing(
    ray_wd: Path, tmp_path: Path
) -> None:
    r = ray.get(_writer(None).remote("slip", 64))
    evil = dataclasses.replace(r.manifest.files[0], path="../escaped.json")
    r.manifest.files[0] = evil
    dest = tmp_path / "dest"
    with pytest.raises(UnsafePathError):
        r.materialize(dest)
    assert not (tmp_path / "escaped.json").exists()
    assert not dest.exists() or files_under(dest) == {}


def test_materialize_detects_a_payload_that_does_not_match_its_manifest(
    ray_wd: Path, tmp_path: Path
) -> None:
    r = ray.get(_writer(None).remote("tamper", 64))
    r.manifest.files[0] = FileEntry(
        r.manifest.files[0].path, r.manifest.files[0].size, 0o644, digest="0" * 32
    )
    with pytest.raises(IntegrityError, match=r.manifest.files[0].path):
        r.materialize(tmp_path / "dest")
    assert files_under(tmp_path / "dest") == {}


def test_direct_call_on_the_driver_also_runs_isolated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    @isolated_export("runs/direct")
    def f() -> str:
        Path("export/x").write_text("x")
        return os.getcwd()

    r = f()
    assert r.value != str(tmp_path)
    assert (tmp_path / "runs" / "direct" / "export" / "x").read_text() == "x"
