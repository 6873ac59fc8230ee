"""rsync backend with the real rsync binary: a mounted path, a daemon the tests start on
127.0.0.1, a transfer killed mid-way, read-only and missing destinations, hostile names."""

from __future__ import annotations

import random
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest
import ray

from raysync import isolated_export
from raysync.errors import (
    ConfigError,
    DestinationNotVisibleError,
    ExportError,
    MissingDependencyError,
    RunExistsError,
)
from raysync.manifest import MANIFEST_NAME
from tests.conftest import (
    RsyncDaemon,
    Sshd,
    committed,
    files_under,
    kept_workspace,
    polling_reader,
)

# Names rsync would take for options if they ever reached its command line.
HOSTILE = ["-e evil", "--rsh=touch pwned", "--delete", "-", "a b\nc.txt", "--"]


def write_trees() -> dict[str, bytes]:
    """Writes a small mixed tree in the call's workspace and returns what it wrote."""
    out = {}
    for i, name in enumerate(HOSTILE):
        out[f"export/{name}"] = f"hostile {i}".encode()
    out["export/sub/deeper/model.bin"] = random.Random(3).randbytes(3 * 1024 * 1024 + 7)
    out["data/table.csv"] = b"a,b\n1,2\n"
    out["artifacts/empty.txt"] = b""
    for rel, data in out.items():
        Path(rel).parent.mkdir(parents=True, exist_ok=True)
        Path(rel).write_bytes(data)
    return out


def test_export_to_a_mounted_path_verifies_and_leaves_no_staging(
    ray_wd: Path, tmp_path: Path
) -> None:
    mount = tmp_path / "nfs"

    @ray.remote(max_retries=0)
    @isolated_export(f"rsync://{mount}/runs/{{run_id}}")
    def run(run_id: str) -> dict[str, bytes]:
        return write_trees()

    r = ray.get(run.remote("m1"))
    dest = mount / "runs" / "m1"
    assert r.uri == f"rsync://{dest}"
    manifest = committed(dest)
    got = files_under(dest)
    got.pop(MANIFEST_NAME)
    assert got == r.value  # every file, hostile names included, byte for byte
    assert sorted(f.path for f in manifest.files) == sorted(r.value)
    # No staging or partial directories left next to or inside the run.
    assert sorted(p.name for p in (mount / "runs").iterdir()) == [".raysync-visible", "m1"]
    assert not any(".raysync-partial" in str(p) for p in dest.rglob("*"))
    # Nothing was executed: no "pwned" file in the driver's dir, the run or the mount.
    assert not list(mount.rglob("pwned")) and not (ray_wd / "pwned").exists()
    # rsync's own figures feed the stats.
    assert r.stats.extra["rsync_transferred_files"] == len(r.value)
    assert r.stats.extra["rsync_attempts"] == 1
    # And the files come back through the backend.
    out = r.materialize(tmp_path / "pulled")
    assert files_under(out) == r.value


def test_export_to_an_rsync_daemon_and_read_back(
    ray_wd: Path, rsync_daemon: RsyncDaemon, tmp_path: Path
) -> None:
    @ray.remote(max_retries=0)
    @isolated_export(f"{rsync_daemon.url}/runs/exp/{{run_id}}")
    def run(run_id: str) -> dict[str, bytes]:
        return write_trees()

    r = ray.get(run.remote("d1"))
    on_disk = rsync_daemon.root / "runs" / "exp" / "d1"
    manifest = committed(on_disk)
    assert len(manifest.files) == len(r.value)
    assert sorted(p.name for p in on_disk.iterdir()) == sorted(
        ["export", "data", "artifacts", MANIFEST_NAME]
    )  # no partial or delay-updates directories left
    out = r.materialize(tmp_path / "pulled")
    assert files_under(out) == r.value

    # A second, different call to the same run is refused; the committed run is untouched.
    @ray.remote(max_retries=0)
    @isolated_export(f"{rsync_daemon.url}/runs/exp/{{run_id}}")
    def other(run_id: str) -> None:
        Path("export/other.txt").write_text("other")

    with pytest.raises(RunExistsError):
        ray.get(other.remote("d1"))
    assert committed(on_disk).run["task_id"] == manifest.run["task_id"]


