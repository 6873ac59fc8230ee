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
import json
import os
import random
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

import raysync
from raysync import redaction, rules
from raysync.backend import Capabilities, ExportOutcome, ExportRequest, Location, RunInfo, RunReader
from raysync.copy import copy_threads, hash_entry, open_source, plan_reuse
from raysync.dirrun import (
    DirReader,
    check_conflict,
    check_visible,
    commit_dir,
    link_reused,
    list_dir_runs,
    materialize_dir,
    prepare_root,
    staging_dir,
)
from raysync.errors import (
    ConfigError,
    DestinationError,
    ExportError,
    MaterializeError,
    MissingDependencyError,
    RaySyncError,
    TreeError,
)
from raysync.fsops import TemporaryDir, iter_files, makedirs, remove_tree, temporary_dir
from raysync.manifest import MANIFEST_NAME, FileEntry, Manifest, check_relpath, safe_join
from raysync.result import ExportResult
from raysync.retry import RetryPolicy
from raysync.target import Target

log = redaction.logger("raysync.rsync")

PARTIAL_DIR = ".raysync-partial"
#: Daemon and ssh runs: who is writing the run (the rsync protocol has no rename to commit
#: by). Written before any data, removed after the manifest.
CLAIM_NAME = ".raysync-claim"
INSTALL_HINT = (
    "install rsync on every node that exports: apt-get install rsync (Debian/Ubuntu), "
    "dnf install rsync (Fedora/RHEL), brew install rsync (macOS)"
)
#: rsync exit codes worth another attempt: socket/protocol I/O, signals, timeouts.
TRANSIENT = {10, 12, 20, 30, 35}
#: One entry of ``rsync --list-only``: permissions, size, date, time, name.
_LISTED = re.compile(r"^[-dlcbps][-rwxsStT]{9}\S*\s+[\d,]+\s+\S+\s+\S+\s(.*)$")
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


#: rsync dies with the process that started it (Linux: util-linux ``setpriv``). A worker
#: killed mid-export (the OOM killer, a node drain) would otherwise leave its rsync running,
#: writing into a staging directory that the call's retry then commits, or into a remote run
#: after the retry committed it. Ray does not kill a dead worker's children by default. The
#: signal is sent when the *thread* that started rsync ends; that thread waits for rsync.
_SETPRIV = shutil.which("setpriv") if sys.platform.startswith("linux") else None
_DIE_WITH_PARENT = [_SETPRIV, "--pdeathsig", "KILL", "--"] if _SETPRIV else []

#: Characters rsync's remote side expands as wildcards (and its escape character).
_WILDCARDS = ("*", "?", "[", "]", "\\")


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
        if "?" in uri or "#" in uri:
            # urlsplit would cut the path there: 'runs/exp?' would export to, and replace,
            # the sibling run 'runs/exp'.
            raise ConfigError(
                f"{uri!r}: an rsync URI has no query or fragment, so '?' and '#' cannot be in it",
                hint="name the run without '?' and '#'",
            )
        u = urlsplit(uri)
        path = unquote(u.path, errors="surrogateescape")
        # The path as rsync will see it, decoded: a '.' or '..' segment would reach another
        # directory than the one the URI names (DESIGN invariant 7). Never normalised away.
        if any(p in (".", "..") for p in path.split("/")):
            raise ConfigError(
                f"{uri!r}: the path has a '.' or '..' segment (after percent-decoding)",
                hint="write the run's path without '.' and '..' segments",
            )
        if u.netloc and any(c in path for c in _WILDCARDS):
            # The remote rsync expands wildcards in the paths it is given ('exp[1]' would
            # read, list or replace the run 'exp1').
            raise ConfigError(
                f"{uri!r}: a remote rsync path cannot hold {' '.join(_WILDCARDS)} (the "
                "remote rsync reads them as wildcards)",
                hint="name the run without wildcard characters",
            )
        if u.scheme == "rsync" and not u.netloc:
            if not path.startswith("/"):
                raise ConfigError(
                    f"{uri!r}: a mounted path must be absolute",
                    hint="write rsync:///mnt/nfs/runs/{run_id} (three slashes)",
                )
            return cls("mount", "/" + "/".join(p for p in path.split("/") if p))
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

    def __init__(self, code: int, stderr: str, stdout: str = "") -> None:
        self.code, self.stderr, self.stdout = code, stderr, stdout
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
        argv = _DIE_WITH_PARENT + self.base_args() + args
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
            raise RsyncFailed(code, b"".join(err_chunks).decode(errors="replace"), text)
        if record:
            self.stats.add(text)
        return text

    def run_with_retries(self, args: list[str], what: str, *, record: bool = False) -> None:
        def attempt() -> None:
            if record:
                self.stats.attempts += 1

        policy = RetryPolicy(
            self.opts.retries, self.opts.retry_base_delay, self.opts.retry_max_delay
        )
        policy.call(
            f"rsync {what}",
            lambda: self.run(args, what, record=record),
            transient=lambda e: isinstance(e, RsyncFailed) and e.transient,
            describe=lambda e: f"exit {e.code}" if isinstance(e, RsyncFailed) else str(e),
            before=attempt,
        )


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
                makedirs(parent)
                made.add(parent)
            os.symlink(os.path.abspath(entry.source), link)
        yield Path(root)
    finally:
        remove_tree(root)


