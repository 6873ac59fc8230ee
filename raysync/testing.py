"""The backend conformance suite: the guarantees every raysync backend keeps, as pytest tests.

Subclass :class:`BackendConformance` in your backend's tests, name the backend and give the
``conformance_target`` fixture; pytest then runs every ``test_*`` below against it::

    import pytest
    from raysync.testing import BackendConformance, ConformanceTarget

    class TestMyBackend(BackendConformance):
        backend_name = "mine"

        @pytest.fixture
        def conformance_target(self, tmp_path):
            return ConformanceTarget(uri=f"mine://{tmp_path}/runs/{{run}}")

The tests drive the backend through its hooks (``check``, ``prepare``, ``export``,
``materialize``) exactly as the core does, without Ray, so they run in milliseconds per
backend (a backend that needs Ray itself, such as host-sync, starts it in its fixture).
What they check: a round trip is byte for byte with every checksum recorded; a failed export
commits nothing; paths that would escape the destination are refused; the conflict policy
(``error``, a retry of the same task replaces, ``overwrite``); unknown options fail in
``check``; ``materialize`` never silently overwrites different files.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from raysync import checksum
from raysync.errors import ConfigError, MaterializeError, RaySyncError, RunExistsError
from raysync.exporting import export_once, prepare
from raysync.hookspecs import (
    CleansLeftovers,
    DeletesRuns,
    ExportBackend,
    OpensRuns,
    ResumesRuns,
)
from raysync.manifest import FileEntry, scan
from raysync.registry import get_registry
from raysync.result import ExportResult, ExportStats
from raysync.rules import claim_record, run_record
from raysync.target import Target, split_scheme

__all__ = ["BackendConformance", "ConformanceTarget"]


@dataclass
class ConformanceTarget:
    """Where the suite exports to.

    ``uri`` is an output_uri template with a ``{run}`` field (each test uses fresh runs);
    ``base_dir`` plays the driver's cwd for relative paths; ``has_destination`` is False for
    backends that return files in the result (no destination, so no conflicts to check).
    """

    uri: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    base_dir: Path | None = None
    has_destination: bool = True
    #: A storage option ``check`` must refuse (backends that pass options through to a
    #: library may name one of their own, e.g. fsspec's ``upload_*`` namespace).
    bad_option: Mapping[str, Any] = field(default_factory=lambda: {"no_such_option_xyz": 1})


def _files() -> dict[str, bytes]:
    blob = hashlib.sha256(b"raysync").digest()
    return {
        "export/a.txt": b"alpha\n",
        "export/nested/deeper/b.bin": blob * 70_000,  # 2.2 MB: more than one chunk anywhere
        "export/with space.txt": b"spaces are fine",
        "data/empty.txt": b"",
        "artifacts/model.json": b'{"loss": 0.12}',
    }


class BackendConformance:
    """Every backend passes these; subclass with ``backend_name`` and ``conformance_target``."""

    #: The registered name of the backend under test.
    backend_name: str = ""

    @pytest.fixture
    def conformance_target(self, tmp_path: Path) -> ConformanceTarget:
        raise NotImplementedError("override the conformance_target fixture in your subclass")

    # -- helpers -----------------------------------------------------------------------------
    def backend(self) -> ExportBackend:
        return get_registry().by_name(self.backend_name)

    def target(self, ct: ConformanceTarget, run: str | None = None) -> Target:
        uri = ct.uri if run is None else ct.uri.replace("{run}", run)
        return Target(uri, split_scheme(uri)[0], dict(ct.storage_options), _str(ct.base_dir))

    def workspace(self, root: Path, files: Mapping[str, bytes]) -> Path:
        ws = root / f"ws-{uuid.uuid4().hex[:8]}"
        for rel, data in files.items():
            (ws / rel).parent.mkdir(parents=True, exist_ok=True)
            (ws / rel).write_bytes(data)
        for tree in ("export", "data", "artifacts"):
            (ws / tree).mkdir(parents=True, exist_ok=True)
        return ws

    def export(
        self,
        ct: ConformanceTarget,
        ws: Path,
        run: str,
        *,
        task_id: str = "task-1",
        conflict: str = "error",
        files: list[FileEntry] | None = None,
        algorithm: str = checksum.DEFAULT,
        extra: Mapping[str, Any] | None = None,
    ) -> ExportResult[Any]:
        """What the core does for one call: prepare (driver), export (worker)."""
        backend = self.backend()
        entries, manifest, outcome = export_once(
            backend,
            self.target(ct, run),
            ws,
            {**conformance_run(task_id), **(extra or {})},
            trees=["export", "data", "artifacts"],
            conflict=conflict,
            prepared=prepare(backend, self.target(ct)),
            files=files,
            checksum=algorithm,
        )
        return ExportResult(
            value=None,
            uri=outcome.uri,
            backend=backend.name,
            manifest=manifest,
            stats=ExportStats(len(entries), manifest.total_bytes, 0.0, 0.0),
            payload=outcome.payload,
            _backend_obj=backend,
        )

    def run_id(self) -> str:
        return f"conf-{uuid.uuid4().hex[:10]}"

    # -- the guarantees ----------------------------------------------------------------------
    @pytest.mark.parametrize("algorithm", checksum.ALGORITHMS)
    def test_round_trip_is_byte_for_byte_with_every_checksum_recorded(
        self, conformance_target: ConformanceTarget, tmp_path: Path, algorithm: str
    ) -> None:
        """With each checksum the user may choose: the backend hashes with
        ``request.checksum`` (``request.new_hash()``), not a fixed algorithm."""
        files = _files()
        ws = self.workspace(tmp_path, files)
        result = self.export(conformance_target, ws, self.run_id(), algorithm=algorithm)
        recorded = {f.path: f.digest for f in result.manifest.files}
        assert recorded == {p: checksum.of_bytes(d, algorithm) for p, d in files.items()}
        out = result.materialize(tmp_path / "back")
        got = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert got == files

    def test_materialize_never_silently_overwrites_different_files(
        self, conformance_target: ConformanceTarget, tmp_path: Path
    ) -> None:
        result = self.export(conformance_target, self.workspace(tmp_path, _files()), self.run_id())
        dest = tmp_path / "back"
        (dest / "export").mkdir(parents=True)
        (dest / "export" / "a.txt").write_bytes(b"the user's own file")
        with pytest.raises(MaterializeError):
            result.materialize(dest)
        assert (dest / "export" / "a.txt").read_bytes() == b"the user's own file"
        result.materialize(dest, overwrite=True)
        assert (dest / "export" / "a.txt").read_bytes() == b"alpha\n"

    def test_a_failed_export_commits_nothing_and_keeps_the_files(
        self, conformance_target: ConformanceTarget, tmp_path: Path
    ) -> None:
        ws = self.workspace(tmp_path, _files())
        entries = scan(ws, ["export", "data", "artifacts"])
        with (ws / "export" / "a.txt").open("ab") as f:  # grows after the scan
            f.write(b"more")
        run = self.run_id()
        with pytest.raises(RaySyncError):
            self.export(conformance_target, ws, run, files=entries)
        assert (ws / "export" / "a.txt").read_bytes() == b"alpha\nmore"  # the files are kept
        if conformance_target.has_destination:
            # Nothing was committed: another call can still take the run.
            self.export(conformance_target, ws, run, task_id="task-2")

    def test_paths_that_would_escape_the_destination_are_refused(
        self, conformance_target: ConformanceTarget, tmp_path: Path
    ) -> None:
        ws = self.workspace(tmp_path, {"export/ok.txt": b"ok"})
        evil = ws / "evil.txt"
        evil.write_bytes(b"evil")
        entries = [
            *scan(ws, ["export"]),
            FileEntry(path="../escape.txt", size=4, mode=0o644, source=evil),
        ]
        dest = tmp_path / "back" / "inner"
        try:
            result = self.export(conformance_target, ws, self.run_id(), files=entries)
        except RaySyncError:
            return  # refused at export: the right answer
        with pytest.raises(RaySyncError):
            result.materialize(dest)  # ...or at the latest when files are placed
        assert not (tmp_path / "back" / "escape.txt").exists()

    def test_conflict_policy(self, conformance_target: ConformanceTarget, tmp_path: Path) -> None:
        if not conformance_target.has_destination:
            pytest.skip("no destination: each result carries its own files")
        run = self.run_id()
        self.export(conformance_target, self.workspace(tmp_path, {"export/v.txt": b"1"}), run)
        second = self.workspace(tmp_path, {"export/v.txt": b"2"})
        with pytest.raises(RunExistsError):
            self.export(conformance_target, second, run, task_id="task-2")
        # A retry of the same task replaces its earlier attempt's run.
        retry = self.export(conformance_target, second, run, task_id="task-1")
        assert self._read(retry, tmp_path, "export/v.txt") == b"2"
        # conflict="overwrite" replaces another call's run.
        third = self.workspace(tmp_path, {"export/v.txt": b"3", "export/w.txt": b"w"})
        over = self.export(conformance_target, third, run, task_id="task-3", conflict="overwrite")
        assert self._read(over, tmp_path, "export/v.txt") == b"3"

    def test_a_checkpoint_is_read_back_for_resume_and_replaced_only_by_its_continuation(
        self, conformance_target: ConformanceTarget, tmp_path: Path
    ) -> None:
        """``resume=True``: the backend's ``resume_reader`` reads a checkpoint back byte for
        byte, and the checkpoint is replaced by the call that resumed it (its manifest names
        it in ``resumed_from``), never by another call."""
        backend = self.backend()
        if not conformance_target.has_destination or not isinstance(backend, ResumesRuns):
            pytest.skip("the backend has no resume_reader hook")
        ct, run = conformance_target, self.run_id()
        files = {"export/a.txt": b"step 1", "data/b.bin": b"x" * 100_000}
        checkpoint = {"status": "running", "checkpoint": 1}
        self.export(ct, self.workspace(tmp_path, files), run, extra=checkpoint)
        prepared = prepare(backend, self.target(ct))
        reader = backend.resume_reader(self.target(ct, run), prepared)
        try:
            found = reader.manifest()
            assert found is not None and found.status == "running"
            reader.prefetch(found.files)
            got = {f.path: b"".join(reader.read(f)) for f in found.files}
        finally:
            reader.close()
        assert got == files
        more = self.workspace(tmp_path, {**files, "export/c.txt": b"step 2"})
        with pytest.raises(RunExistsError):
            self.export(ct, more, run, task_id="task-2")
        resumed = {"resumed_from": {**claim_record(conformance_run("task-1")), "checkpoint": 1}}
        carried = self.export(ct, more, run, task_id="task-2", extra=resumed)
        assert self._read(carried, tmp_path, "export/c.txt") == b"step 2"
        empty = backend.resume_reader(self.target(ct, self.run_id()), prepared)
        try:
            assert empty.manifest() is None
        finally:
            empty.close()

    def test_delete_run_removes_the_whole_run_and_nothing_else(
        self, conformance_target: ConformanceTarget, tmp_path: Path
    ) -> None:
        """``delete_run`` (``raysync rm``, ``gc``, ``keep_last``): the run is gone, its
        neighbour stays, and a second delete (no run there) is an error, not a no-op."""
        backend = self.backend()
        if not conformance_target.has_destination or not isinstance(backend, DeletesRuns):
            pytest.skip("the backend has no delete_run hook")
        ct, run, other = conformance_target, self.run_id(), self.run_id()
        result = self.export(ct, self.workspace(tmp_path, _files()), run)
        kept = self.export(ct, self.workspace(tmp_path, {"export/k.txt": b"k"}), other)
        try:
            freed = backend.delete_run(self.target(ct, run))
        except ConfigError as e:
            pytest.skip(f"this kind of destination cannot delete runs: {e}")
        assert isinstance(freed, int) and freed > 0  # what the store frees (an archive: less)
        del result
        if isinstance(backend, OpensRuns):
            reader = backend.open_run(self.target(ct, run))
            try:
                assert reader.manifest() is None
            finally:
                reader.close()
        with pytest.raises(RaySyncError):
            backend.delete_run(self.target(ct, run))
        assert self._read(kept, tmp_path, "export/k.txt") == b"k"
        # The deleted run's URI is free again for any call.
        self.export(ct, self.workspace(tmp_path, {"export/v.txt": b"2"}), run, task_id="task-9")

    def test_a_committed_run_is_never_a_leftover(
        self, conformance_target: ConformanceTarget, tmp_path: Path
    ) -> None:
        """``list_leftovers`` (``raysync gc``) lists what dead exports left, never a run."""
        backend = self.backend()
        if not conformance_target.has_destination or not isinstance(backend, CleansLeftovers):
            pytest.skip("the backend has no list_leftovers hook")
        ct, run = conformance_target, self.run_id()
        self.export(ct, self.workspace(tmp_path, {"export/a.txt": b"a"}), run)
        rendered = self.target(ct, run)
        root = Target(
            rendered.uri.rsplit("/", 1)[0], rendered.scheme, rendered.options, rendered.base_dir
        )
        try:
            found = backend.list_leftovers(root)
        except ConfigError as e:
            pytest.skip(f"this kind of destination cannot list leftovers: {e}")
        assert [x for x in found if x.uri.rstrip("/").endswith(run)] == []

    def test_unknown_storage_options_fail_in_check(
        self, conformance_target: ConformanceTarget
    ) -> None:
        options = {**conformance_target.storage_options, **conformance_target.bad_option}
        bad = ConformanceTarget(conformance_target.uri, options, conformance_target.base_dir)
        with pytest.raises(ConfigError):
            self.backend().check(self.target(bad))

    def _read(self, result: ExportResult[Any], tmp_path: Path, rel: str) -> bytes:
        out = result.materialize(tmp_path / f"read-{uuid.uuid4().hex[:8]}")
        return (out / rel).read_bytes()


def conformance_run(task_id: str, function: str = "raysync.testing.conformance") -> dict[str, Any]:
    """The manifest ``run`` record the suite's exports carry: one call per ``task_id`` (in one
    session and job), all of one function, as the core records them."""
    return run_record(function, task_id, session="conformance-session", job_id="conformance-job")


def _str(p: Path | None) -> str | None:
    return None if p is None else str(p)
