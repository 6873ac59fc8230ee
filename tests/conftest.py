"""Shared fixtures: one real local Ray at a time, bound to loopback, with a project working_dir."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray

import raysync.demo

NODE_IP = "127.0.0.2"  # Ray rewrites 127.0.0.1 to the outward address; 127.0.0.2 stays local

# pytest imports this file as ``conftest`` and the tests import it as ``tests.conftest``: two
# module objects. The running cluster's runtime_env is kept where both see it.
_STATE_VAR = "RAYSYNC_TESTS_RAY_ENV"
METRICS_PORT_VAR = "RAYSYNC_TESTS_METRICS_PORT"


def ensure_ray(runtime_env: dict[str, Any] | None) -> None:
    """Start a local Ray with ``runtime_env``, restarting it if another one is running."""
    wanted = json.dumps(runtime_env, sort_keys=True)
    if ray.is_initialized() and os.environ.get(_STATE_VAR) == wanted:
        return
    if ray.is_initialized():
        stop_node2()
        ray.shutdown()
    port = free_port(NODE_IP)
    ray.init(
        address="local",
        _node_ip_address=NODE_IP,
        include_dashboard=False,
        num_cpus=8,  # logical slots: the tasks here sleep or do little I/O
        runtime_env=runtime_env,
        configure_logging=False,
        _metrics_export_port=port,  # Prometheus text on loopback (tests/test_metrics.py)
    )
    os.environ[_STATE_VAR] = wanted
    os.environ[METRICS_PORT_VAR] = str(port)


def stop_ray() -> None:
    stop_node2()
    if ray.is_initialized():
        ray.shutdown()
    os.environ.pop(_STATE_VAR, None)


# -- a second node that cannot see the host's files (CRAFT.md) ------------------------------

NODE2_IP = "127.0.0.3"
_NODE2_VAR = "RAYSYNC_TESTS_NODE2"  # {"pgid": ..., "gcs": ...} of the running second node


def stop_node2() -> None:
    """Stop the second node (by its process group id) if one runs."""
    import signal
    import time

    state = os.environ.pop(_NODE2_VAR, None)
    if not state:
        return
    pgid = json.loads(state)["pgid"]
    # SIGKILL to the whole group (raylet, its workers, the namespace's shell): a SIGTERM makes
    # the node drain for up to 30 s, and nothing on it needs a graceful end.
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pgid, os.WNOHANG)  # reap the group leader, our child (else a zombie)
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def start_node2(hide: list[Path]) -> str:
    """Join a second Ray node to the running cluster from a private mount namespace in which
    ``hide`` and ``/tmp/ray`` are empty tmpfs mounts; it offers the resource ``node2``.
    Returns its node id. Skips the test when ``unshare`` is not permitted."""
    import shlex
    import subprocess
    import sys
    import time

    gcs = ray.get_runtime_context().gcs_address
    state = os.environ.get(_NODE2_VAR)
    if state and json.loads(state)["gcs"] == gcs:
        alive = [n for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == NODE2_IP]
        if alive:
            return str(alive[0]["NodeID"])
    stop_node2()
    unshare = shutil.which("unshare")
    probe = subprocess.run(
        [unshare or "unshare", "-m", "--propagation", "private", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    if unshare is None or probe.returncode != 0:
        pytest.skip(f"a private mount namespace is not permitted here: {probe.stderr.strip()}")
    ray_bin = str(Path(sys.executable).with_name("ray"))
    mounts = " && ".join(f"mount -t tmpfs none {shlex.quote(str(p))}" for p in [*hide, "/tmp/ray"])
    start = shlex.join(
        [
            ray_bin,
            "start",
            f"--address={gcs}",
            f"--node-ip-address={NODE2_IP}",
            "--resources=" + json.dumps({"node2": 1000}),
            "--num-cpus=4",
            "--object-store-memory=400000000",
            "--block",
        ]
    )
    log = Path(tempfile.gettempdir()) / f"raysync-node2-{os.getpid()}.log"
    proc = subprocess.Popen(
        [unshare, "-m", "--propagation", "private", "sh", "-c", f"{mounts} && exec {start}"],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd="/",  # as `ray start` on a real node, from a directory that exists there
        env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"},
    )
    os.environ[_NODE2_VAR] = json.dumps({"pgid": proc.pid, "gcs": gcs})
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        alive = [n for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == NODE2_IP]
        if alive:
            return str(alive[0]["NodeID"])
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    stop_node2()
    pytest.fail(f"the second node did not join: {log.read_text()[-2000:]}")


@dataclass
class Node2:
    node_id: str
    driver_node_id: str
    hidden: list[Path]

    #: Task options that place a call on the second node.
    options = {"resources": {"node2": 1}}  # noqa: RUF012 - read-only


@pytest.fixture
def node2(ray_wd: Path, tmp_path_factory: pytest.TempPathFactory) -> Node2:
    """A second node on the test's Ray that cannot see the host's test files or /tmp/ray."""
    hidden = [tmp_path_factory.getbasetemp()]
    node_id = start_node2(hidden)
    return Node2(node_id, ray.get_runtime_context().get_node_id(), hidden)


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


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class LoopbackServer:
    """A server process the tests start on 127.0.0.1 and stop by its process id."""

    port: int

    def start(self, argv: list[str], what: str, log: Path, *, skip: bool = False) -> None:
        """Start ``argv`` and wait (bounded) until it accepts connections on ``self.port``;
        otherwise fail (or skip, when ``skip``) with the end of its ``log``."""
        import socket
        import subprocess
        import time

        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        said = log.read_text()[-500:] if log.exists() else ""
        (pytest.skip if skip else pytest.fail)(f"{what} did not start: {said}")

    def stop(self) -> None:
        import subprocess

        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


class RsyncDaemon(LoopbackServer):
    """A real ``rsync --daemon`` on 127.0.0.1 with its own config file and port.

    Modules: ``runs`` (read-write, at ``self.root / "runs"``), ``ro`` (read-only) and
    ``denied`` (writable, but the daemon writes as uid 65534 into a directory it does not own:
    permission denied, when the tests run as root).
    """

    def __init__(self, base: Path) -> None:
        self.root = base
        (base / "runs").mkdir()
        (base / "ro").mkdir()
        (base / "denied").mkdir(mode=0o755)
        self.port = free_port()
        conf = base / "rsyncd.conf"
        conf.write_text(
            f"pid file = {base}/rsyncd.pid\n"
            f"log file = {base}/rsyncd.log\n"
            "use chroot = false\n"
            f"uid = {os.getuid()}\n"
            f"gid = {os.getgid()}\n"
            f"[runs]\n  path = {base}/runs\n  read only = false\n"
            f"[ro]\n  path = {base}/ro\n  read only = true\n"
            # Writable, but served as an unprivileged user into a directory it cannot write.
            f"[denied]\n  path = {base}/denied\n  read only = false\n"
            "  uid = 65534\n  gid = 65534\n"
        )
        rsync = shutil.which("rsync")
        if rsync is None:
            pytest.fail("rsync is not installed (.ci/run installs it: apt-get install rsync)")
        argv = [rsync, "--daemon", "--no-detach", f"--config={conf}", "--address=127.0.0.1"]
        self.start([*argv, f"--port={self.port}"], "rsync daemon", base / "rsyncd.log")
        self.url = f"rsync://127.0.0.1:{self.port}"


@pytest.fixture(scope="session")
def rsync_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RsyncDaemon]:
    daemon = RsyncDaemon(tmp_path_factory.mktemp("rsyncd"))
    yield daemon
    daemon.stop()


class Sshd(LoopbackServer):
    """A real sshd on 127.0.0.1 with its own host key, config, port and one client key.

    ``ssh_command`` is what a user passes as ``storage_options["ssh_command"]``.
    """

    def __init__(self, base: Path) -> None:
        import getpass
        import subprocess

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
        self.port = free_port()
        conf = base / "sshd_config"
        conf.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {base}/host_key\n"
            f"AuthorizedKeysFile {base}/authorized_keys\nPidFile {base}/sshd.pid\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            "StrictModes no\nPermitRootLogin prohibit-password\n"
        )
        if os.getuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir
        log = base / "sshd.log"
        self.start([sshd, "-D", "-f", str(conf), "-E", str(log)], "sshd", log, skip=True)
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
            # One connection shared by every rsync of the session (as a user's ssh config
            # would): the tests pay the key exchange once, not once per transfer.
            "-o",
            "ControlMaster=auto",
            "-o",
            f"ControlPath={base}/cm-%C",
            "-o",
            "ControlPersist=300",
        ]
        self._control = base

    def stop(self) -> None:
        import subprocess

        for sock in self._control.glob("cm-*"):  # the shared connection's master process
            subprocess.run(
                ["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "x"],
                capture_output=True,
                timeout=10,
                check=False,
            )
        super().stop()


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


def committed(run: Path) -> Any:
    """The manifest of the committed run at ``run``, after verifying every file against it."""
    from raysync.manifest import MANIFEST_NAME, Manifest, verify_files

    manifest = Manifest.from_bytes((run / MANIFEST_NAME).read_bytes())
    verify_files(manifest, run, uri=str(run))
    return manifest


@contextlib.contextmanager
def polling_reader(run: Path) -> Iterator[list[str]]:
    """A reader that polls ``run`` every 10 ms while the block runs; the list it yields
    collects every time it found the run present but not complete and verifying."""
    import threading
    import time

    seen_bad: list[str] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            if run.exists():
                try:
                    committed(run)
                except Exception as e:  # noqa: BLE001 - recorded for the test to assert on
                    seen_bad.append(repr(e))
            time.sleep(0.01)

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        yield seen_bad
    finally:
        stop.set()
        thread.join(timeout=10)


def pytest_report_header(config: pytest.Config) -> str:
    return f"hypothesis seed: {config.getoption('hypothesis_seed', None)} (pyproject.toml)"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed property-based test says which seed drew its examples."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and getattr(getattr(item, "obj", None), "is_hypothesis_test", False):
        seed = item.config.getoption("hypothesis_seed", None)
        report.sections.append(("hypothesis", f"seed: {seed} (rerun: --hypothesis-seed={seed})"))
