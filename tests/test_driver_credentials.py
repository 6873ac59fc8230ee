"""Workers without credentials (issue 21): ``storage_options={"credentials": "driver"}``.

The store here checks signatures: moto behind the proxy of tests/faultproxy.py with the
Signature V4 verifier of tests/sigv4.py, which refuses an unsigned request, a wrong signature
and an expired presigned URL, as S3 does (moto alone accepts anything)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray
import urllib3

import raysync
from raysync import isolated_export, rayshim
from tests import canary
from tests.destinations import Dest
from tests.faultproxy import FaultProxy
from tests.sigv4 import SigV4

KEY_ID = "AKIDRAYSYNCSIGNED"
MIB = 1024 * 1024


@dataclass
class Store:
    url: str
    bucket: str
    secret: str
    verifier: SigV4
    proxy: FaultProxy

    def options(self, **extra: Any) -> dict[str, Any]:
        return {
            "key": KEY_ID,
            "secret": self.secret,
            "skip_instance_cache": True,
            "client_kwargs": {"endpoint_url": self.url, "region_name": "us-east-1"},
            **extra,
        }

    def dest(self) -> Dest:
        import s3fs

        opts = self.options()
        fs = s3fs.S3FileSystem(**opts)
        prefix = f"s3://{self.bucket}/runs"
        return Dest("s3", prefix, opts, fs=fs, fs_root=f"{self.bucket}/runs")


@pytest.fixture
def store(moto_endpoint: str) -> Iterator[Store]:
    import boto3
    from botocore.config import Config

    secret = canary.new()
    verifier = SigV4(KEY_ID, secret)
    with FaultProxy(moto_endpoint, verify=verifier) as proxy:
        s3 = boto3.client(
            "s3",
            endpoint_url=proxy.url,
            aws_access_key_id=KEY_ID,
            aws_secret_access_key=secret,
            region_name="us-east-1",
            config=Config(signature_version="s3v4"),
        )
        bucket = f"signed-{canary.new()[-12:]}"
        s3.create_bucket(Bucket=bucket)
        yield Store(proxy.url, bucket, secret, verifier, proxy)


def _aws_env() -> list[str]:
    return sorted(k for k in os.environ if k.startswith("AWS_") and k != "AWS_CA_BUNDLE")


def test_the_store_refuses_unsigned_and_wrongly_signed_requests(store: Store) -> None:
    """The verifier is real: without it, moto would take these (the tests below rely on it)."""
    http = urllib3.PoolManager()
    anon = http.request("PUT", f"{store.url}/{store.bucket}/runs/x/f.txt", body=b"x")
    assert anon.status == 403
    import boto3

    wrong = boto3.client(
        "s3",
        endpoint_url=store.url,
        aws_access_key_id=KEY_ID,
        aws_secret_access_key="not-the-secret",
        region_name="us-east-1",
    )
    with pytest.raises(Exception, match="SignatureDoesNotMatch"):
        wrong.put_object(Bucket=store.bucket, Key="runs/x/f.txt", Body=b"x")
    assert store.dest().files() == {}


@pytest.mark.parametrize("pack", [0, 64 * 1024])
def test_a_worker_without_credentials_exports_small_large_and_packed_trees(
    store: Store, pack: int, ray_wd: Path, tmp_path: Path
) -> None:
    options = store.options(credentials="driver", upload_part_size=5 * MIB, upload_pack_below=pack)

    @ray.remote(max_retries=0)
    @isolated_export(f"s3://{store.bucket}/runs/{{name}}", storage_options=options)
    def call(name: str) -> dict[str, Any]:
        for i in range(30):
            Path(f"export/small/{i:02d}.txt").parent.mkdir(exist_ok=True)
            Path(f"export/small/{i:02d}.txt").write_text(f"file {i} of {name}\n" * (i + 1))
        Path("data/big.bin").write_bytes(os.urandom(12 * MIB + 123))  # three parts
        ws = raysync.current_workspace()
        return {"aws_env": _aws_env(), "pid": os.getpid(), "ws": str(ws.root)}

    # What Ray ships to the worker: the function (with its configuration) holds no secret.
    fn, _ = rayshim.remote_function_parts(call)
    assert store.secret.encode() not in ray.cloudpickle.dumps(fn)

    result = ray.get(call.remote("r1"), timeout=180)
    assert result.value["aws_env"] == []
    assert result.value["pid"] != os.getpid()  # it ran in a worker, not here
    assert store.secret not in repr(result.payload) and store.secret.encode() not in (
        ray.cloudpickle.dumps(result)
    )
    dest = store.dest()
    assert dest.verify("r1") == 0
    files = {f.path: f.size for f in result.manifest.files}
    assert files["data/big.bin"] == 12 * MIB + 123 and len(files) == 31
    packs = [k for k in dest.files("r1") if k.startswith(".raysync-pack-")]
    assert bool(packs) == (pack > 0)  # small files went in packs exactly when asked
    # The worker sent its data itself over presigned URLs: every request the store saw for
    # the run's objects carried a signature made by the driver's signer.
    sent = [p for m, p, s in store.proxy.log if m == "PUT" and "/runs/r1/" in p and s == 200]
    assert any("X-Amz-Signature=" in p for p in sent)
    assert store.verifier.refused == []
    # The driver reads the run back with its own result (materialize goes through the signer).
    out = tmp_path / "back"
    result.materialize(out)
    assert (out / "data/big.bin").stat().st_size == 12 * MIB + 123
    assert (out / "export/small/29.txt").read_text() == "file 29 of r1\n" * 30


def test_a_worker_cannot_write_outside_its_run_or_the_manifest(store: Store, ray_wd: Path) -> None:
    """The URLs a worker gets name its run's objects only: changed to another run's key or the
    manifest, the store refuses them; and the signer itself never signs a manifest or a lock,
    nor anything outside the destination root."""
    options = store.options(credentials="driver")

    @ray.remote(max_retries=0)
    @isolated_export(f"s3://{store.bucket}/runs/{{name}}", storage_options=options)
    def call(name: str) -> dict[str, Any]:
        from raysync_builtins.blob.engine_signed import SignedEngine
        from raysync_builtins.blob.signer import SignerClient
        from raysync_builtins.blob.store import Options

        Path("export/a.txt").write_text("a")
        opts, _ = Options.split(options_seen)
        engine = SignedEngine(opts.signer_target, opts)
        run = f"{bucket}/runs/{name}"
        # A URL for an object of a run of its own (not this call's run, which must stay
        # empty until its export takes the lock).
        url = engine._url("PUT", f"{run}-probe/export/a.txt")
        http = urllib3.PoolManager()
        tries = {
            "own": http.request("PUT", url, body=b"mine").status,
            "other run": http.request(
                "PUT", url.replace(f"/runs/{name}-probe/", "/runs/victim/"), body=b"x"
            ).status,
            "manifest": http.request(
                "PUT", url.replace("export/a.txt", "raysync-manifest.json"), body=b"{}"
            ).status,
        }
        client = SignerClient(opts.signer_target)
        refusals = {}
        for what, args in {
            "sign a manifest": ("presign", "PUT", [f"{run}/raysync-manifest.json"]),
            "sign a lock": ("presign", "PUT", [f"{run}/.raysync-lock"]),
            "sign outside the root": ("presign", "PUT", [f"{bucket}/elsewhere/x"]),
            "sign with ..": ("presign", "PUT", [f"{bucket}/runs/../elsewhere/x"]),
            "commit a manifest naming missing objects": (
                "put_control",
                f"{bucket}/runs/forged/raysync-manifest.json",
                _forged_manifest(),
                True,
            ),
        }.items():
            try:
                client.call(*args)
                refusals[what] = "accepted"
            except raysync.errors.RaySyncError as e:
                refusals[what] = type(e).__name__
        return {"tries": tries, "refusals": refusals}

    options_seen = {k: v for k, v in options.items() if k == "credentials"}
    bucket = store.bucket
    # The worker gets the options the decorator ships (without credentials) by itself; the
    # test hands it the signer's name the same way (from the shipped configuration).
    fn, _ = rayshim.remote_function_parts(call)
    shipped = _shipped_options(fn)
    assert "secret" not in shipped and "key" not in shipped and "client_kwargs" not in shipped
    options_seen.update(shipped)
    got = ray.get(call.remote("mine"), timeout=120).value
    assert got["tries"] == {"own": 200, "other run": 403, "manifest": 403}
    assert set(got["refusals"].values()) == {"DestinationError"}, got["refusals"]
    dest = store.dest()
    assert dest.files("victim") == {} and dest.files("forged") == {}
    assert dest.verify("mine") == 0  # the run committed by the signer, whole


def _forged_manifest() -> bytes:
    from raysync.manifest import FileEntry, Manifest

    ghost = FileEntry(path="export/ghost.bin", size=10, mode=0o644, digest="0" * 64)
    m = Manifest(files=[ghost], run={"status": "succeeded"}, trees=["export"])
    return m.to_bytes()


def _shipped_options(fn: Any) -> dict[str, Any]:
    """The storage options inside the configuration that travels with a decorated function."""
    for cell in fn.__closure__ or ():
        cfg = cell.cell_contents
        if hasattr(cfg, "target") and hasattr(cfg, "driver_held"):
            assert cfg.driver_held
            restored = ray.cloudpickle.loads(ray.cloudpickle.dumps(cfg))
            assert restored.driver_target is None
            return dict(restored.target.options)
    raise AssertionError("no configuration in the function's closure")


def test_an_expired_url_is_signed_again(store: Store, ray_wd: Path) -> None:
    """URLs that expire while the export runs are signed again: the export succeeds."""
    options = store.options(credentials="driver", upload_url_seconds=1, upload_part_size=5 * MIB)

    @isolated_export(f"s3://{store.bucket}/runs/{{name}}", storage_options=options)
    def call(name: str) -> None:
        Path("export/big.bin").write_bytes(os.urandom(11 * MIB))
        Path("export/small.txt").write_text("small")

    from raysync_builtins.blob import engine_signed

    real = engine_signed.SignedEngine._send
    slow = {"n": 0}

    def late(self: Any, method: str, url: str, body: Any = None, stream: bool = False) -> Any:
        if slow["n"] < 2 and method == "PUT":  # the first two requests wait past expiry
            slow["n"] += 1
            import time

            time.sleep(2.2)
        return real(self, method, url, body, stream)

    engine_signed.SignedEngine._send = late  # type: ignore[method-assign]
    try:
        result = call(name="late")
    finally:
        engine_signed.SignedEngine._send = real  # type: ignore[method-assign]
    assert store.dest().verify("late") == 0
    assert result.manifest.total_bytes == 11 * MIB + 5
    expired = [r for r in store.verifier.refused if r[2] == "AccessDenied"]
    assert expired, store.verifier.refused  # the store did refuse the late URLs


def test_a_retried_task_and_a_failure_leave_no_secret_anywhere(
    store: Store, ray_wd: Path, tmp_path: Path
) -> None:
    """The canary harness in driver mode: the secret is nowhere outside the driver (and its
    signer): not in any log, the KV, the destination, errors, the worker's environment, the
    shipped function or its results."""
    options = store.options(credentials="driver")
    marks = tmp_path / "marks"
    marks.mkdir()

    @ray.remote(max_retries=1)
    @isolated_export(f"s3://{store.bucket}/runs/{{name}}", storage_options=options)
    def call(name: str, how: str) -> str:
        return canary.act(name, how, marks)

    results = [ray.get(call.remote("ok", "succeed"), timeout=120)]
    results.append(ray.get(call.remote("again", "retry"), timeout=120))
    errors: list[BaseException] = []
    for args in (("bad", "fail"), ("ok", "succeed")):  # a failure; a conflict
        with pytest.raises(ray.exceptions.RayTaskError) as e:
            ray.get(call.remote(*args), timeout=120)
        errors.append(e.value)
    dest = store.dest()
    assert dest.verify("again") == 0
    found = canary.places(store.secret, errors=errors, destination=dest.files().items())
    fn, _ = rayshim.remote_function_parts(call)
    shipped = [fn, *results]
    found += ["shipped" for x in shipped if store.secret.encode() in ray.cloudpickle.dumps(x)]
    assert found == []


def test_node2_without_any_credentials_exports_to_s3(store: Store, node2: Any) -> None:
    """The second node has no credentials at all (no AWS_* anywhere, no key in the options
    its tasks receive) and cannot see the driver's disk: its export reaches S3 and verifies."""
    options = store.options(credentials="driver", upload_part_size=5 * MIB)

    @ray.remote(max_retries=0, **node2.options)
    @isolated_export(f"s3://{store.bucket}/runs/{{name}}", storage_options=options)
    def call(name: str) -> dict[str, Any]:
        Path("export/a.txt").write_text(name)
        Path("data/big.bin").write_bytes(os.urandom(6 * MIB))  # a multipart upload
        ctx = ray.get_runtime_context()
        return {"node": ctx.get_node_id(), "aws_env": _aws_env()}

    result = ray.get(call.remote("from-node2"), timeout=240)
    assert result.value == {"node": node2.node_id, "aws_env": []}
    assert store.dest().verify("from-node2") == 0
    assert store.verifier.refused == []


