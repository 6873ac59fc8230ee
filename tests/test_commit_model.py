"""A model-based test of the commit protocol (hypothesis ``RuleBasedStateMachine``).

Random sequences of exports by several calls (retries of one call, other calls of the same
function, a call of another function), with ``conflict="error"`` or ``"overwrite"``, exports
that fail half-way, two exports racing for one run while a reader polls it, and a user's own
file put where the run would go, are run against a real backend and checked after every step
against a simple model: the destination holds either no run, or exactly the files of the
export the model says committed last, verifying, with no lock or staging left behind; a
reader never sees a manifest whose files do not match it; a user's file is never touched.

Directory runs (local-copy) replace atomically: a failed overwrite keeps the old run. Object
stores (fsspec memory here; S3 is the same code) remove the old manifest before the first new
object is written: a failed overwrite leaves no run (never a mix).
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from raysync import checksum
from raysync.errors import RaySyncError, RunExistsError
from raysync.manifest import MANIFEST_NAME, Manifest, scan
from raysync.rules import run_record
from tests.destinations import Dest
from tests.raw import raw_export, workspace

FUNCTION = "model.export"
CALLS = ["c0", "c1", "c2"]
contents = st.dictionaries(
    st.sampled_from(["export/a", "export/b", "export/sub/c", "data/d", "export/*"]),
    st.binary(max_size=64),
    min_size=1,
    max_size=4,
)


def _record(call: str) -> dict[str, Any]:
    function = "model.other" if call == "other" else FUNCTION
    return run_record(function, call, session="model-session", job_id="model-job")


class CommitProtocol(RuleBasedStateMachine):
    backend = ""

    def __init__(self) -> None:
        super().__init__()
        self.committed: tuple[str, dict[str, bytes]] | None = None
        self.occupied = False

    @initialize()
    def fresh_destination(self) -> None:
        import tempfile

        base = Path(tempfile.mkdtemp(prefix="raysync-model-"))
        self.base = base
        if self.backend == "local":
            self.dest = Dest("local", str(base), disk=base)
        else:
            import fsspec

            name = f"model-{uuid.uuid4().hex[:8]}"
            self.dest = Dest(
                "memory", f"memory://{name}", fs=fsspec.filesystem("memory"), fs_root=f"/{name}"
            )
        self.run_uri = self.dest.uri("runs/r")

    def teardown(self) -> None:
        from raysync.fsops import remove_tree

        if hasattr(self, "base"):
            remove_tree(self.base)
        if hasattr(self, "dest") and self.dest.fs is not None:
            with contextlib.suppress(FileNotFoundError):
                self.dest.fs.rm(self.dest.fs_root, recursive=True)

    # -- actions ---------------------------------------------------------------------------
    def _export(self, call: str, files: dict[str, bytes], conflict: str, fail: bool) -> str:
        ws = workspace(files)
        entries = scan(ws, ["export", "data", "artifacts"])
        if fail:
            first = sorted(files)[0]
            (ws / first).write_bytes(files[first] + b"grown after the scan")
        try:
            raw_export(
                self.dest,
                self.run_uri,
                conflict=conflict,
                run=_record(call),
                ws=ws,
                entries=entries,
            )
        except RunExistsError:
            return "refused"
        except RaySyncError:
            return "failed"
        return "ok"

    def _expect(self, call: str, conflict: str) -> str:
        """What the rules allow (the model): ok or refused."""
        if self.occupied:
            return "refused"
        if self.committed is None:
            return "ok"
        owner = self.committed[0]
        if owner == call:
            return "ok"
        if owner == "other" or call == "other":
            return "refused"
        return "ok" if conflict == "overwrite" else "refused"

    @rule(
        call=st.sampled_from([*CALLS, "other"]),
        files=contents,
        conflict=st.sampled_from(["error", "overwrite"]),
        fail=st.booleans(),
    )
    def export(self, call: str, files: dict[str, bytes], conflict: str, fail: bool) -> None:
        expected = self._expect(call, conflict)
        got = self._export(call, files, conflict, fail)
        if expected == "refused":
            assert got == "refused", (got, call, conflict, self.committed)
            return
        if fail:
            assert got == "failed", got
            if self.backend != "local":
                # An object store drops the old run's manifest before the first new object
                # is written: a failure after that leaves no run, one before it the old run.
                state = self._state()
                assert state in (self.committed, None), state
                self.committed = state
            return
        assert got == "ok", (got, call, conflict, self.committed)
        self.committed = (call, files)

    @precondition(lambda self: self.committed is None and not self.occupied)
    @rule()
    def a_user_puts_a_file_where_the_run_would_go(self) -> None:
        self.dest.plant("runs/r/user.txt", b"the user's")
        self.occupied = True

    @precondition(lambda self: self.occupied)
    @rule()
    def the_user_moves_it_away(self) -> None:
        if self.dest.disk is not None:
            (self.dest.disk / "runs" / "r" / "user.txt").unlink()
        else:
            self.dest.fs.rm_file(f"{self.dest.fs_root}/runs/r/user.txt")
        self.occupied = False

    @precondition(lambda self: not self.occupied)
    @rule(
        a=st.sampled_from(CALLS),
        b=st.sampled_from(CALLS),
        fa=contents,
        fb=contents,
        conflict=st.sampled_from(["error", "overwrite"]),
    )
    def two_exports_race_while_a_reader_polls(
        self, a: str, b: str, fa: dict[str, bytes], fb: dict[str, bytes], conflict: str
    ) -> None:
        assume(a != b)  # attempts of one call never run at once (Ray retries a dead one)
        results: dict[str, str] = {}
        bad: list[str] = []
        stop = threading.Event()

        def reader() -> None:
            while not stop.is_set():
                problem = self._read_once()
                if problem:
                    bad.append(problem)

        poll = threading.Thread(target=reader)
        poll.start()

        def race(key: str, call: str, files: dict[str, bytes]) -> None:
            results[key] = self._export(call, files, conflict, False)

        racers = [
            threading.Thread(target=race, args=("a", a, fa)),
            threading.Thread(target=race, args=("b", b, fb)),
        ]
        for t in racers:
            t.start()
        for t in racers:
            t.join(timeout=60)
        stop.set()
        poll.join(timeout=30)
        assert not bad, bad
        assert set(results.values()) <= {"ok", "refused"}, results
        winners = {k for k, v in results.items() if v == "ok"}
        if self._expect(a, conflict) == "ok" or self._expect(b, conflict) == "ok":
            assert winners, results
        # The run now holds exactly one successful export's files.
        state = self._state()
        if not winners:
            assert state == self.committed
            return
        assert state is not None
        owner, files = state
        candidates = {"a": (a, fa), "b": (b, fb)}
        assert any(candidates[w] == (owner, files) for w in winners), (state, results)
        self.committed = (owner, files)

    # -- what a reader sees --------------------------------------------------------------------
    def _manifest_bytes(self) -> bytes | None:
        return self.dest.read(f"runs/r/{MANIFEST_NAME}")

    def _state(self) -> tuple[str, dict[str, bytes]] | None:
        data = self._manifest_bytes()
        if data is None:
            return None
        m = Manifest.from_bytes(data)
        files = {f.path: self.dest.read(f"runs/r/{f.path}") or b"" for f in m.files}
        return str(m.run["task_id"]), files

    def _read_once(self) -> str | None:
        """One reader's look at the run: a manifest whose files do not match it is a problem,
        unless the manifest itself changed while the files were read (a reader racing a
        replacement sees it vanish or change, and looks again)."""
        if self.dest.disk is not None:
            return self._read_dir_snapshot()
        data = self._manifest_bytes()
        if data is None:
            return None
        m = Manifest.from_bytes(data)
        for f in m.files:
            got = self.dest.read(f"runs/r/{f.path}")
            if got is None or checksum.of_bytes(got, m.checksum) != f.digest:
                if self._manifest_bytes() == data:
                    return f"{f.path} does not match the manifest that is still committed"
                return None
        return None

    def _read_dir_snapshot(self) -> str | None:
        assert self.dest.disk is not None
        try:
            fd = os.open(self.dest.disk / "runs" / "r", os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            return None
        try:

            def opener(path: str, flags: int) -> int:
                return os.open(path, flags, dir_fd=fd)

            with open(MANIFEST_NAME, "rb", opener=opener) as fh:
                m = Manifest.from_bytes(fh.read())
            for f in m.files:
                with open(f.path, "rb", opener=opener) as fh:
                    if checksum.of_bytes(fh.read(), m.checksum) != f.digest:
                        return f"{f.path} does not match its manifest in one directory snapshot"
        except FileNotFoundError:
            return None  # the directory was replaced and removed while it was read: gone
        finally:
            os.close(fd)
        return None

    @invariant()
    def the_destination_is_what_the_model_says(self) -> None:
        if not hasattr(self, "dest"):
            return
        state = self._state()
        if self.committed is None:
            assert state is None, state
        else:
            assert state == self.committed, (state, self.committed)
        if self.occupied:
            assert self.dest.read("runs/r/user.txt") == b"the user's"
        # Nothing left behind: no lock, no staging, no object the manifest does not list.
        listed = set(self.committed[1]) if self.committed else set()
        extra = {MANIFEST_NAME} if self.committed else set()
        if self.occupied:
            extra.add("user.txt")
        assert set(self.dest.files("runs/r")) == listed | extra
        if self.dest.disk is not None and (self.dest.disk / "runs").exists():
            hidden = [
                p.name for p in (self.dest.disk / "runs").iterdir() if p.name.startswith(".r.")
            ]
            assert hidden == [], hidden


MODEL_SETTINGS = settings(max_examples=25, stateful_step_count=12, deadline=None, database=None)


class _Memory(CommitProtocol):
    backend = "memory"


class _Local(CommitProtocol):
    backend = "local"


TestLocalCommitProtocol = _Local.TestCase
TestLocalCommitProtocol.settings = MODEL_SETTINGS
TestObjectStoreCommitProtocol = _Memory.TestCase
TestObjectStoreCommitProtocol.settings = MODEL_SETTINGS


def test_the_model_itself_catches_a_broken_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model is not vacuous: with the rule that refuses other functions' runs switched
    off, it finds a sequence that breaks it."""
    from raysync import rules

    monkeypatch.setattr(rules, "may_replace", lambda existing, run, conflict: True)
    real = rules.decide

    def careless(**kw: Any) -> Any:
        kw["conflict"] = "overwrite"
        existing = kw.get("existing")
        if existing is not None:
            return rules.Decision(True, existing)
        return real(**kw)

    monkeypatch.setattr(rules, "decide", careless)
    import raysync.dirrun

    monkeypatch.setattr(raysync.dirrun, "decide", careless)
    with pytest.raises(Exception):  # noqa: B017 - hypothesis reports it its own way
        _Local.TestCase("runTest").runTest()
