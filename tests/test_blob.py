"""fsspec-blob backend: S3 against a real S3 HTTP endpoint (moto server on loopback, behind a
fault-injecting proxy), memory://, retries, persistent failures, secrets, conflicts."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import ray
from hypothesis import given, settings
from hypothesis import strategies as st

from raysync import checksum, isolated_export
from raysync.errors import (
    ConfigError,
    ExportError,
    MissingDependencyError,
    RunExistsError,
    TreeError,
)
from raysync.manifest import MANIFEST_NAME, Manifest
from tests.conftest import files_under, kept_workspace, s3_options

# Fast retries. On the fsspec engine: ours, with botocore's own retries off (s3fs still
# retries SlowDown and dropped connections itself, up to 5 times, below ours; it has no
# option to turn that off). On the obstore engine: its client's, per request and per part.
FAST_RETRY = {
    "fsspec": {
        "engine": "fsspec",
        "upload_retry_base_delay": 0.01,
        "upload_retry_max_delay": 0.05,
        "config_kwargs": {"retries": {"max_attempts": 1}},
    },
    "obstore": {
        "engine": "obstore",
        "upload_retry_base_delay": 0.01,
        "upload_retry_max_delay": 0.05,
    },
}
ENGINES = sorted(FAST_RETRY)
BIG = 64 * 1024 * 1024


def small_content(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * 32  # 1 KiB


def big_content(seed: int) -> bytes:
    return random.Random(seed).randbytes(BIG)


def s3fs_for(endpoint: str) -> Any:
    import s3fs

    return s3fs.S3FileSystem(**s3_options(endpoint))


@pytest.mark.parametrize("engine", ENGINES)
def test_s3_end_to_end_many_small_and_two_large_files_manifest_last(
    engine: str, ray_wd: Path, bucket: str, fault_proxy: Any, moto_endpoint: str, tmp_path: Path
) -> None:
    fault_proxy.reset()

    @ray.remote(max_retries=0)
    @isolated_export(
        f"s3://{bucket}/runs/{{run_id}}", storage_options=s3_options(fault_proxy.url, engine=engine)
    )
    def run(run_id: str) -> int:
        for i in range(1000):
            d = Path(f"export/part-{i % 10}")
            d.mkdir(exist_ok=True)
            (d / f"{i}.bin").write_bytes(small_content(i))
        for seed in (1, 2):
            Path(f"data/big-{seed}.bin").write_bytes(big_content(seed))
        return 1002

    r = ray.get(run.remote("e2e"))
    assert r.value == 1002 and r.uri == f"s3://{bucket}/runs/e2e"
    assert r.stats.files == 1002 and r.stats.bytes == 1000 * 1024 + 2 * BIG
    # Re-download through plain s3fs, straight from moto: byte for byte.
    fs = s3fs_for(moto_endpoint)
    run_key = f"{bucket}/runs/e2e"
    keys = {k.removeprefix(run_key + "/") for k in fs.find(run_key)}
    expected = {f"export/part-{i % 10}/{i}.bin" for i in range(1000)}
    expected |= {"data/big-1.bin", "data/big-2.bin", MANIFEST_NAME}
    assert keys == expected  # nothing else: no lock, no staging leftovers
    for i in random.Random(0).sample(range(1000), 50):
        assert fs.cat_file(f"{run_key}/export/part-{i % 10}/{i}.bin") == small_content(i)
    for seed in (1, 2):
        got = fs.cat_file(f"{run_key}/data/big-{seed}.bin")
        assert hashlib.sha256(got).digest() == hashlib.sha256(big_content(seed)).digest()
    manifest = Manifest.from_bytes(fs.cat_file(f"{run_key}/{MANIFEST_NAME}"))
    assert len(manifest.files) == 1002 and manifest.status == "succeeded"
    # The manifest was the last object written (only lock/stale deletes come after it).
    writes = [
        (m, p)
        for m, p, status in fault_proxy.log
        if m in ("PUT", "POST") and status < 300 and not p.endswith("?delete")
    ]
    assert MANIFEST_NAME in writes[-1][1]
    assert sum(1 for _, p in writes if "uploadId" in p and "partNumber" in p) >= 16  # multipart
    # And read back through the backend.
    out = r.materialize(tmp_path / "pulled")
    assert files_under(out)["data/big-2.bin"] == big_content(2)


@pytest.mark.parametrize("engine", ENGINES)
def test_transient_503s_and_dropped_connections_are_retried_to_a_complete_run(
    engine: str, ray_wd: Path, bucket: str, fault_proxy: Any, moto_endpoint: str
) -> None:
    fault_proxy.reset()

    @ray.remote(max_retries=0)
    @isolated_export(
        f"s3://{bucket}/flaky/{{run_id}}",
        storage_options=s3_options(fault_proxy.url, **FAST_RETRY[engine]),
    )
    def run(run_id: str) -> None:
        for i in range(40):
            Path(f"export/{i}.bin").write_bytes(small_content(i))

    fault_proxy.fail_next = 25
    fault_proxy.drop_next = 3
    r = ray.get(run.remote("f1"))
    assert sum(1 for _, _, s in fault_proxy.log if s == 503) >= 25
    fs = s3fs_for(moto_endpoint)
    manifest = Manifest.from_bytes(fs.cat_file(f"{bucket}/flaky/f1/{MANIFEST_NAME}"))
    for f in manifest.files:
        data = fs.cat_file(f"{bucket}/flaky/f1/{f.path}")
        assert checksum.of_bytes(data, manifest.checksum) == f.digest
    assert len(manifest.files) == 40 == r.stats.files


def test_the_obstore_engine_commits_a_complete_run_with_a_503_in_every_ten_requests(
    ray_wd: Path, bucket: str, fault_proxy: Any, moto_endpoint: str
) -> None:
    fault_proxy.reset()
    part = 5 * 1024 * 1024
    big = random.Random(3).randbytes(3 * part + 7)  # a multipart upload of four parts
    opts = s3_options(fault_proxy.url, upload_part_size=part, **FAST_RETRY["obstore"])

    @ray.remote(max_retries=0)
    @isolated_export(f"s3://{bucket}/every10/{{run_id}}", storage_options=opts)
    def run(run_id: str) -> None:
        for i in range(200):
            Path(f"export/{i % 7}").mkdir(exist_ok=True)
            Path(f"export/{i % 7}/{i}.bin").write_bytes(small_content(i))
        Path("data/big.bin").write_bytes(big)

    fault_proxy.fail_every = 10
    r = ray.get(run.remote("e1"))
    failed = sum(1 for _, _, s in fault_proxy.log if s == 503)
    fault_proxy.reset()
    assert r.stats.extra["engine"] == "obstore"
    assert failed >= 20  # one request in ten answered 503, and each was retried
    fs = s3fs_for(moto_endpoint)
    run_key = f"{bucket}/every10/e1"
    manifest = Manifest.from_bytes(fs.cat_file(f"{run_key}/{MANIFEST_NAME}"))
    assert len(manifest.files) == 201 == r.stats.files
    for f in manifest.files:
        assert checksum.of_bytes(fs.cat_file(f"{run_key}/{f.path}"), manifest.checksum) == f.digest
    assert fs.cat_file(f"{run_key}/data/big.bin") == big
    keys = {k.removeprefix(run_key + "/") for k in fs.find(run_key)}
    assert keys == {f.path for f in manifest.files} | {MANIFEST_NAME}  # no lock, no leftovers


@pytest.mark.parametrize("engine", ENGINES)
def test_persistent_failure_names_the_files_commits_nothing_and_keeps_artifacts(
    engine: str, ray_wd: Path, bucket: str, fault_proxy: Any, moto_endpoint: str
) -> None:
    fault_proxy.reset()
    opts = s3_options(fault_proxy.url, upload_retries=2, **FAST_RETRY[engine])

    @ray.remote(max_retries=0)
    @isolated_export(f"s3://{bucket}/broken/{{run_id}}", storage_options=opts)
    def run(run_id: str) -> None:
        Path("export/fine.txt").write_text("fine")
        Path("data/doomed-1.bin").write_bytes(b"1")
        Path("data/doomed-2.bin").write_bytes(b"2")

    fault_proxy.fail_matching, fault_proxy.fail_always = "/broken/b1/data/", True
    with pytest.raises(ExportError) as info:
        ray.get(run.remote("b1"))
    fault_proxy.reset()
    text = str(info.value)
    assert "2 of 3 file(s) could not be uploaded" in text
    assert "data/doomed-1.bin" in text and "data/doomed-2.bin" in text
    fs = s3fs_for(moto_endpoint)
    assert not fs.exists(f"{bucket}/broken/b1/{MANIFEST_NAME}")  # nothing committed
    kept = kept_workspace(text)
    assert (kept / "data" / "doomed-2.bin").read_bytes() == b"2"


@pytest.mark.parametrize("engine", ENGINES)
def test_a_large_file_retries_a_failed_part_alone_and_aborts_when_parts_run_out(
    engine: str, ray_wd: Path, bucket: str, fault_proxy: Any, moto_endpoint: str
) -> None:
    fault_proxy.reset()
    part = 5 * 1024 * 1024
    content = random.Random(7).randbytes(3 * part + 123)  # four parts
    # Part 2 fails twice: s3fs's own SlowDown retries and ours ride it out with one of ours;
    # obstore's client retries each part upload_retries times.
    retries = {"fsspec": 1, "obstore": 2}[engine]
    opts = s3_options(
        fault_proxy.url, upload_part_size=part, upload_retries=retries, **FAST_RETRY[engine]
    )

    @ray.remote(max_retries=0)
    @isolated_export(f"s3://{bucket}/parts/{{run_id}}", storage_options=opts)
    def run(run_id: str) -> None:
        Path("data/big.bin").write_bytes(content)

    # Part 2 answers 503 twice: only that part is sent again, and the run is complete.
    fault_proxy.fail_matching, fault_proxy.fail_next = "[?&]partNumber=2(&|$)", 2
    r = ray.get(run.remote("p1"))
    sends = [(p, s) for m, p, s in fault_proxy.log if m == "PUT" and "partNumber=" in p]
    assert [s for p, s in sends if re.search("[?&]partNumber=2(&|$)", p)] == [503, 503, 200]
    assert sum(1 for p, s in sends if s == 200) == 4  # each part stored once
    fs = s3fs_for(moto_endpoint)
    got = fs.cat_file(f"{bucket}/parts/p1/data/big.bin")
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(content).hexdigest()
    assert r.manifest.files[0].digest == checksum.of_bytes(content, r.manifest.checksum)

    # Part 3 always fails: the export fails naming the file, the multipart upload is aborted
    # (no parts left stored and billed), nothing is committed, the file stays on the node.
    fault_proxy.reset()
    fault_proxy.fail_matching, fault_proxy.fail_always = "[?&]partNumber=3(&|$)", True
    with pytest.raises(ExportError) as info:
        ray.get(run.remote("p2"))
    fault_proxy.reset()
    assert "data/big.bin" in str(info.value)
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        region_name="us-east-1",
        aws_access_key_id="k",
        aws_secret_access_key="s",  # local moto server
    )
    pending = client.list_multipart_uploads(Bucket=bucket, Prefix="parts/p2/").get("Uploads", [])
    assert pending == []
    assert not fs.exists(f"{bucket}/parts/p2/{MANIFEST_NAME}")
    assert (kept_workspace(str(info.value)) / "data" / "big.bin").read_bytes() == content


@pytest.mark.parametrize("engine", ENGINES)
def test_secrets_never_appear_in_errors_logs_reprs_or_manifests(
    engine: str,
    bucket: str,
    fault_proxy: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.chdir(tmp_path)
    secret = "SUPERSECRET-do-not-print-123"
    opts = s3_options(fault_proxy.url, upload_retries=1, **FAST_RETRY[engine])
    opts["secret"] = secret

    @isolated_export(f"s3://{bucket}/secret/{{run_id}}", storage_options=opts)
    def run(run_id: str) -> None:
        Path("export/a.txt").write_text("a")

    caplog.set_level(logging.DEBUG)
    fault_proxy.reset()
    r = run("ok")  # a direct call runs the same backend code in this process
    assert secret not in repr(r) and secret not in str(r.payload)
    assert secret not in json.dumps(r.manifest.to_json())
    fault_proxy.fail_matching, fault_proxy.fail_always = "/secret/", True
    with pytest.raises(ExportError) as info:
        run("bad")
    fault_proxy.reset()
    assert secret not in str(info.value) and secret not in repr(info.value)
    assert secret not in caplog.text
    assert "retry" in caplog.text  # the retries were logged, without the secret


def test_a_second_call_to_a_committed_s3_run_is_refused_and_overwrite_replaces(
    bucket: str, moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    def make(conflict: str) -> Any:
        @isolated_export(
            f"s3://{bucket}/same",
            conflict=conflict,  # type: ignore[arg-type]
            storage_options=s3_options(moto_endpoint),
        )
        def f(files: list[str]) -> None:
            for name in files:
                Path(f"export/{name}").write_text(name)

        return f

    make("error")(["a", "b"])
    with pytest.raises(RunExistsError, match="a committed run already exists"):
        make("error")(["c"])
    make("overwrite")(["c"])
    fs = s3fs_for(moto_endpoint)
    keys = sorted(k.rsplit("/", 1)[1] for k in fs.find(f"{bucket}/same"))
    assert keys == ["c", MANIFEST_NAME]  # the old run's objects are gone, no mix


def run_script(script: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> Any:
    """Run ``script`` in a fresh Python with ``args``; the JSON it printed last."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


