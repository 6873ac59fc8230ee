"""rsync backend: the real ``rsync`` binary, to a mounted path, an rsync daemon, or over ssh.

Targets (docs/backends.md):

- ``rsync:///mnt/nfs/runs/{run_id}`` — a path every node mounts (NFS, Lustre, SMB...). The
  driver writes a visibility token into the static root, as the local backend does; rsync
  transfers into a staging directory next to the run, which is renamed into place (the
  commit). A node without the mount is refused, never written to.
- ``rsync://[user@]host[:port]/module/path/{run_id}`` — an rsync daemon. There is no rename
  over the rsync protocol, so the commit is the manifest: data first (``--delay-updates``,
  ``--delete-before`` so an old manifest is gone before any data changes), then the
  manifest in a second transfer. A run without a manifest is incomplete.
- ``rsync+ssh://[user@]host[:port]/path/{run_id}`` — the same protocol over ssh.

rsync is always run from an argument list, never a shell. The files it sends are symlinks
in a private directory built from the manifest (sent with ``--copy-links``), so rsync's
arguments are only raysync's own paths: no file name ever reaches its command line, and the
set of files sent is exactly the manifest's. A killed transfer resumes on the next attempt:
the staging directory is named after the Ray task, and ``--partial-dir`` keeps partial files.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

import raysync
from raysync.backend import Capabilities, ExportOutcome, ExportRequest, RunInfo, RunReader
from raysync.copy import changed_error, hash_entry, plan_reuse
from raysync.errors import (
    ConfigError,
    DestinationError,
    ExportError,
    MaterializeError,
    MissingDependencyError,
    RaySyncError,
    RunExistsError,
)
from raysync.manifest import MANIFEST_NAME, FileEntry, Manifest, check_relpath, safe_join
from raysync.result import ExportResult
from raysync.target import Target
from raysync_builtins.local import (
    DirReader,
    check_conflict,
    check_visible,
    commit_dir,
    link_committed,
    list_dir_runs,
    materialize_dir,
    prepare_root,
)

log = logging.getLogger("raysync.rsync")

PARTIAL_DIR = ".raysync-partial"
INSTALL_HINT = (
    "install rsync on every node that exports: apt-get install rsync (Debian/Ubuntu), "
    "dnf install rsync (Fedora/RHEL), brew install rsync (macOS)"
)
#: rsync exit codes worth another attempt: socket/protocol I/O, signals, timeouts.
TRANSIENT = {10, 12, 20, 30, 35}
_HOST = re.compile(r"^[A-Za-z0-9_.:\[\]-]+$")


@dataclass(frozen=True)
class Options:
    """The rsync backend's storage_options."""

    #: Bandwidth limit in KiB/s (rsync ``--bwlimit``); 0 means none.
    bwlimit: int = 0
    #: Further attempts after a transient failure (network, killed rsync, timeout).
    retries: int = 3
    retry_base_delay: float = 0.5
    retry_max_delay: float = 10.0
    #: Seconds without I/O before rsync gives up (``--timeout``); 0 means none.
    timeout: int = 300
    #: The rsync program on the worker nodes.
    rsync_binary: str = "rsync"
    #: ``rsync+ssh://`` only: the remote shell command as an argument list.
    ssh_command: tuple[str, ...] = ("ssh",)
    #: ``rsync://`` daemons with auth: the password (sent via RSYNC_PASSWORD, never argv).
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> Options:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"unknown storage_options {unknown} for the rsync backend",
                hint=f"its options are {sorted(known)}",
            )
        values = dict(options)
        for k in ("bwlimit", "retries", "timeout"):
            v = values.get(k, 0)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"storage_options[{k!r}] must be a non-negative int, not {v!r}")
        for k in ("retry_base_delay", "retry_max_delay"):
            v = values.get(k, 0.0)
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                raise ConfigError(f"storage_options[{k!r}] must be a non-negative number")
        if "ssh_command" in values:
            cmd = values["ssh_command"]
            if isinstance(cmd, str) or not all(isinstance(a, str) for a in cmd) or not cmd:
                raise ConfigError(
                    "storage_options['ssh_command'] must be a list of arguments",
                    hint="e.g. ['ssh', '-i', '/path/key', '-o', 'BatchMode=yes']",
                )
            values["ssh_command"] = tuple(cmd)
        if not isinstance(values.get("rsync_binary", "rsync"), str):
            raise ConfigError("storage_options['rsync_binary'] must be a path or program name")
        return cls(**values)