def test_export_over_ssh_to_a_real_sshd_and_read_back(
    ray_wd: Path, sshd: Sshd, tmp_path: Path
) -> None:
    remote = tmp_path / "over-ssh"  # "remote": the sshd runs on this machine

    @ray.remote(max_retries=0)
    @isolated_export(
        f"rsync+ssh://{sshd.user}@127.0.0.1:{sshd.port}{remote}/runs/{{run_id}}",
        storage_options={"ssh_command": sshd.ssh_command, "retries": 0},
    )
    def run(run_id: str) -> dict[str, bytes]:
        return write_trees()

    r = ray.get(run.remote("s1"))
    on_disk = remote / "runs" / "s1"
    manifest = committed(on_disk)
    assert sorted(f.path for f in manifest.files) == sorted(r.value)
    assert files_under(r.materialize(tmp_path / "pulled")) == r.value
    assert not list(tmp_path.rglob("pwned"))


def find_rsync(marker: str) -> psutil.Process | None:
    """The rsync process we started whose arguments mention ``marker`` (its parent)."""
    found = []
    for p in psutil.process_iter(["name", "cmdline", "ppid"]):
        cmd = p.info["cmdline"] or []
        if p.info["name"] == "rsync" and any(marker in a for a in cmd):
            found.append(p)
    pids = {p.pid for p in found}
    top = [p for p in found if p.info["ppid"] not in pids]
    return top[0] if top else None


def test_rsync_killed_mid_transfer_is_retried_and_nothing_partial_is_committed(
    ray_wd: Path, tmp_path: Path
) -> None:
    mount = tmp_path / "slow"
    size = 24 * 1024 * 1024
    content = random.Random(5).randbytes(size)

    # --bwlimit makes the transfer take seconds, so the test can kill rsync in the middle.
    @ray.remote(max_retries=0)
    @isolated_export(
        f"rsync://{mount}/runs/{{run_id}}",
        storage_options={"bwlimit": 6000, "retries": 2, "retry_base_delay": 0.05},
    )
    def run(run_id: str) -> int:
        Path("data/big.bin").write_bytes(content)
        return len(content)

    dest = mount / "runs" / "k1"
    # A reader polling the run the whole time never sees it without a complete manifest.
    with polling_reader(dest) as seen_partial_commit:
        ref = run.remote("k1")
        killed = None
        deadline = time.monotonic() + 60
        while killed is None and time.monotonic() < deadline:
            proc = find_rsync(str(mount))
            staged = list((mount / "runs").glob(".k1.raysync-staging-*/**/*big.bin*"))
            if proc is not None and staged and any(p.stat().st_size > 0 for p in staged):
                proc.send_signal(signal.SIGKILL)
                killed = proc.pid
            time.sleep(0.05)
        assert killed is not None, "rsync never started transferring"
        r = ray.get(ref, timeout=120)
    assert seen_partial_commit == []
    assert r.stats.extra["rsync_attempts"] >= 2
    # The retry resumed from the killed attempt's partial file (--partial-dir) rather than
    # sending everything again: rsync matched some of the data against it.
    assert r.stats.extra["rsync_matched_bytes"] > 0
    assert (dest / "data" / "big.bin").read_bytes() == content
    committed(dest)
    assert [p.name for p in (mount / "runs").iterdir() if "staging" in p.name] == []


def test_rsync_killed_with_no_retries_left_fails_clearly_and_leaves_nothing_on_the_mount(
    ray_wd: Path, tmp_path: Path
) -> None:
    mount = tmp_path / "doomed"
    content = random.Random(6).randbytes(16 * 1024 * 1024)

    @ray.remote(max_retries=0)
    @isolated_export(
        f"rsync://{mount}/runs/{{run_id}}", storage_options={"bwlimit": 4000, "retries": 0}
    )
    def run(run_id: str) -> None:
        Path("data/big.bin").write_bytes(content)

    ref = run.remote("x1")
    deadline = time.monotonic() + 60
    killed = False
    while not killed and time.monotonic() < deadline:
        proc = find_rsync(str(mount))
        if proc is not None and list((mount / "runs").glob(".x1.raysync-staging-*/**/*big*")):
            proc.send_signal(signal.SIGKILL)
            killed = True
        time.sleep(0.05)
    assert killed, "rsync never started transferring"
    with pytest.raises(ExportError) as info:
        ray.get(ref, timeout=120)
    text = str(info.value)
    assert "killed by a signal" in text and "nothing was committed" in text
    assert sorted(p.name for p in (mount / "runs").iterdir()) == [".raysync-visible"]
    assert (kept_workspace(text) / "data" / "big.bin").read_bytes() == content


