"""The rsync command: its options, the remote it reaches, running it, its errors."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

from raysync import redaction
from raysync.errors import (
    ConfigError,
    MissingDependencyError,
)
from raysync.retry import RetryPolicy

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