@dataclass(frozen=True)
class Remote:
    """Where a run goes, parsed from its URI."""

    mode: str  # "mount", "daemon" or "ssh"
    path: str  # mount: absolute local path; daemon: "module/path"; ssh: remote path
    host: str = ""
    port: int | None = None
    user: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, uri: str) -> Remote:
        u = urlsplit(uri)
        if u.query or u.fragment:
            raise ConfigError(f"an rsync URI has no query or fragment: {uri!r}")
        path = unquote(u.path)
        if u.scheme == "rsync" and not u.netloc:
            if not path.startswith("/"):
                raise ConfigError(
                    f"{uri!r}: a mounted path must be absolute",
                    hint="write rsync:///mnt/nfs/runs/{run_id} (three slashes)",
                )
            return cls("mount", os.path.normpath(path))
        host = u.hostname or ""
        if not host or not _HOST.match(host) or host.startswith("-"):
            raise ConfigError(f"{uri!r} does not name a valid host")
        try:
            port = u.port
        except ValueError as e:
            raise ConfigError(f"{uri!r} has an invalid port") from e
        user = unquote(u.username) if u.username else None
        if user is not None and (user.startswith("-") or not _HOST.match(user.replace("@", ""))):
            raise ConfigError(f"{uri!r} has an invalid user name")
        if u.password:
            raise ConfigError(
                "do not put a password in an rsync URI",
                hint="pass storage_options={'password': ...} (daemons) or use ssh keys",
            )
        if u.scheme == "rsync":
            rel = path.strip("/")
            if not rel or "/" not in rel:
                raise ConfigError(
                    f"{uri!r} needs a daemon module and a path",
                    hint="e.g. rsync://host/module/runs/{run_id}",
                )
            return cls("daemon", rel, host, port, user)
        if not path.strip("/"):
            raise ConfigError(f"{uri!r} needs a remote path", hint="rsync+ssh://host/srv/runs/x")
        return cls("ssh", path, host, port, user)

    def url(self, sub: str = "") -> str:
        """rsync's own spelling of this location (or a path below it)."""
        p = self.path + (f"/{sub}" if sub else "")
        if self.mode == "mount":
            return p
        user = f"{self.user}@" if self.user else ""
        if self.mode == "daemon":
            port = f":{self.port}" if self.port else ""
            return f"rsync://{user}{self.host}{port}/{p}"
        return f"{user}{self.host}:{p}"


@dataclass
class RsyncStats:
    """What rsync reported (``--stats``)."""

    transferred_files: int = 0
    transferred_bytes: int = 0
    sent_bytes: int = 0
    literal_bytes: int = 0
    matched_bytes: int = 0
    attempts: int = 0

    _FIELDS: ClassVar[dict[str, str]] = {
        "Number of regular files transferred": "transferred_files",
        "Total transferred file size": "transferred_bytes",
        "Total bytes sent": "sent_bytes",
        "Literal data": "literal_bytes",
        "Matched data": "matched_bytes",
    }

    def add(self, output: str) -> None:
        for line in output.splitlines():
            name, _, value = line.partition(":")
            attr = self._FIELDS.get(name.strip())
            m = re.match(r"\s*([\d,]+)", value)
            if attr and m:
                setattr(self, attr, getattr(self, attr) + int(m.group(1).replace(",", "")))

    def as_dict(self) -> dict[str, int]:
        return {f"rsync_{k}": v for k, v in self.__dict__.items()}


class RsyncFailed(Exception):
    """One rsync run failed: its exit code and what it said."""

    def __init__(self, code: int, stderr: str) -> None:
        self.code, self.stderr = code, stderr
        super().__init__(f"rsync exited with {code}: {stderr.strip()[-800:]}")

    @property
    def transient(self) -> bool:
        return self.code < 0 or self.code in TRANSIENT