HIDDEN_S3FS = """
import sys, json
sys.modules["s3fs"] = sys.modules["obstore"] = None  # as if raysync[s3] was not installed
from pathlib import Path
import fsspec
from raysync import checksum, isolated_export
from raysync.errors import MissingDependencyError
try:
    isolated_export("s3://bucket/x")
except MissingDependencyError as e:
    s3_error = str(e)
@isolated_export("memory://runs/{i}")
def f(i):
    Path("export/x.txt").write_text(f"memory {i}")
r = f(1)
r.materialize("out")
print(json.dumps({"s3_error": s3_error, "uri": r.uri,
                  "stored": fsspec.filesystem("memory").cat_file("/runs/1/export/x.txt").decode(),
                  "pulled": Path("out/export/x.txt").read_text()}))
"""


def test_memory_works_without_extras_and_a_missing_extra_names_what_to_install(
    tmp_path: Path,
) -> None:
    out = run_script(HIDDEN_S3FS, cwd=tmp_path)
    assert "pip install 'raysync[s3]'" in out["s3_error"]
    assert out["uri"] == "memory://runs/1"
    assert out["stored"] == out["pulled"] == "memory 1"


ONE_CLIENT = """
import sys, json
sys.modules[sys.argv[1]] = None  # this client is not installed
from pathlib import Path
from raysync import isolated_export
from raysync.errors import RaySyncError
opts = json.loads(sys.argv[3])

@isolated_export(sys.argv[2] + "/{i}", storage_options=opts)
def f(i):
    Path("export/x.txt").write_text(f"s3 {i}")

r = f(1)
r.materialize("out")
try:
    engine = {"obstore": "obstore", "s3fs": "fsspec"}[sys.argv[1]]
    isolated_export(sys.argv[2] + "/{i}", storage_options={**opts, "engine": engine})
    refused = ""
except RaySyncError as e:
    refused = str(e)
print(json.dumps({"engine": r.stats.extra["engine"], "pulled": Path("out/export/x.txt").read_text(),
                  "refused": refused}))
"""


