"""Shared fixtures: one real local Ray at a time, bound to loopback, with a project working_dir."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

import raysync.demo

NODE_IP = "127.0.0.2"  # Ray rewrites 127.0.0.1 to the outward address; 127.0.0.2 stays local

# pytest imports this file as ``conftest`` and the tests import it as ``tests.conftest``: two
# module objects. The running cluster's runtime_env is kept where both see it.
_STATE_VAR = "RAYSYNC_TESTS_RAY_ENV"


def ensure_ray(runtime_env: dict[str, Any] | None) -> None:
    """Start a local Ray with ``runtime_env``, restarting it if another one is running."""
    wanted = json.dumps(runtime_env, sort_keys=True)
    if ray.is_initialized() and os.environ.get(_STATE_VAR) == wanted:
        return
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local",
        _node_ip_address=NODE_IP,
        include_dashboard=False,
        num_cpus=8,  # logical slots: the tasks here sleep or do little I/O
        runtime_env=runtime_env,
        configure_logging=False,
    )
    os.environ[_STATE_VAR] = wanted


def stop_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()
    os.environ.pop(_STATE_VAR, None)


@pytest.fixture(scope="session")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The driver's project directory, shipped to workers as the runtime_env working_dir."""
    root = tmp_path_factory.mktemp("project")
    for name in ("Makefile", "pipeline.py"):
        shutil.copy(Path(raysync.demo.PIPELINE_DIR) / name, root / name)
    (root / "inputs").mkdir()
    (root / "inputs" / "config.txt").write_text("threshold=3\n")
    (root / "helper.py").write_text("def double(x):\n    return 2 * x\n")
    return root


@pytest.fixture(autouse=True)
def _pickle_test_module_by_value(request: pytest.FixtureRequest) -> None:
    """Workers cannot import test modules by name; ship their classes and functions by value."""
    module = request.module
    if module.__name__ not in ray.cloudpickle.cloudpickle._PICKLE_BY_VALUE_MODULES:
        ray.cloudpickle.register_pickle_by_value(module)


@pytest.fixture(scope="session", autouse=True)
def _stop_ray_at_end() -> Iterator[None]:
    yield
    stop_ray()


@pytest.fixture
def ray_wd(project: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Ray running with ``project`` as working_dir; the test's driver cwd is ``project``."""
    monkeypatch.chdir(project)
    ensure_ray({"working_dir": str(project), "excludes": ["artifacts/", "out/"]})
    return project


@pytest.fixture
def host(ray_wd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh driver cwd for tests that export relative paths (Ray keeps ``project``)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A real S3 HTTP API (moto server) on a random loopback port, stopped at the end."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def fault_proxy(moto_endpoint: str) -> Iterator[Any]:
    """The fault-injecting proxy in front of moto (see faultproxy.py)."""
    from tests.faultproxy import FaultProxy

    with FaultProxy(moto_endpoint) as proxy:
        yield proxy


class RsyncDaemon:
    """A real ``rsync --daemon`` on 127.0.0.1 with its own config file and port.

    Modules: ``runs`` (read-write, at ``self.root / "runs"``) and ``ro`` (read-only).
    """

    def __init__(self, base: Path) -> None:
        import socket
        import subprocess
        import time

        self.root = base
        (base / "runs").mkdir()
        (base / "ro").mkdir()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        conf = base / "rsyncd.conf"
        conf.write_text(
            f"pid file = {base}/rsyncd.pid\n"
            f"log file = {base}/rsyncd.log\n"
            "use chroot = false\n"
            f"uid = {os.getuid()}\n"
            f"gid = {os.getgid()}\n"
            f"[runs]\n  path = {base}/runs\n  read only = false\n"
            f"[ro]\n  path = {base}/ro\n  read only = true\n"
        )
        rsync = shutil.which("rsync")
        if rsync is None:
            pytest.fail("rsync is not installed (.ci/run installs it: apt-get install rsync)")
        self.proc = subprocess.Popen(
            [
                rsync,
                "--daemon",
                "--no-detach",
                f"--config={conf}",
                "--address=127.0.0.1",
                f"--port={self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"rsync daemon did not start: {self.log()}")
                time.sleep(0.05)
        self.url = f"rsync://127.0.0.1:{self.port}"

    def log(self) -> str:
        path = self.root / "rsyncd.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        import subprocess

        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def rsync_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RsyncDaemon]:
    daemon = RsyncDaemon(tmp_path_factory.mktemp("rsyncd"))
    yield daemon
    daemon.stop()


class Sshd:
    """A real sshd on 127.0.0.1 with its own host key, config, port and one client key.

    ``ssh_command`` is what a user passes as ``storage_options["ssh_command"]``.
    """

    def __init__(self, base: Path) -> None:
        import getpass
        import socket
        import subprocess
        import time

        sshd, keygen = shutil.which("sshd") or "/usr/sbin/sshd", shutil.which("ssh-keygen")
        if not os.path.exists(sshd) or keygen is None or shutil.which("ssh") is None:
            pytest.skip("openssh-server/client not installed (.ci/run installs them as root)")
        self.user = getpass.getuser()
        for name in ("host_key", "client_key"):
            subprocess.run(
                [keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(base / name)], check=True
            )
        (base / "authorized_keys").write_text((base / "client_key.pub").read_text())
        os.chmod(base / "authorized_keys", 0o600)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        conf = base / "sshd_config"
        conf.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {base}/host_key\n"
            f"AuthorizedKeysFile {base}/authorized_keys\nPidFile {base}/sshd.pid\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            "StrictModes no\nPermitRootLogin prohibit-password\n"
        )
        if os.getuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir
        self.log = base / "sshd.log"
        self.proc = subprocess.Popen(
            [sshd, "-D", "-f", str(conf), "-E", str(self.log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    text = self.log.read_text() if self.log.exists() else ""
                    pytest.skip(f"sshd cannot run here: {text[-500:]}")
                time.sleep(0.05)
        self.ssh_command = [
            "ssh",
            "-i",
            str(base / "client_key"),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
        ]

    def stop(self) -> None:
        import subprocess

        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


def s3_options(endpoint: str, **extra: Any) -> dict[str, Any]:
    """storage_options for s3fs against a test endpoint (moto accepts any credentials)."""
    return {
        "key": "testing-key-id",
        "secret": "testing-secret",
        "skip_instance_cache": True,
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        **extra,
    }


@pytest.fixture
def bucket(moto_endpoint: str, request: pytest.FixtureRequest) -> str:
    """A fresh bucket per test."""
    import boto3

    name = "b-" + "".join(c for c in request.node.name.lower() if c.isalnum())[:40]
    name += "-" + uuid.uuid4().hex[:8]
    boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        aws_access_key_id="x",
        aws_secret_access_key="x",
        region_name="us-east-1",
    ).create_bucket(Bucket=name)
    return name


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and mtime: to prove nothing was written."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def kept_workspace(error_text: str) -> Path:
    """The workspace an error message says the artifacts are kept in."""
    return Path(error_text.split("the artifacts are kept in ", 1)[1].split()[0])


def files_under(root: Path) -> dict[str, bytes]:
    """Relative path → contents of every regular file under ``root``."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def shared_pkg_dir() -> Path:
    """The shared unpacked working_dir, as an undecorated task sees it (its cwd).

    Defined inside a function so that Ray pickles it by value: workers cannot import test
    modules by name.
    """

    @ray.remote
    def cwd() -> str:
        return os.getcwd()

    return Path(ray.get(cwd.remote()))