def _prune(staging: Path, keep: set[str]) -> None:
    """Remove files under ``staging`` whose paths are not in ``keep`` (rsync's partial dirs
    stay: a resumed transfer needs them)."""
    for path in list(iter_files(staging, skip_dirs=frozenset({PARTIAL_DIR}))):
        if path not in keep:
            os.remove(os.path.join(staging, path))


def _remove_partial_dirs(root: Path) -> None:
    """Remove every rsync partial dir under ``root`` (rsync keeps one per destination
    directory; a killed transfer leaves them): a committed run holds only its files."""
    stack = [os.fspath(root)]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                subdirs = [e.path for e in it if e.is_dir(follow_symlinks=False)]
        except OSError:
            continue
        for sub in subdirs:
            if os.path.basename(sub) == PARTIAL_DIR:
                remove_tree(sub)
            else:
                stack.append(sub)


def _rsync_internal(path: str) -> bool:
    """A path rsync itself keeps in a run directory (a partial dir, --delay-updates' temp
    dir): left by a killed transfer, it is not anyone's data."""
    return any(p in (PARTIAL_DIR, ".~tmp~") for p in path.split("/"))


def hash_entries(files: list[FileEntry], algorithm: str) -> None:
    """Set every entry's digest (read once, in parallel with rsync reading the same pages)."""
    for entry in files:
        hash_entry(entry, algorithm)


def _hash_staged(staging: Path, files: list[FileEntry], algorithm: str) -> None:
    """Set each entry's digest from its staged copy: the bytes that are committed. An entry
    whose digest was known (hashed by an earlier export of this call, or for reuse) must
    match it."""
    base = os.fspath(staging)

    def one(entry: FileEntry) -> None:
        probe = FileEntry(entry.path, entry.size, entry.mode, source=os.path.join(base, entry.path))
        hash_entry(probe, algorithm)  # also checks the size
        if entry.digest is not None and entry.digest != probe.digest:
            raise TreeError(
                f"{entry.path!r} changed while it was exported (its bytes differ from when "
                "it was hashed); nothing was committed",
                hint="make sure nothing still writes to the output trees when the call returns",
            )
        entry.digest = probe.digest

    if len(files) < 2:
        for e in files:
            one(e)
        return
    with ThreadPoolExecutor(copy_threads(), thread_name_prefix="raysync-rsync-hash") as pool:
        list(pool.map(one, files))


def unchanged_since_scan(files: list[FileEntry]) -> None:
    """Every source still has the size, times and identity the scan saw: a file rewritten
    while rsync and the hashing read it is an error, not a commit."""
    for entry in files:
        if entry.fingerprint is None or entry.source is None:
            continue
        try:
            st = os.stat(entry.source)
            now = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
        except OSError:
            now = None
        if now != entry.fingerprint:
            raise TreeError(
                f"{entry.path!r} changed while it was exported; nothing was committed",
                hint="make sure nothing still writes to the output trees when the call returns",
            )


class _Contended(Exception):
    """Another call holds a claim on the run right now: withdraw, wait and look again."""