@pytest.mark.parametrize("missing", ["obstore", "s3fs"])
def test_s3_works_with_either_client_alone_and_names_the_extra_for_the_other(
    missing: str, bucket: str, moto_endpoint: str, tmp_path: Path
) -> None:
    options = json.dumps(s3_options(moto_endpoint))
    out = run_script(ONE_CLIENT, missing, f"s3://{bucket}/alone-{missing}", options, cwd=tmp_path)
    assert out["pulled"] == "s3 1"
    assert out["engine"] == {"obstore": "fsspec", "s3fs": "obstore"}[missing]
    assert "pip install 'raysync[s3]'" in out["refused"]


CREDENTIALS_FROM = """
import sys, json
from pathlib import Path
from raysync import isolated_export
opts = json.loads(sys.argv[2])

@isolated_export(sys.argv[1] + "/{i}", storage_options=opts)
def f(i):
    Path("export/x.txt").write_text(f"creds {i}")

r = f(1)
print(json.dumps({"engine": r.stats.extra["engine"]}))
"""


@pytest.mark.parametrize("where", ["profile", "environment"])
@pytest.mark.parametrize("engine", ENGINES)
def test_credentials_from_an_aws_profile_or_the_environment_work_on_both_engines(
    where: str, engine: str, bucket: str, moto_endpoint: str, tmp_path: Path
) -> None:
    """Without the profile's or the environment's credentials both clients fail (botocore:
    no credentials; obstore: none from the instance metadata service either)."""
    client = {"endpoint_url": moto_endpoint, "region_name": "us-east-1"}
    opts: dict[str, Any] = {"client_kwargs": client, "engine": engine}
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "none")
    if where == "profile":
        (tmp_path / "credentials").write_text(
            "[research]\naws_access_key_id = AKIAPROFILE0000000000\n"
            "aws_secret_access_key = profile-secret\n"
        )
        env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "credentials")
        opts["profile"] = "research"
    else:
        env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"] = "AKIAENV", "env-secret"
    uri = f"s3://{bucket}/creds-{where}-{engine}"
    out = run_script(CREDENTIALS_FROM, uri, json.dumps(opts), cwd=tmp_path, env=env)
    assert out["engine"] == engine
    fs = s3fs_for(moto_endpoint)
    assert fs.cat_file(f"{bucket}/creds-{where}-{engine}/1/export/x.txt") == b"creds 1"