def test_the_signer_never_writes_over_a_committed_manifest(store: Store) -> None:
    """Whatever a caller asks, a manifest is written with the conditional create: a
    committed run is never replaced by a manifest someone hands the signer."""
    from raysync_builtins.blob import signer

    from raysync.manifest import Manifest

    root = f"s3://{store.bucket}/runs"
    tid = signer.worker_options(root, store.options(credentials="driver"))[signer.SIGNER_KEY]
    signer.prepare(root, store.options(credentials="driver"))
    client = signer.SignerClient(tid)
    empty = Manifest(files=[], run={"status": "succeeded"}, trees=["export"]).to_bytes()
    path = f"{store.bucket}/runs/once/raysync-manifest.json"
    client.call("put_control", path, empty, True)
    with pytest.raises(FileExistsError):
        client.call("put_control", path, empty, False)  # "overwrite", asked for: refused


@pytest.mark.parametrize("seconds", [0, 0.5, -1, 604_801, "900", True])
def test_a_url_lifetime_out_of_range_is_refused_at_decoration(store: Store, seconds: Any) -> None:
    options = store.options(credentials="driver", upload_url_seconds=seconds)
    with pytest.raises(raysync.errors.ConfigError, match="upload_url_seconds"):
        isolated_export(f"s3://{store.bucket}/runs/{{name}}", storage_options=options)


