"""Scanning trees, manifest JSON, path safety and verification (no Ray needed)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from raysync.copy import copy_and_hash, hash_file
from raysync.errors import IntegrityError, TreeError, UnsafePathError
from raysync.manifest import Manifest, check_relpath, safe_join, scan, verify_files


def _ws(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    (ws / "export" / "a").mkdir(parents=True)
    (ws / "export" / "a" / "one.txt").write_text("one")
    (ws / "data").mkdir()
    (ws / "data" / "two.bin").write_bytes(b"\x00" * 10)
    os.chmod(ws / "data" / "two.bin", 0o600)
    return ws


def test_scan_lists_files_of_each_tree_with_posix_paths_sizes_and_modes(tmp_path: Path) -> None:
    ws = _ws(tmp_path)
    entries = scan(ws, ["export", "data", "artifacts"])  # a missing tree is empty
    assert [(e.path, e.size, e.mode) for e in entries] == [
        ("export/a/one.txt", 3, stat.S_IMODE((ws / "export/a/one.txt").stat().st_mode)),
        ("data/two.bin", 10, 0o600),
    ]


def test_symlink_inside_the_workspace_is_exported_as_its_target(tmp_path: Path) -> None:
    ws = _ws(tmp_path)
    (ws / "export" / "link.txt").symlink_to(ws / "export" / "a" / "one.txt")
    entries = {e.path: e for e in scan(ws, ["export"])}
    assert entries["export/link.txt"].size == 3


@pytest.mark.parametrize("kind", ["outside", "dangling", "loop", "dir"])
def test_unsafe_symlinks_are_refused(tmp_path: Path, kind: str) -> None:
    ws = _ws(tmp_path)
    link = ws / "export" / "bad"
    if kind == "outside":
        (tmp_path / "secret").write_text("s")
        link.symlink_to(tmp_path / "secret")
    elif kind == "dangling":
        link.symlink_to(ws / "nowhere")
    elif kind == "loop":
        link.symlink_to(link)
    else:
        link.symlink_to(ws / "data")
    with pytest.raises(UnsafePathError, match="export/bad"):
        scan(ws, ["export"])


def test_fifo_in_a_tree_is_refused(tmp_path: Path) -> None:
    ws = _ws(tmp_path)
    os.mkfifo(ws / "data" / "pipe")
    with pytest.raises(TreeError, match="not a regular file"):
        scan(ws, ["data"])


@pytest.mark.parametrize(
    "path", ["../x", "/etc/passwd", "a/../../x", "", "a//b", "./a", "a\\..\\b", "a/\x00"]
)
def test_unsafe_relative_paths_are_refused(path: str, tmp_path: Path) -> None:
    with pytest.raises(UnsafePathError):
        check_relpath(path)
    with pytest.raises(UnsafePathError):
        safe_join(tmp_path, path)


def test_manifest_round_trips_and_verifies_and_detects_tampering(tmp_path: Path) -> None:
    ws = _ws(tmp_path)
    dest = tmp_path / "dest"
    entries = scan(ws, ["export", "data"])
    for e in entries:
        out = safe_join(dest, e.path)
        out.parent.mkdir(parents=True, exist_ok=True)
        copy_and_hash(e, out)
    m = Manifest(files=entries, run={"status": "succeeded"}, trees=["export", "data"])
    doc = json.loads(m.to_bytes())
    assert doc["format"] == "raysync.manifest" and doc["version"] == 2
    assert doc["checksum"] == "xxh3-128"
    assert doc["totals"] == {"files": 2, "bytes": 13}
    assert doc["files"][0]["digest"] == hash_file(ws / "export" / "a" / "one.txt")
    back = Manifest.from_bytes(m.to_bytes())
    verify_files(back, dest, uri="x")
    assert os.stat(dest / "data" / "two.bin").st_mode & 0o777 == 0o600
    (dest / "data" / "two.bin").write_bytes(b"\x01" * 10)
    with pytest.raises(IntegrityError, match=r"data/two\.bin"):
        verify_files(back, dest, uri="x")


def test_manifest_with_an_escaping_path_is_refused_on_read() -> None:
    doc = {
        "format": "raysync.manifest",
        "version": 1,
        "run": {},
        "trees": ["export"],
        "files": [{"path": "../../evil", "size": 1, "mode": 420, "sha256": "0" * 64}],
    }
    with pytest.raises(UnsafePathError):
        Manifest.from_bytes(json.dumps(doc).encode())


def test_manifest_of_an_unknown_version_is_refused_with_a_hint() -> None:
    doc = {"format": "raysync.manifest", "version": 99, "run": {}, "trees": [], "files": []}
    with pytest.raises(IntegrityError, match="upgrade raysync"):
        Manifest.from_bytes(json.dumps(doc).encode())


def test_a_file_that_grows_while_copied_is_detected(tmp_path: Path) -> None:
    ws = _ws(tmp_path)
    entries = scan(ws, ["export"])
    (ws / "export" / "a" / "one.txt").write_text("one and more")
    with pytest.raises(TreeError, match="changed size while it was exported"):
        copy_and_hash(entries[0], tmp_path / "copy")


def test_a_manifest_in_an_older_layout_is_the_same_document() -> None:
    """Older raysync wrote the manifest indented; `pull` and `materialize` compare what a
    manifest says, so the same run pulled again after an upgrade is not 'another run'."""
    from raysync.manifest import FileEntry, same_document

    m = Manifest(
        files=[FileEntry("export/a", 3, 0o644, "ab" * 16)],
        run={"function": "m.f", "status": "succeeded"},
        trees=["export"],
    )
    older = json.dumps(m.to_json(), indent=1, sort_keys=True).encode()
    assert older != m.to_bytes() and same_document(older, m)
    other = Manifest(files=[FileEntry("export/a", 3, 0o644, "cd" * 16)], run=m.run, trees=m.trees)
    assert not same_document(other.to_bytes(), m)
    assert not same_document(b"not json", m)


def test_a_manifest_subclass_pickles_as_itself() -> None:
    import pickle

    import ray.cloudpickle

    from raysync.manifest import FileEntry

    class Mine(Manifest):
        pass

    m = Mine(files=[FileEntry("export/a", 1, 0o644, "ab")], run={}, trees=["export"])
    back = pickle.loads(ray.cloudpickle.dumps(m))  # noqa: S301 - bytes this test made
    assert type(back) is Mine and back == m