def test_the_engine_option_is_checked_at_decoration() -> None:
    with pytest.raises(ConfigError, match="engine"):
        isolated_export("memory://x/{i}", storage_options={"engine": "boto"})
    with pytest.raises(ConfigError, match="s3:// only"):
        isolated_export("memory://x/{i}", storage_options={"engine": "obstore"})
    with pytest.raises(ConfigError, match="config_kwargs") as info:
        isolated_export(
            "s3://b/x/{i}",
            storage_options={"engine": "obstore", "config_kwargs": {}, "anon": True},
        )
    assert "engine='fsspec'" in str(info.value)


def test_bad_upload_options_fail_at_decoration() -> None:
    from raysync.errors import ConfigError

    with pytest.raises(ConfigError, match="upload_part_size"):
        isolated_export("memory://x", storage_options={"upload_part_size": 1024})
    with pytest.raises(ConfigError, match="unknown storage_options"):
        isolated_export("memory://x", storage_options={"upload_threads": 4})
    assert MissingDependencyError  # exported for users catching it


def test_packing_mode_sends_small_files_as_a_few_tar_archives_still_readable_one_by_one(
    ray_wd: Path, bucket: str, fault_proxy: Any, moto_endpoint: str, tmp_path: Path
) -> None:
    import io
    import tarfile

    fault_proxy.reset()
    opts = s3_options(fault_proxy.url, upload_pack_below=64 * 1024, upload_pack_size=256 * 1024)

    @ray.remote(max_retries=0)
    @isolated_export(f"s3://{bucket}/packed/{{run_id}}", storage_options=opts)
    def run(run_id: str) -> None:
        for i in range(300):
            d = Path(f"export/p{i % 4}")
            d.mkdir(exist_ok=True)
            (d / f"{i}.bin").write_bytes(small_content(i))
        Path("data/big.bin").write_bytes(big_content(5))  # not packed: its own object

    r = ray.get(run.remote("k1"))
    puts = [p for m, p, s in fault_proxy.log if m == "PUT" and s < 300]
    pack_puts = [p for p in puts if "/.raysync-pack-" in p]
    assert 2 <= len(pack_puts) <= 3  # 300 KiB of files + headers in 256 KiB archives
    assert not [p for p in puts if "/export/" in p]  # no object per small file
    fs = s3fs_for(moto_endpoint)
    run_key = f"{bucket}/packed/k1"
    manifest = Manifest.from_bytes(fs.cat_file(f"{run_key}/{MANIFEST_NAME}"))
    packed = [f for f in manifest.files if f.pack is not None]
    assert len(packed) == 300 and len({f.pack["object"] for f in packed}) == len(pack_puts)
    # Each archive is a standard tar holding exactly its files.
    first = packed[0].pack["object"]
    with tarfile.open(fileobj=io.BytesIO(fs.cat_file(f"{run_key}/{first}"))) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}  # type: ignore[union-attr]
    assert members and all(
        members[f.path] == small_content(int(Path(f.path).stem))
        for f in packed
        if f.pack["object"] == first
    )
    # One file by its offset, as the manifest indexes it.
    f = packed[123]
    start = f.pack["offset"]
    got = fs.cat_file(f"{run_key}/{f.pack['object']}", start=start, end=start + f.size)
    assert got == small_content(int(Path(f.path).stem))
    # Materialize and the CLI's verify read every file back, checked against its digest.
    out = files_under(r.materialize(tmp_path / "back"))
    assert len(out) == 301 and out["export/p3/123.bin"] == small_content(123)
    assert out["data/big.bin"] == big_content(5)
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "raysync",
            "verify",
            f"s3://{run_key}",
            "--storage-options",
            json.dumps(s3_options(moto_endpoint)),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(min_value=0, max_value=5 * 1024**4),  # S3's largest object: 5 TiB
    part_mib=st.integers(min_value=5, max_value=512),
)
def test_a_file_of_any_size_up_to_5_tib_takes_at_most_9000_parts(size: int, part_mib: int) -> None:
    from raysync_builtins.blob.store import Options, part_size_for

    opts, _ = Options.split({"upload_part_size": part_mib * 1024 * 1024})
    part = part_size_for(size, opts)
    assert part >= opts.upload_part_size and part % (1024 * 1024) == 0
    assert -(-size // part) <= 9_000  # S3 allows 10,000
    if size <= 9_000 * opts.upload_part_size:
        assert part == opts.upload_part_size  # the user's part size whenever it suffices


def test_reading_back_prefetches_in_order_within_the_budget_and_never_deadlocks() -> None:
    """The read-back prefetch (materialize, pull, verify): files come back whole and in
    order, within the bytes budget, also when a reader gives up on a file half-way or asks
    for files out of order (each case bounded: a deadlock fails the test, not CI's clock)."""
    import threading
    import uuid

    import fsspec
    from raysync_builtins.blob.engine_fsspec import FsspecEngine
    from raysync_builtins.blob.reading import Prefetch
    from raysync_builtins.blob.store import Options

    from raysync.manifest import FileEntry

    mib = 1024 * 1024
    fs = fsspec.filesystem("memory")
    run = f"/prefetch-{uuid.uuid4().hex[:8]}"
    sizes = [12 * mib, 3, 7 * mib, 0, 11 * mib + 5, 4096]
    blobs = [random.Random(i).randbytes(n) for i, n in enumerate(sizes)]
    entries = [FileEntry(f"f{i}", len(b), 0o644) for i, b in enumerate(blobs)]
    for e, b in zip(entries, blobs, strict=True):
        fs.pipe_file(f"{run}/{e.path}", b)
    opts, _ = Options.split(
        {"upload_part_size": 5 * mib, "upload_bytes_in_flight": 10 * mib, "upload_concurrency": 4}
    )

    def bounded(fn: Any) -> Any:
        out: list[Any] = []
        t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
        t.start()
        t.join(timeout=60)
        assert not t.is_alive(), "the prefetch deadlocked"
        return out[0]

    def read_all(order: list[int], give_up: int | None = None) -> dict[int, bytes]:
        p = Prefetch(FsspecEngine(fs), run, entries, opts)
        got: dict[int, bytes] = {}
        try:
            for i in order:
                chunks = p.take(entries[i])
                if i == give_up:
                    next(chunks, None)  # one piece, then stop reading this file
                    chunks.close()
                    continue
                got[i] = b"".join(chunks)
                # Within the budget, but for one chunk the file being read may always take.
                assert p.used <= opts.upload_bytes_in_flight + opts.upload_part_size
        finally:
            p.close()
        return got

    everything = bounded(lambda: read_all(list(range(len(entries)))))
    assert [everything[i] for i in range(len(entries))] == blobs
    halfway = bounded(lambda: read_all(list(range(len(entries))), give_up=0))
    assert all(halfway[i] == blobs[i] for i in range(1, len(entries)))
    backwards = bounded(lambda: read_all(list(reversed(range(len(entries))))))
    assert all(backwards[i] == blobs[i] for i in range(len(entries)))


@pytest.mark.parametrize("engine", ENGINES)
def test_a_key_longer_than_s3_allows_is_refused_before_anything_is_sent(
    engine: str, ray_wd: Path, bucket: str, moto_endpoint: str
) -> None:
    """S3 keys hold at most 1,024 bytes: a deep tree whose path (with the run's prefix) is
    longer fails at once, naming the file, not after uploads and retries."""
    opts = s3_options(moto_endpoint, engine=engine)
    deep = "/".join(["d" * 200] * 5) + "/é.txt"  # with "runs/deep/export/": 1,028 bytes

    @isolated_export(f"s3://{bucket}/runs/{{name}}", storage_options=opts)
    def call(name: str) -> None:
        Path("export/ok.txt").write_text("ok")
        (Path("export") / deep).parent.mkdir(parents=True)
        (Path("export") / deep).write_text("deep")

    with pytest.raises(TreeError, match=r"object key of 1,028 bytes .*allows 1,024") as info:
        call(name="deep")
    assert "nothing was uploaded" in str(info.value)
    assert s3fs_for(moto_endpoint).find(f"{bucket}/runs") == []  # not even a lock
    kept = kept_workspace(str(info.value))
    assert (kept / "export" / deep).read_text() == "deep"  # the files are kept