@ray.remote(num_cpus=0)
class Squatter:
    """An actor that took the signer's name first, recording what it is handed."""

    def __init__(self) -> None:
        self.got: list[Any] = []

    def allow(self, *args: Any) -> None:
        self.got.append(args)

    def seen(self) -> list[Any]:
        return self.got


def _name_free(name: str, namespace: str) -> bool:
    try:
        ray.get_actor(name, namespace=namespace)
    except ValueError:
        return True
    return False


def test_an_actor_squatting_the_signers_name_is_never_given_the_credentials(
    store: Store, ray_wd: Path
) -> None:
    import time

    from raysync_builtins.blob import signer

    ctx = ray.get_runtime_context()
    name, namespace = signer.signer_name(ctx.get_job_id()), ctx.namespace
    for key in [k for k in signer._ACTORS if k[1] == name]:  # this job's signer, if any: gone
        ray.kill(signer._ACTORS.pop(key))
    deadline = time.monotonic() + 30
    while not _name_free(name, namespace) and time.monotonic() < deadline:
        time.sleep(0.2)
    squat = Squatter.options(name=name, namespace=namespace).remote()  # type: ignore[attr-defined]
    ray.get(squat.seen.remote(), timeout=60)
    options = store.options(credentials="driver")
    try:
        with pytest.raises(raysync.errors.DestinationError, match="exists already"):
            signer.prepare(f"s3://{store.bucket}/runs", options)
        assert ray.get(squat.seen.remote(), timeout=60) == []  # handed nothing
    finally:
        ray.kill(squat)
    deadline = time.monotonic() + 30
    while not _name_free(name, namespace) and time.monotonic() < deadline:
        time.sleep(0.2)

    # Once the name is free again, the driver starts its own signer and a worker (which may
    # have known the killed one) exports through it.
    @ray.remote(max_retries=0)
    @isolated_export(f"s3://{store.bucket}/runs/{{name}}", storage_options=options)
    def call(name: str) -> None:
        Path("export/a.txt").write_text(name)

    ray.get(call.remote("after"), timeout=120)
    assert store.dest().verify("after") == 0