class _Hold(Exception):
    """Another call claimed at the same moment and will withdraw: keep the claim, look
    again."""


def _parents(path: str) -> list[str]:
    """``a/b/c`` → ``["a", "a/b"]``: the directories a manifest path implies."""
    parts = path.split("/")
    return ["/".join(parts[:n]) for n in range(1, len(parts))]


def _claim_owner(data: bytes | None) -> dict[str, Any] | None:
    """The call a claim names; a claim that cannot be read names no call (not ours)."""
    if data is None:
        return None
    try:
        owner = json.loads(data)
    except ValueError:
        return {"task_id": "unreadable claim"}
    return owner if isinstance(owner, dict) else {"task_id": "unreadable claim"}


def _staging_tag(run: Mapping[str, Any]) -> str:
    # Named after the call (session, job and task), so that a retried attempt resumes the
    # same staging directory, and a call on another cluster with the same task id does not.
    key = "\0".join(str(run.get(k)) for k in rules.IDENTITY_KEYS)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class _PulledReader(RunReader):
    """A remote run, copied to a temporary directory once, then read from there."""

    def __init__(self, uri: str, rsync: Rsync, remote: Remote) -> None:
        super().__init__(uri)
        self._tmp = TemporaryDir(prefix="raysync-read-")
        try:
            rsync.run_with_retries(["-a", "--", remote.url() + "/", f"{self._tmp.path}/"], "pull")
        except RsyncFailed as e:
            self._tmp.cleanup()
            if e.code == 23 and "No such file" in e.stderr:
                self._dir = None
                return
            raise MaterializeError(f"cannot read {uri}: {e}") from None
        self._dir = DirReader(uri, self._tmp.path)

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
        if "[sender]" in said and ("Permission denied" in said or "failed to open" in said):
            hint = "a file of the output trees cannot be read by the worker's user; fix it"
        elif "read only" in said or "Read-only" in said or "Permission denied" in said:
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
        run being replaced (hard-linked into the staging directory and re-hashed, not sent).

        The digests are those of the staged copies, the bytes that are committed (DESIGN
        invariant 8); a file whose size or identity changed since the scan fails the export.
        """
        dest = Path(remote.path)
        run = request.manifest.run
        check_visible(request.prepared, dest, uri)
        decision = check_conflict(dest, run=run, conflict=request.conflict, uri=uri)
        reuse = plan_reuse(request.files, decision.previous, request.checksum)
        staging = staging_dir(dest, _staging_tag(run))
        try:
            makedirs(staging)
        except OSError as e:
            raise DestinationError(
                f"cannot create the staging directory next to the run: {e}",
                uri=uri,
                hint="check that the destination is mounted read-write on this node",
            ) from e
        try:
            # A killed attempt of this call may have left files here (the staging dir is
            # named after the call): drop those the manifest does not list, keep the rest for
            # rsync to resume, and link the files the replaced run already holds.
            _prune(staging, {e.path for e in request.files})
            pairs = []
            for entry in request.files:
                if entry.path in reuse:
                    out = safe_join(staging, entry.path)
                    makedirs(out.parent)
                    with contextlib.suppress(FileNotFoundError):
                        out.unlink()
                    pairs.append((entry, safe_join(dest, entry.path), str(out)))
            linked = link_reused(pairs, request.checksum)
            send = [e for e in request.files if e.path not in linked]
            self._transfer(request, rsync, str(staging) + "/", files=send, hash_sources=False)
            # rsync removes its emptied partial dirs; check anyway, then hash what was staged.
            _remove_partial_dirs(staging)
            _hash_staged(staging, send, request.checksum)
            unchanged_since_scan(send)
            (staging / MANIFEST_NAME).write_bytes(request.manifest.to_bytes())
            commit_dir(staging, dest, decision, run=run, conflict=request.conflict, uri=uri)
            return [e for e in request.files if e.path in linked]
        except BaseException:
            # A failure this process sees is final for this attempt: leave nothing on the
            # mount. (A worker killed mid-transfer cannot clean up; its Ray retry resumes
            # from the staging dir, which is named after the call.)
            remove_tree(staging)
            raise

    def _export_remote(
        self, request: ExportRequest, rsync: Rsync, remote: Remote, uri: str
    ) -> None:
        """Daemon and ssh: prove the directory is ours to write (empty, a run this call may
        replace, or this call's own unfinished attempt), claim it, send the data (the old
        manifest goes first), then the manifest, then drop the claim.

        rsync has no exclusive create, so each call claims under a name of its own
        (``.raysync-claim-<random>``) and then looks again: when it sees another call's claim
        it withdraws (of two calls that claim at once, at least the later one sees the other,
        and neither writes a byte of data before its look)."""
        run = request.manifest.run
        with temporary_dir("raysync-rsync-meta-") as meta:
            (meta / "empty").mkdir()
            mine, stale = self._claim_remote(rsync, remote, uri, run, request.conflict, meta)
            sent = False
            try:
                # Every source readable and unchanged before the old run is touched: a tree
                # that fails here leaves the old run as it was.
                for entry in request.files:
                    os.close(open_source(entry))
                unchanged_since_scan(request.files)
                # Data first: --delete-before removes an old manifest (and a dead attempt's
                # files) before any data changes; --delay-updates puts the new files in place
                # together; claims are protected from the deletion.
                sent = True
                self._transfer(request, rsync, remote.url() + "/", daemon=True)
                unchanged_since_scan(request.files)
                (meta / MANIFEST_NAME).write_bytes(request.manifest.to_bytes())
                rsync.run_with_retries(
                    ["-a", f"{meta}/{MANIFEST_NAME}", remote.url(MANIFEST_NAME)], "manifest"
                )
            except BaseException:
                # Nothing was committed. Once data went out the old run is gone (its manifest
                # first): empty the directory, which the claim proved ours, so that a retry or
                # another call can take it; before that, only our claim goes.
                self._clear_remote(rsync, remote, meta / "empty", [mine], everything=sent)
                raise
            # The run is committed; drop our claim and those of this call's dead attempts.
            self._clear_remote(rsync, remote, meta / "empty", [mine, *stale], everything=False)

    def _claim_remote(
        self,
        rsync: Rsync,
        remote: Remote,
        uri: str,
        run: Mapping[str, Any],
        conflict: str,
        meta: Path,
    ) -> tuple[str, list[str]]:
        """Claim the run: look (nothing is written where the rules refuse), claim under a new
        name of this call's own, look again. Calls that claim at the same moment see each
        other and both withdraw; each tries again after a random wait, so one of them gets
        the run and the other then finds it claimed or committed. Returns the claim's name
        and the claims this call's dead attempts left."""
        rounds = 5
        body = json.dumps(rules.claim_record(run)).encode()
        mine: str | None = None
        for n in range(rounds):
            last = n == rounds - 1
            try:
                if mine is None:
                    self._decide_remote(rsync, remote, uri, run, conflict, mine=None, wait=not last)
                    mine = f"{CLAIM_NAME}-{secrets.token_hex(8)}"
                    (meta / mine).write_bytes(body)
                    self._send_claim(rsync, remote, meta, mine)
                try:
                    stale = self._decide_remote(
                        rsync, remote, uri, run, conflict, mine=mine, wait=not last
                    )
                    return mine, stale
                except _Hold:
                    time.sleep(random.uniform(0.05, 0.15))  # noqa: S311 - the other withdraws
                except BaseException:
                    self._clear_remote(rsync, remote, meta / "empty", [mine], everything=False)
                    mine = None
                    raise
            except _Contended:
                time.sleep(random.uniform(0.05, 0.2) * 2**n)  # noqa: S311 - jitter
        raise AssertionError("unreachable: the last round raises RunExistsError")

    @staticmethod
    def _send_claim(rsync: Rsync, remote: Remote, meta: Path, mine: str) -> None:
        for tries in range(3):
            try:
                rsync.run_with_retries(["-a", f"{meta}/{mine}", remote.url(mine)], "claim")
                return
            except RsyncFailed as e:
                # Two calls creating the run's new directory at once: rsync's --mkpath of
                # the loser fails with EEXIST; the directory is there now.
                if "File exists" not in e.stderr or tries == 2:
                    raise

    def _decide_remote(
        self,
        rsync: Rsync,
        remote: Remote,
        uri: str,
        run: Mapping[str, Any],
        conflict: str,
        *,
        mine: str | None,
        wait: bool = False,
    ) -> list[str]:
        """Look at the remote run and apply the conflict decision (before claiming, and again
        holding the claim ``mine``); return the claims this call's dead attempts left. With
        ``wait``, another call's claim raises :class:`_Contended` (try again) instead of
        :class:`RunExistsError`."""
        # Holding the claim: no run above, committed or being written.
        inside = self._enclosing_run(rsync, remote) if mine is not None else None
        names = self._list_remote(rsync, remote, recursive=mine is not None)
        top = [n for n in names if "/" not in n]
        claims = [n for n in top if n.startswith(CLAIM_NAME) and n != mine]
        stale: list[str] = []
        for name in claims:
            owner = _claim_owner(self._read_remote_claim(rsync, remote, name, uri))
            if owner is None:
                continue  # gone since the listing (rsync's temporary name of a claim)
            if rules.same_call(owner, run):
                stale.append(name)  # an attempt of this call that died: ours
                continue
            if wait:
                # Two claims at once: the smaller name keeps its claim and looks again, the
                # other withdraws and waits (either way, a call goes on only after a look
                # that shows no other claim).
                raise _Hold if mine is not None and mine < name else _Contended
            rules.decide(
                existing=None,
                occupied=True,
                run=run,
                conflict=conflict,
                uri=uri,
                leftover_owner=owner,
            )
        existing = None
        if MANIFEST_NAME in top:
            data = self._read_remote_json(rsync, remote, MANIFEST_NAME, uri)
            existing = Manifest.from_bytes(data, uri=uri)
        ours = {mine, *stale, *claims, MANIFEST_NAME}
        unlisted: list[str] = []
        if existing is not None and mine is not None:
            listed = {f.path for f in existing.files}
            dirs = {d for f in existing.files for d in _parents(f.path)}
            unlisted = [
                n
                for n in names
                if n not in ours and n not in listed and n not in dirs and not _rsync_internal(n)
            ]
        nested = [
            n
            for n in names
            if "/" in n
            and not _rsync_internal(n)
            and (n.endswith("/" + MANIFEST_NAME) or n.rsplit("/", 1)[-1].startswith(CLAIM_NAME))
        ]
        rules.decide(
            existing=existing,
            inside=inside,
            nested=nested,
            occupied=any(n not in ours for n in top) and not stale,
            run=run,
            conflict=conflict,
            uri=uri,
            leftover_owner=None,
            unlisted=unlisted,
        )
        return stale

    @staticmethod
    def _enclosing_run(rsync: Rsync, remote: Remote) -> str | None:
        """A run (committed, or claimed by a call writing it) in a directory above the run
        (up to the daemon module, or the remote root's first directory), the nearest one.

        One filtered recursive listing from the top directory walks only the chain of
        directories down to the run's parent and shows only their manifests and claims (the
        path holds no wildcard characters: :meth:`Remote.parse` refuses them)."""
        parts = remote.path.strip("/").split("/")
        if len(parts) < 2:
            return None
        lead = "" if remote.mode == "daemon" else "/"
        top = Remote(remote.mode, lead + parts[0], remote.host, remote.port, remote.user)
        chain = ["/".join(parts[1:n]) for n in range(1, len(parts))]  # "" is the top itself
        filters: list[str] = []
        for d in chain:
            at = f"/{d}/" if d else "/"
            filters += [f"--filter=+ {at}{MANIFEST_NAME}", f"--filter=+ {at}{CLAIM_NAME}-*"]
            if d:
                filters.append(f"--filter=+ /{d}/")
        filters.append("--filter=- *")
        try:
            out = rsync.run(["--list-only", "-r", *filters, "--", top.url() + "/"], "look above")
        except RsyncFailed as e:
            if e.code != 23:  # 23: the top directory is not there (a new tree)
                raise
            out = e.stdout
        runs = []
        for m in map(_LISTED.match, out.splitlines()):
            if m is None:
                continue
            name = m.group(1)
            folder, _, base = name.rpartition("/")
            if base == MANIFEST_NAME or base.startswith(CLAIM_NAME):
                runs.append(folder)
        if not runs:
            return None
        nearest = max(runs, key=len)
        return top.url(nearest) if nearest else top.url()

    @staticmethod
    def _read_remote_claim(rsync: Rsync, remote: Remote, name: str, uri: str) -> bytes | None:
        try:
            with temporary_dir("raysync-read-") as tmp:
                rsync.run(["--", remote.url(name), f"{tmp}/"], f"read {name}")
                return (tmp / name).read_bytes()
        except (RsyncFailed, FileNotFoundError):
            return None

    @staticmethod
    def _clear_remote(
        rsync: Rsync, remote: Remote, empty: Path, claims: list[str], *, everything: bool
    ) -> None:
        """Delete ``claims`` (and with ``everything``, all the run directory holds but other
        calls' claims) on the remote side: an rsync of an empty directory with ``--delete``,
        filtered."""
        if everything:  # the first matching rule wins: ours are at risk, others' protected
            chosen = [*(f"--filter=R /{c}" for c in claims), f"--filter=P /{CLAIM_NAME}-*"]
        else:
            chosen = [*(f"--filter=+ /{c}" for c in claims), "--filter=- *"]
        try:
            rsync.run_with_retries(
                ["-r", "--delete", *chosen, f"{empty}/", remote.url() + "/"], "clean up"
            )
        except RsyncFailed as e:
            log.warning("raysync: could not clean up %s after the export: %s", remote.url(), e)

    def _list_remote(self, rsync: Rsync, remote: Remote, *, recursive: bool = False) -> list[str]:
        """The names in the remote run directory (``[]``: missing or empty), with
        ``recursive`` every path below it; a file at the run's path lists as itself, so it
        counts as occupied."""
        try:
            more = ["-r"] if recursive else []
            out = rsync.run(["--list-only", *more, "--", remote.url() + "/"], "list")
        except RsyncFailed as e:
            if e.code == 23 and ("No such file" in e.stderr or "change_dir" in e.stderr):
                return []
            raise
        names = []
        for line in out.splitlines():
            m = _LISTED.match(line)  # other lines are --stats and progress output
            if m and m.group(1) != ".":
                names.append(m.group(1))
        return names

    @staticmethod
    def _read_remote_json(rsync: Rsync, remote: Remote, name: str, uri: str) -> bytes:
        with temporary_dir("raysync-read-") as tmp:
            rsync.run_with_retries(["--", remote.url(name), f"{tmp}/"], f"read {name}")
            return (tmp / name).read_bytes()

    def _transfer(
        self,
        request: ExportRequest,
        rsync: Rsync,
        dest: str,
        *,
        daemon: bool = False,
        files: list[FileEntry] | None = None,
        hash_sources: bool = True,
    ) -> None:
        """Send ``files`` (default: all of the request's); with ``hash_sources``, set their
        digests meanwhile (from a read of the sources in parallel with rsync's)."""
        files = request.files if files is None else files
        for entry in files:
            # Every source readable, and the file the scan saw, before rsync reads it: an
            # unreadable file is the tree's problem (TreeError), not the destination's.
            os.close(open_source(entry))
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
            args += [
                "--delete",
                "--delete-before",
                "--delay-updates",
                f"--filter=P /{CLAIM_NAME}-*",
            ]
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
            hasher = threading.Thread(target=hash_all if hash_sources else lambda: None)
            hasher.start()
            try:
                rsync.run_with_retries([*args, "--", f"{src}/", dest], "data", record=True)
            finally:
                hasher.join()
        if errors:
            raise errors[0]

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
        with temporary_dir("raysync-pull-", dir=dest.parent) as tmp:
            try:
                rsync.run_with_retries(["-a", "--", remote.url() + "/", f"{tmp}/"], "pull")
            except RsyncFailed as e:
                raise MaterializeError(f"cannot read {loc.uri} back: {e}") from None
            self._materialize_from(tmp, result, dest, overwrite=overwrite)

    @staticmethod
    def _materialize_from(src: Path, result: ExportResult, dest: Path, *, overwrite: bool) -> None:
        hint = "materialize on a node that mounts the destination"
        materialize_dir(src, result, dest, overwrite=overwrite, hint=hint)


@raysync.hookimpl
def raysync_register_backends(register: raysync.RegisterBackend) -> None:
    register(RsyncBackend())