class Rsync:
    """Runs the rsync binary: argument lists, progress logged, stats kept, retries."""

    def __init__(self, opts: Options, remote: Remote) -> None:
        self.opts, self.remote = opts, remote
        self.stats = RsyncStats()
        binary = shutil.which(opts.rsync_binary)
        if binary is None:
            raise MissingDependencyError(
                f"the rsync backend (program {opts.rsync_binary!r} not found on this node)",
                install=INSTALL_HINT,
            )
        self.binary = binary

    def base_args(self) -> list[str]:
        args = [self.binary, "--no-human-readable", "--stats", "--info=progress2"]
        if self.opts.bwlimit:
            args.append(f"--bwlimit={self.opts.bwlimit}")
        if self.opts.timeout:
            args.append(f"--timeout={self.opts.timeout}")
        if self.remote.mode == "daemon" and self.opts.timeout:
            args.append(f"--contimeout={min(self.opts.timeout, 60)}")
        if self.remote.mode == "ssh":
            import shlex

            port = ["-p", str(self.remote.port)] if self.remote.port else []
            args += ["-e", shlex.join([*self.opts.ssh_command, *port])]
        if self.remote.mode != "mount":
            # Remote paths are passed to the other side verbatim, never word-split there;
            # missing parent directories of the run are created.
            args += ["--secluded-args", "--mkpath"]
        return args

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("RSYNC_PASSWORD", None)
        if self.opts.password is not None:
            env["RSYNC_PASSWORD"] = self.opts.password
        elif "RSYNC_PASSWORD" in os.environ:
            env["RSYNC_PASSWORD"] = os.environ["RSYNC_PASSWORD"]
        return env

    def run(self, args: list[str], what: str, *, record: bool = False) -> str:
        """Run rsync once; log progress; raise RsyncFailed on a non-zero exit.

        ``record`` adds what rsync reports to :attr:`stats` (the data transfer's figures)."""
        argv = self.base_args() + args
        log.debug("raysync: running %s", argv)
        proc = subprocess.Popen(  # an argument list built by raysync, never a shell
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=self.env(),
        )
        stdout, stderr = proc.stdout, proc.stderr
        assert stdout is not None and stderr is not None
        with proc, stdout, stderr:
            return self._watch(proc, stdout, stderr, what, record=record)

    def _watch(
        self, proc: subprocess.Popen[bytes], stdout: Any, stderr: Any, what: str, *, record: bool
    ) -> str:
        err_chunks: list[bytes] = []
        reader = threading.Thread(target=lambda: err_chunks.append(stderr.read()))
        reader.start()
        out = bytearray()
        last_log = time.monotonic()
        for chunk in iter(lambda: os.read(stdout.fileno(), 65536), b""):
            out += chunk
            now = time.monotonic()
            if now - last_log >= 5:
                last_log = now
                line = bytes(out[-400:]).replace(b"\r", b"\n").strip().rsplit(b"\n", 1)[-1]
                log.info("raysync rsync: %s: %s", what, line.decode(errors="replace").strip())
        code = proc.wait()
        reader.join()
        text = bytes(out).decode(errors="replace")
        if code != 0:
            raise RsyncFailed(code, b"".join(err_chunks).decode(errors="replace"))
        if record:
            self.stats.add(text)
        return text

    def run_with_retries(self, args: list[str], what: str, *, record: bool = False) -> None:
        for attempt in range(self.opts.retries + 1):
            if record:
                self.stats.attempts += 1
            try:
                self.run(args, what, record=record)
                return
            except RsyncFailed as e:
                if not e.transient or attempt == self.opts.retries:
                    raise
                cap = min(self.opts.retry_max_delay, self.opts.retry_base_delay * 2**attempt)
                delay = random.uniform(0, cap)  # noqa: S311 - jitter, not cryptography
                log.warning(
                    "raysync: rsync %s failed (exit %d); attempt %d of %d in %.1fs",
                    what,
                    e.code,
                    attempt + 2,
                    self.opts.retries + 1,
                    delay,
                )
                time.sleep(delay)