def test_read_only_daemon_module_fails_clearly_and_keeps_the_artifacts(
    ray_wd: Path, rsync_daemon: RsyncDaemon
) -> None:
    @ray.remote(max_retries=0)
    @isolated_export(f"{rsync_daemon.url}/ro/runs/{{run_id}}", storage_options={"retries": 0})
    def run(run_id: str) -> None:
        Path("export/result.txt").write_text("precious")

    with pytest.raises(ExportError) as info:
        ray.get(run.remote("ro1"))
    text = str(info.value)
    assert "read only" in text and "nothing was committed" in text
    assert (kept_workspace(text) / "export" / "result.txt").read_text() == "precious"
    assert list((rsync_daemon.root / "ro").iterdir()) == []


def test_permission_denied_on_the_destination_fails_clearly_and_keeps_the_artifacts(
    ray_wd: Path, rsync_daemon: RsyncDaemon
) -> None:
    import os

    if os.getuid() != 0:
        pytest.skip("the daemon can only switch to another user when the tests run as root")

    @ray.remote(max_retries=0)
    @isolated_export(f"{rsync_daemon.url}/denied/runs/{{run_id}}", storage_options={"retries": 0})
    def run(run_id: str) -> None:
        Path("export/result.txt").write_text("precious")

    with pytest.raises(ExportError) as info:
        ray.get(run.remote("p1"))
    text = str(info.value)
    assert "Permission denied" in text and "not writable" in text
    assert (kept_workspace(text) / "export" / "result.txt").read_text() == "precious"
    assert list((rsync_daemon.root / "denied").iterdir()) == []


