"""The shared copy engine and the manifest's checksum choice (real files, no Ray)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
import xxhash

from raysync import checksum
from raysync.copy import LARGE, copy_files
from raysync.errors import ConfigError, IntegrityError, TreeError
from raysync.fsops import fs_type
from raysync.manifest import FileEntry, Manifest, safe_join, scan, verify_files

EXPECTED = {
    "xxh3-128": lambda d: xxhash.xxh3_128(d).hexdigest(),
    "blake3": lambda d: blake3.blake3(d).hexdigest(),
    "sha256": lambda d: hashlib.sha256(d).hexdigest(),
}


def _tree(ws: Path, small: int = 300) -> dict[str, bytes]:
    """Many small files in nested dirs, two multi-chunk files, an empty one, odd modes."""
    files: dict[str, bytes] = {}
    for i in range(small):
        files[f"export/d{i % 7}/e{i % 3}/f{i}.txt"] = os.urandom(i % 50 * 97)
    files["data/big-a.bin"] = os.urandom(LARGE * 2 + 12345)
    files["data/big-b.bin"] = os.urandom(LARGE + 1)
    files["data/empty"] = b""
    for rel, data in files.items():
        p = ws / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    os.chmod(ws / "export/d0/e0/f0.txt", 0o664)  # bits the umask would strip
    os.chmod(ws / "data/big-b.bin", 0o600)
    return files


def _copy(ws: Path, dest: Path, algorithm: str, **kw: object) -> list[FileEntry]:
    entries = scan(ws, ["export", "data"])
    jobs = []
    for e in entries:
        out = safe_join(dest, e.path)
        out.parent.mkdir(parents=True, exist_ok=True)
        jobs.append((e, out))
    copy_files(jobs, algorithm, dest_fs=dest, **kw)  # type: ignore[arg-type]
    return entries


@pytest.mark.parametrize("algorithm", checksum.ALGORITHMS)
@pytest.mark.parametrize("where", ["disk", "tmpfs"])
def test_copy_files_is_byte_for_byte_with_modes_and_one_pass_digests(
    tmp_path: Path, algorithm: str, where: str
) -> None:
    ws = tmp_path / "ws"
    files = _tree(ws)
    if where == "tmpfs":
        if not Path("/dev/shm").is_dir() or fs_type(Path("/dev/shm")) != "tmpfs":
            pytest.skip("no tmpfs at /dev/shm")
        dest = Path("/dev/shm") / f"raysync-test-{os.getpid()}-{algorithm}"
    else:
        dest = tmp_path / "dest"
        assert fs_type(dest.parent) not in ("tmpfs", "")
    try:
        entries = _copy(ws, dest, algorithm)
        got = {
            p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()
        }
        assert got == files
        assert {e.path: e.digest for e in entries} == {
            p: EXPECTED[algorithm](d) for p, d in files.items()
        }
        assert (dest / "export/d0/e0/f0.txt").stat().st_mode & 0o777 == 0o664
        assert (dest / "data/big-b.bin").stat().st_mode & 0o777 == 0o600
        manifest = Manifest(files=entries, run={}, trees=["export", "data"], checksum=algorithm)
        verify_files(Manifest.from_bytes(manifest.to_bytes()), dest, uri="x")
    finally:
        subprocess.run(["rm", "-rf", str(dest)], check=True)


def test_a_file_that_changed_size_fails_the_copy_after_every_thread_stopped(
    tmp_path: Path,
) -> None:
    ws = tmp_path / "ws"
    _tree(ws)
    entries = scan(ws, ["export", "data"])
    (ws / "data/big-a.bin").write_bytes(b"shorter")
    jobs = []
    for e in entries:
        out = safe_join(tmp_path / "dest", e.path)
        out.parent.mkdir(parents=True, exist_ok=True)
        jobs.append((e, out))
    with pytest.raises(TreeError, match=r"data/big-a\.bin.*changed size"):
        copy_files(jobs, checksum.DEFAULT)


def test_a_version_1_manifest_with_sha256_digests_still_reads_and_verifies(
    tmp_path: Path,
) -> None:
    (tmp_path / "export").mkdir()
    (tmp_path / "export/a.txt").write_bytes(b"written by raysync 0.1")
    doc = {
        "format": "raysync.manifest",
        "version": 1,
        "run": {"status": "succeeded"},
        "trees": ["export"],
        "totals": {"files": 1, "bytes": 22},
        "files": [
            {
                "path": "export/a.txt",
                "size": 22,
                "mode": 0o644,
                "sha256": hashlib.sha256(b"written by raysync 0.1").hexdigest(),
            }
        ],
    }
    m = Manifest.from_bytes(json.dumps(doc).encode())
    assert m.checksum == "sha256"
    verify_files(m, tmp_path, uri="x")
    (tmp_path / "export/a.txt").write_bytes(b"written by raysync 0.X")
    with pytest.raises(IntegrityError, match=r"export/a\.txt"):
        verify_files(m, tmp_path, uri="x")


def test_an_unknown_checksum_is_a_config_error_naming_the_choices() -> None:
    with pytest.raises(ConfigError, match="xxh3-128, blake3, sha256") as e:
        checksum.check("md5")
    assert "docs/manifest.md" in (e.value.hint or "")
    with pytest.raises(ConfigError, match="upgrade raysync"):
        checksum.new("xxh4-256")


@pytest.fixture
def btrfs(tmp_path: Path) -> Iterator[Path]:
    """A real btrfs file system on a loop device (it can clone files), unmounted after."""
    mkfs = shutil.which("mkfs.btrfs")
    if mkfs is None or os.geteuid() != 0:
        pytest.skip("needs mkfs.btrfs (apt-get install btrfs-progs) and root to mount")
    image, mnt = tmp_path / "btrfs.img", tmp_path / "btrfs"
    with open(image, "wb") as f:
        f.truncate(400 * 1024 * 1024)
    subprocess.run([mkfs, "-q", str(image)], check=True, capture_output=True, timeout=60)
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-o", "loop", str(image), str(mnt)], capture_output=True, text=True, timeout=60
    )
    if mounted.returncode != 0:
        pytest.skip(f"this machine cannot mount a loop device: {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=60)


def _used(path: Path) -> int:
    os.sync()
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_on_a_file_system_with_reflinks_large_files_are_cloned_not_copied(btrfs: Path) -> None:
    ws = btrfs / "ws"
    big = os.urandom(64 * 1024 * 1024)
    (ws / "data").mkdir(parents=True)
    (ws / "data/model.bin").write_bytes(big)
    (ws / "data/small.txt").write_bytes(b"small files are copied")
    before = _used(btrfs)
    entries = _copy(ws, btrfs / "dest", checksum.DEFAULT)
    grew = _used(btrfs) - before
    assert grew < 8 * 1024 * 1024, f"the copy took {grew:,} bytes: not a clone"
    assert (btrfs / "dest/data/model.bin").read_bytes() == big
    assert {e.path: e.digest for e in entries}["data/model.bin"] == EXPECTED["xxh3-128"](big)
    verify_files(Manifest(files=entries, run={}, trees=["data"]), btrfs / "dest", uri="x")