def test_the_drivers_own_temporary_credentials_are_kept_fresh(
    store: Store, ray_wd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The options name no credentials: the driver's own chain gives them, here through a
    ``credential_process`` profile whose credentials expire (as a role's do). When the store
    starts taking only new ones, exports still succeed: the driver hands them to its signer."""
    import sys
    import time

    current = tmp_path / "current-secret"
    current.write_text(store.secret)
    process = tmp_path / "creds.py"
    process.write_text(
        "import datetime, json, pathlib\n"
        "expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=5)\n"
        f"secret = pathlib.Path({str(current)!r}).read_text()\n"
        "print(json.dumps({'Version': 1, 'AccessKeyId': " + repr(KEY_ID) + ", "
        "'SecretAccessKey': secret, 'SessionToken': 'token-' + secret[-6:], "
        "'Expiration': expires.isoformat()}))\n"
    )
    config = tmp_path / "aws-config"
    config.write_text(
        f"[profile raysync-rotating]\ncredential_process = {sys.executable} {process}\n"
    )
    for name in [k for k in os.environ if k.startswith("AWS_") and k != "AWS_CA_BUNDLE"]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_PROFILE", "raysync-rotating")
    monkeypatch.setenv("RAYSYNC_CREDENTIALS_CHECK_SECONDS", "0.2")
    options = {
        "skip_instance_cache": True,
        "client_kwargs": {"endpoint_url": store.url, "region_name": "us-east-1"},
        "credentials": "driver",
    }

    @ray.remote(max_retries=0)
    @isolated_export(f"s3://{store.bucket}/runs/{{name}}", storage_options=options)
    def call(name: str) -> list[str]:
        Path("export/a.txt").write_text(name)
        return _aws_env()

    assert ray.get(call.remote("before"), timeout=120).value == []
    rotated = canary.new()
    current.write_text(rotated)
    store.verifier.secret = rotated  # from now on the store takes only the new secret
    time.sleep(1.5)  # a few of the driver's checks
    ray.get(call.remote("after"), timeout=120)
    dest = store.dest()
    dest.options = {**(dest.options or {}), "secret": rotated}
    import s3fs

    dest.fs = s3fs.S3FileSystem(**dest.options)
    assert dest.verify("before") == 0 and dest.verify("after") == 0