@contextlib.contextmanager
def source_dir(files: list[FileEntry], near: Path) -> Iterator[Path]:
    """A private directory of symlinks to ``files`` at their manifest paths (sent with
    ``--copy-links``): exactly the manifest's files, and no name on rsync's command line.

    The paths were checked when the trees were scanned (relative, no ``..``), so plain string
    joins are safe here, and fast for tens of thousands of files."""
    root = tempfile.mkdtemp(prefix=".raysync-rsync-", dir=near)
    try:
        made = {root}
        for entry in files:
            assert entry.source is not None
            link = os.path.join(root, check_relpath(entry.path))
            parent = os.path.dirname(link)
            if parent not in made:
                os.makedirs(parent, exist_ok=True)
                made.add(parent)
            os.symlink(os.path.abspath(entry.source), link)
        yield Path(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _prune(staging: Path, keep: set[str]) -> None:
    """Remove files under ``staging`` whose paths are not in ``keep`` (rsync's partial dirs
    stay: a resumed transfer needs them)."""
    for dirpath, dirnames, filenames in os.walk(staging):
        if PARTIAL_DIR in dirnames:
            dirnames.remove(PARTIAL_DIR)
        rel = os.path.relpath(dirpath, staging)
        for name in filenames:
            path = name if rel == "." else f"{rel}/{name}"
            if path not in keep:
                os.remove(os.path.join(dirpath, name))


def hash_entries(files: list[FileEntry], algorithm: str) -> None:
    """Set every entry's digest (read once, in parallel with rsync reading the same pages)."""
    for entry in files:
        hash_entry(entry, algorithm)


@dataclass
class Location:
    """Where a committed run lives, for reading it back (``ExportResult.payload``)."""

    uri: str
    options: dict[str, Any] = field(repr=False)


def _staging_name(dest: Path, task_id: str) -> Path:
    # Named after the Ray task, so that a retried attempt resumes the same staging directory.
    digest = hashlib.sha256(task_id.encode()).hexdigest()[:16]
    return dest.parent / f".{dest.name}.raysync-staging-{digest}"


class _PulledReader(RunReader):
    """A remote run, copied to a temporary directory once, then read from there."""

    def __init__(self, uri: str, rsync: Rsync, remote: Remote) -> None:
        super().__init__(uri)
        self._tmp = tempfile.TemporaryDirectory(prefix="raysync-read-")
        try:
            rsync.run_with_retries(["-a", "--", remote.url() + "/", self._tmp.name + "/"], "pull")
        except RsyncFailed as e:
            self._tmp.cleanup()
            if e.code == 23 and "No such file" in e.stderr:
                self._dir = None
                return
            raise MaterializeError(f"cannot read {uri}: {e}") from None
        self._dir = DirReader(uri, Path(self._tmp.name))

    def manifest(self) -> Manifest | None:
        return None if self._dir is None else self._dir.manifest()

    def read(self, entry: FileEntry) -> Iterator[bytes]:
        assert self._dir is not None
        return self._dir.read(entry)


class RsyncBackend:
    """Exports with the rsync binary."""

    name = "rsync"
    schemes = ("rsync", "rsync+ssh")
    default = False
    capabilities = Capabilities(atomic_rename=True, read_back=True, needs_driver=True)

    def check(self, target: Target) -> None:
        Options.parse(target.options)
        Remote.parse(target.uri.replace("{", "x").replace("}", "x"))

    def prepare(self, target: Target) -> Mapping[str, str]:
        remote = Remote.parse(target.uri.replace("{", "x").replace("}", "x"))
        if remote.mode != "mount":
            return {}
        return prepare_root(Path(target.root or "/"))

    # -- export ----------------------------------------------------------------------------
    def export(self, request: ExportRequest) -> ExportOutcome:
        opts = Options.parse(request.target.options)
        remote = Remote.parse(request.target.uri)
        uri = request.target.uri
        try:
            rsync = Rsync(opts, remote)
            reused: list[FileEntry] = []
            if remote.mode == "mount":
                reused = self._export_mount(request, rsync, remote, uri)
            else:
                self._export_remote(request, rsync, remote, uri)
        except RsyncFailed as e:
            raise self._error(e, request, uri) from None
        stats = rsync.stats.as_dict()
        stats["reused_files"] = len(reused)
        stats["reused_bytes"] = sum(e.size for e in reused)
        return ExportOutcome(
            uri=uri, payload=Location(uri, dict(request.target.options)), extra_stats=stats
        )

    def _error(self, e: RsyncFailed, request: ExportRequest, uri: str) -> RaySyncError:
        said = e.stderr.strip()
        if "read only" in said or "Read-only" in said or "Permission denied" in said:
            hint = "the destination is read-only or not writable by this user; check it"
        elif "Unknown module" in said:
            hint = "check the module name in the URI against the daemon's rsyncd.conf"
        elif e.code in (5, 10, 35) or "Connection refused" in said:
            hint = "check that the rsync daemon (or sshd) runs and is reachable from this node"
        elif "No space left" in said:
            hint = "the destination is full; free space and retry"
        else:
            hint = "see rsync's message above"
        return ExportError(
            f"rsync exited with code {e.code}"
            + (" (killed by a signal)" if e.code < 0 else "")
            + f": {said[-800:] or 'no message'}; nothing was committed",
            backend=self.name,
            uri=uri,
            workspace=str(request.workspace),
            hint=hint,
        )

    def _export_mount(
        self, request: ExportRequest, rsync: Rsync, remote: Remote, uri: str
    ) -> list[FileEntry]:
        """Stage with rsync next to the run, then rename; returns the files reused from the
        run being replaced (hard-linked into the staging directory, not sent)."""
        dest = Path(remote.path)
        check_visible(request.prepared, dest, uri)
        replace, previous = check_conflict(
            dest, task_id=request.task_id, conflict=request.conflict, uri=uri
        )
        reuse = plan_reuse(request.files, previous, request.checksum)
        staging = _staging_name(dest, request.task_id)
        try:
            staging.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DestinationError(
                f"cannot create the staging directory next to the run: {e}",
                uri=uri,
                hint="check that the destination is mounted read-write on this node",
            ) from e
        try:
            # A killed attempt may have left files here (the staging dir is named after the
            # task): drop those the manifest does not list, keep the rest for rsync to resume,
            # and link the files the replaced run already holds.
            _prune(staging, {e.path for e in request.files})
            reused = []
            for entry in request.files:
                if entry.path in reuse:
                    out = safe_join(staging, entry.path)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with contextlib.suppress(FileNotFoundError):
                        out.unlink()
                    if link_committed(safe_join(dest, entry.path), entry, out):
                        reused.append(entry)
            linked = {e.path for e in reused}
            send = [e for e in request.files if e.path not in linked]
            self._transfer(request, rsync, str(staging) + "/", files=send)
            # rsync removes its emptied partial dirs; check anyway, then the manifest.
            shutil.rmtree(staging / PARTIAL_DIR, ignore_errors=True)
            base = str(staging)
            for entry in request.files:
                got = os.stat(os.path.join(base, entry.path)).st_size
                if got != entry.size:
                    raise changed_error(entry, got)
            (staging / MANIFEST_NAME).write_bytes(request.manifest.to_bytes())
            commit_dir(staging, dest, replace=replace, uri=uri)
            return reused
        except BaseException:
            # A failure this process sees is final for this attempt: leave nothing on the
            # mount. (A worker killed mid-transfer cannot clean up; its Ray retry resumes
            # from the staging dir, which is named after the task.)
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _export_remote(
        self, request: ExportRequest, rsync: Rsync, remote: Remote, uri: str
    ) -> None:
        existing = self._read_remote_manifest(rsync, remote, uri)
        if existing is not None:
            same_task = existing.run.get("task_id") == request.task_id
            if not same_task and request.conflict != "overwrite":
                raise RunExistsError(
                    "a committed run already exists here",
                    uri=uri,
                    hint="use another output_uri (e.g. add {task_id}) or conflict='overwrite'",
                )
        # Data first: --delete-before removes an old manifest (and a dead attempt's files)
        # before any data changes; --delay-updates puts the new files in place together.
        self._transfer(request, rsync, remote.url() + "/", daemon=True)
        with tempfile.TemporaryDirectory(prefix="raysync-manifest-") as tmp:
            (Path(tmp) / MANIFEST_NAME).write_bytes(request.manifest.to_bytes())
            rsync.run_with_retries(
                ["-a", f"{tmp}/{MANIFEST_NAME}", remote.url(MANIFEST_NAME)], "manifest"
            )

    def _transfer(
        self,
        request: ExportRequest,
        rsync: Rsync,
        dest: str,
        *,
        daemon: bool = False,
        files: list[FileEntry] | None = None,
    ) -> None:
        """Send ``files`` (default: all of the request's); set their digests meanwhile."""
        files = request.files if files is None else files
        args = [
            "-a",
            "--copy-links",  # the source dir holds symlinks to the workspace files
            # Never trust size + mtime: a retried call may write different bytes of the same
            # size within the same second. Files already there are delta-transferred.
            "--ignore-times",
            f"--partial-dir={PARTIAL_DIR}",
        ]
        if daemon:
            # The run is updated in place: remove what the new manifest does not list.
            args += ["--delete", "--delete-before", "--delay-updates"]
        else:
            # Local copies default to --whole-file; without it a retried attempt resumes a
            # killed file from its partial copy instead of copying it again.
            args.append("--no-whole-file")
        errors: list[BaseException] = []

        def hash_all() -> None:
            try:
                hash_entries([e for e in files if e.digest is None], request.checksum)
            except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
                errors.append(e)

        with source_dir(files, Path(request.workspace)) as src:
            hasher = threading.Thread(target=hash_all, name="raysync-rsync-hash")
            hasher.start()
            try:
                rsync.run_with_retries([*args, "--", f"{src}/", dest], "data", record=True)
            finally:
                hasher.join()
        if errors:
            raise errors[0]

    @staticmethod
    def _read_remote_manifest(rsync: Rsync, remote: Remote, uri: str) -> Manifest | None:
        with tempfile.TemporaryDirectory(prefix="raysync-manifest-") as tmp:
            try:
                rsync.run_with_retries(["--", remote.url(MANIFEST_NAME), tmp + "/"], "manifest")
            except RsyncFailed as e:
                if e.code == 23 and ("No such file" in e.stderr or "change_dir" in e.stderr):
                    return None  # no committed run there
                raise
            return Manifest.from_bytes((Path(tmp) / MANIFEST_NAME).read_bytes(), uri=uri)

    # -- read back ---------------------------------------------------------------------------
    def list_runs(self, target: Target) -> list[RunInfo]:
        remote = Remote.parse(target.uri)
        if remote.mode != "mount":
            raise ConfigError(
                "listing runs on an rsync daemon or over ssh is not supported yet",
                hint="list the destination's directory on the storage host, or use "
                "raysync verify/pull on one run",
            )
        return list_dir_runs(Path(remote.path), lambda p: f"rsync://{p}")

    def open_run(self, target: Target) -> RunReader:
        remote = Remote.parse(target.uri)
        if remote.mode == "mount":
            return DirReader(target.uri, Path(remote.path))
        return _PulledReader(target.uri, Rsync(Options.parse(target.options), remote), remote)

    def materialize(self, result: ExportResult, dest: Path, *, overwrite: bool = False) -> None:
        loc = result.payload
        if not isinstance(loc, Location):
            raise MaterializeError("this result does not say where its run is stored")
        remote = Remote.parse(loc.uri)
        if remote.mode == "mount":
            self._materialize_from(Path(remote.path), result, dest, overwrite=overwrite)
            return
        rsync = Rsync(Options.parse(loc.options), remote)
        with tempfile.TemporaryDirectory(prefix="raysync-pull-", dir=dest.parent) as tmp:
            try:
                rsync.run_with_retries(["-a", "--", remote.url() + "/", tmp + "/"], "pull")
            except RsyncFailed as e:
                raise MaterializeError(f"cannot read {loc.uri} back: {e}") from None
            self._materialize_from(Path(tmp), result, dest, overwrite=overwrite)

    @staticmethod
    def _materialize_from(src: Path, result: ExportResult, dest: Path, *, overwrite: bool) -> None:
        hint = "materialize on a node that mounts the destination"
        materialize_dir(src, result, dest, overwrite=overwrite, hint=hint)


@raysync.hookimpl
def raysync_register_backends(register: raysync.RegisterBackend) -> None:
    register(RsyncBackend())