def test_unreachable_daemon_fails_clearly_after_retries(ray_wd: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed

    @ray.remote(max_retries=0)
    @isolated_export(
        f"rsync://127.0.0.1:{port}/runs/{{run_id}}",
        storage_options={"retries": 1, "retry_base_delay": 0.01},
    )
    def run(run_id: str) -> None:
        Path("export/result.txt").write_text("precious")

    with pytest.raises(ExportError) as info:
        ray.get(run.remote("u1"))
    text = str(info.value)
    assert "Connection refused" in text and "reachable" in text
    assert (kept_workspace(text) / "export" / "result.txt").read_text() == "precious"


def test_missing_mount_on_the_worker_is_refused_not_created(ray_wd: Path, tmp_path: Path) -> None:
    mount = tmp_path / "gone"

    @ray.remote(max_retries=0)
    @isolated_export(f"rsync://{mount}/runs/{{run_id}}")
    def run(run_id: str) -> None:
        Path("export/result.txt").write_text("precious")

    ray.get(run.remote("warmup"))  # the driver prepared the root; the first run lands
    shutil.rmtree(mount)  # now the "mount" is gone, as on a node that does not mount it
    with pytest.raises(DestinationNotVisibleError) as info:
        ray.get(run.remote("g1"))
    assert not mount.exists()  # nothing created on the worker's own disk
    assert (kept_workspace(str(info.value)) / "export" / "result.txt").exists()


def test_rsync_not_installed_says_how_to_install_it(ray_wd: Path) -> None:
    @ray.remote(max_retries=0)
    @isolated_export(
        "rsync://127.0.0.1:1/runs/{run_id}", storage_options={"rsync_binary": "rsync-not-here"}
    )
    def run(run_id: str) -> None:
        Path("export/result.txt").write_text("precious")

    with pytest.raises(MissingDependencyError) as info:
        ray.get(run.remote("n1"))
    assert "apt-get install rsync" in str(info.value)
    assert (kept_workspace(str(info.value)) / "export" / "result.txt").exists()


@pytest.mark.parametrize(
    ("uri", "options", "says"),
    [
        ("rsync://relative/path", {}, "module and a path"),
        ("rsync://host/module-only", {}, "module and a path"),
        ("rsync://user:secret@host/m/p", {}, "password"),
        ("rsync://-oProxyCommand=x/m/p", {}, "valid host"),
        ("rsync+ssh://host", {}, "remote path"),
        ("rsync:///mnt/runs/{run_id}", {"bwlimit": -1}, "non-negative"),
        ("rsync:///mnt/runs/{run_id}", {"rsync_args": ["-x"]}, "unknown storage_options"),
        ("rsync+ssh://h/p/{run_id}", {"ssh_command": "ssh -i key"}, "list of arguments"),
    ],
)
def test_bad_rsync_targets_fail_at_decoration(uri: str, options: dict, says: str) -> None:
    with pytest.raises(ConfigError) as info:

        @isolated_export(uri, storage_options=options)
        def f(run_id: str) -> None:
            pass

    assert says in str(info.value)
    assert "secret" not in str(info.value)


def test_no_user_string_reaches_rsyncs_command_line(tmp_path: Path) -> None:
    """The argv raysync builds holds only its own paths, whatever the files are called."""
    from raysync_builtins.rsync import Options, Remote, Rsync

    r = Rsync(Options(), Remote.parse("rsync://127.0.0.1:873/mod/runs/x"))
    argv = r.base_args()
    assert argv[0] == shutil.which("rsync")
    assert "--secluded-args" in argv
    assert all(not a.startswith("-e") for a in argv[1:])  # no remote shell for daemons
    assert Remote.parse("rsync+ssh://me@example.org:2222/srv/x").url() == "me@example.org:/srv/x"
    ssh = Rsync(Options(ssh_command=("ssh", "-i", "/k")), Remote.parse("rsync+ssh://h:2222/p"))
    assert ssh.base_args()[ssh.base_args().index("-e") + 1] == "ssh -i /k -p 2222"
    # A daemon password travels in the environment, never on the command line.
    pw = Rsync(Options(password="s3cret-pw"), Remote.parse("rsync://u@h/m/p"))
    assert pw.env()["RSYNC_PASSWORD"] == "s3cret-pw"
    assert not any("s3cret-pw" in a for a in pw.base_args())
    assert "s3cret-pw" not in repr(Options(password="s3cret-pw"))


def test_rsync_dies_with_the_worker_that_started_it(tmp_path: Path) -> None:
    """A worker killed mid-export (the OOM killer) must not leave its rsync writing into a
    staging directory that the call's retry will commit."""
    import subprocess
    import sys

    if shutil.which("setpriv") is None:
        pytest.skip("util-linux's setpriv is not installed (Debian has it in every system)")
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "big.bin").write_bytes(random.randbytes(4 * 1024 * 1024))
    script = (
        "import sys\n"
        "sys.path.insert(0, 'plugins')\n"
        "from raysync_builtins.rsync import Options, Remote, Rsync\n"
        "r = Rsync(Options.parse({'bwlimit': 100}), Remote('mount', sys.argv[2]))\n"
        "r.run(['-a', sys.argv[1] + '/', sys.argv[2] + '/'], 'data')\n"
    )
    worker = subprocess.Popen(
        [sys.executable, "-c", script, str(src), str(dst)], cwd=Path(__file__).parents[1]
    )
    try:
        deadline = time.monotonic() + 30
        children: list[psutil.Process] = []
        while time.monotonic() < deadline and not children:
            children = [
                p
                for p in psutil.Process(worker.pid).children(recursive=True)
                if "rsync" in p.name()
            ]
            time.sleep(0.1)
        assert children, "rsync did not start"
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], f"rsync outlived its worker: {alive}"
    finally:
        worker.kill()
        for p in psutil.process_iter(["cmdline"]):
            if str(dst) in " ".join(p.info["cmdline"] or []):
                p.kill()
