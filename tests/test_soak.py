"""Soak: 200 calls over three backends with seeded random faults (docs/reliability.md).

Faults: the user's code raises; the worker process dies before the call returns (the Ray
retry must commit); the S3 endpoint answers 503 for bursts of time. Run names and file names
are drawn from the adversarial alphabet (dots, percent escapes, globs, separators, control
characters, long names): a name that cannot name a run is refused before the call runs.
Afterwards: committed runs = successful calls (0 lost), every committed run verifies (0
corrupt), no run is left half-written where a reader could take it for committed (0
partial), and nothing was written outside the destinations (0 outside)."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import ray

from raysync import isolated_export
from raysync.manifest import MANIFEST_NAME, Manifest, verify_files
from raysync.target import value_problem
from tests.conftest import s3_options

CALLS = 200
SEED = 20261128


#: Pieces of run names: some make a name raysync must refuse ('.', '%2e', a newline ...).
RUN_PIECES = [".", "..", "%2e", "%252e", "*", "?", "[", "]", "a b", "-", "é", "\n", "~", "/x"]
#: Pieces of file names, each valid on every backend here (moto refuses a newline in a key).
FILE_PIECES = ["*", "?", "[x]", " sp ace ", "-rf", "é", "%2e", "...", "#", "x" * 120, "a=b&c"]


def run_name(i: int) -> str:
    rnd = random.Random(SEED * 7 + i)
    return str(i) + "".join(rnd.choice(RUN_PIECES) for _ in range(rnd.randrange(0, 3)))


def body(i: int) -> dict[str, bytes]:
    rnd = random.Random(i)
    return {
        f"export/{j}{rnd.choice(FILE_PIECES)}.bin": rnd.randbytes(rnd.randrange(10, 20_000))
        for j in range(5)
    }


@pytest.mark.slow
def test_soak_200_calls_with_random_faults(
    host: Path, bucket: str, fault_proxy: Any, moto_endpoint: str
) -> None:
    import s3fs

    fault_proxy.reset()
    rnd = random.Random(SEED)
    plan = [
        (
            rnd.choice(["local", "s3", "host"]),
            rnd.choices(["none", "raise", "die"], weights=[80, 10, 10])[0],
        )
        for _ in range(CALLS)
    ]
    fast = {"upload_retry_base_delay": 0.02, "upload_retry_max_delay": 0.2, "upload_retries": 8}
    uris = {
        "local": ("soak-local/{name}", None),
        "s3": (f"s3://{bucket}/soak/{{name}}", s3_options(fault_proxy.url, **fast)),
        "host": ("host://soak-host/{name}", None),
    }

    def make(uri: str, options: dict[str, Any] | None) -> Any:
        @ray.remote(max_retries=1, retry_exceptions=False)
        @isolated_export(uri, storage_options=options, export_on_failure=False)
        def call(i: int, name: str, fault: str, marks: str) -> int:
            for rel, data in body(i).items():
                Path(rel).write_bytes(data)
            if fault == "raise":
                raise RuntimeError(f"call {i} failed on purpose")
            if fault == "die" and not Path(marks, str(i)).exists():
                Path(marks, str(i)).touch()
                os._exit(1)  # the worker dies before returning; Ray retries the task
            return i

        return call

    marks = host / "marks"
    marks.mkdir()
    before = sorted(p.name for p in host.iterdir())
    calls = {name: make(*uris[name]) for name in uris}

    stop = threading.Event()
    bursts = 0

    def faults() -> None:
        # 503 bursts from the S3 endpoint at seeded moments, each a fraction of a second.
        nonlocal bursts
        burst = random.Random(SEED + 1)
        while not stop.wait(burst.uniform(0.2, 1.0)):
            fault_proxy.fail_until = time.monotonic() + burst.uniform(0.05, 0.3)
            bursts += 1

    t0 = time.monotonic()
    injector = threading.Thread(target=faults)
    injector.start()
    try:
        refs = [
            calls[name].remote(i, run_name(i), f, str(marks)) for i, (name, f) in enumerate(plan)
        ]
        outcomes: list[str] = []
        for ref in refs:
            try:
                ray.get(ref, timeout=240)
                outcomes.append("ok")
            except Exception as e:  # noqa: BLE001 - counted below
                outcomes.append(type(e).__name__)
    finally:
        stop.set()
        injector.join(timeout=10)
        answers_503 = sum(1 for _, _, status in fault_proxy.log if status == 503)
        fault_proxy.reset()
    seconds = time.monotonic() - t0

    fs = s3fs.S3FileSystem(**s3_options(moto_endpoint))

    def run_dir(name: str, i: int) -> Path:
        return host / ("soak-local" if name == "local" else "soak-host") / run_name(i)

    def manifest_of(name: str, i: int) -> Manifest | None:
        if value_problem(run_name(i)) is not None:
            return None
        if name == "s3":
            key = f"{bucket}/soak/{run_name(i)}/{MANIFEST_NAME}"
            return Manifest.from_bytes(fs.cat_file(key)) if fs.exists(key) else None
        path = run_dir(name, i) / MANIFEST_NAME
        return Manifest.from_bytes(path.read_bytes()) if path.exists() else None

    committed = corrupt = refused = 0
    for i, ((name, fault), result) in enumerate(zip(plan, outcomes, strict=True)):
        manifest = manifest_of(name, i)
        bad_name = value_problem(run_name(i)) is not None
        refused += bad_name
        expect_ok = fault != "raise" and not bad_name
        if bad_name:
            assert result != "ok" and "TemplateError" in result, (i, run_name(i), result)
        assert (result == "ok") == expect_ok, (i, name, fault, result)
        assert (manifest is not None) == expect_ok, (i, name, fault)  # 0 partial, 0 extra
        if manifest is None:
            continue
        committed += 1
        if name == "s3":
            got = {
                f.path: fs.cat_file(f"{bucket}/soak/{run_name(i)}/{f.path}") for f in manifest.files
            }
            ok = got == body(i)
        else:
            run = run_dir(name, i)
            try:
                verify_files(manifest, run, uri=str(run))
                ok = {f.path: (run / f.path).read_bytes() for f in manifest.files} == body(i)
            except Exception:  # noqa: BLE001 - counted
                ok = False
        corrupt += 0 if ok else 1
    # Nothing half-written left where a reader looks: no staging dirs, no lock without a run.
    leftovers = [
        p.name
        for root in ("soak-local", "soak-host")
        if (host / root).exists()
        for p in (host / root).rglob("*")
        if "staging" in p.name
    ]
    keys = fs.find(bucket)
    leftovers += [k for k in keys if k.endswith(".raysync-lock")]
    # Nothing outside the destinations: no new entry beside them on the driver's disk, no
    # object outside the prefix, no run directory that is not one of the names.
    outside = [p for p in sorted(q.name for q in host.iterdir()) if p not in before]
    outside = [p for p in outside if p not in ("soak-local", "soak-host")]
    outside += [k for k in keys if not k.startswith(f"{bucket}/soak/")]
    for root, backend in (("soak-local", "local"), ("soak-host", "host")):
        names = {run_name(i) for i, (b, _) in enumerate(plan) if b == backend}
        for p in (host / root).rglob("raysync-manifest.json") if (host / root).exists() else []:
            rel = p.parent.relative_to(host / root).as_posix()
            if rel not in names:
                outside.append(f"{root}/{rel}")
    successes = outcomes.count("ok")
    figures = {
        "calls": CALLS,
        "seed": SEED,
        "successful_calls": successes,
        "committed_runs": committed,
        "corrupt": corrupt,
        "partial": len(leftovers),
        "outside": len(outside),
        "refused_names": refused,
        "faults": {
            "raise": sum(f == "raise" for _, f in plan),
            "worker_died": sum(f == "die" for _, f in plan),
            "s3_503_bursts": bursts,
            "s3_503_answers": answers_503,
        },
        "seconds": round(seconds, 1),
    }
    print("SOAK " + json.dumps(figures))
    assert committed == successes and corrupt == 0 and leftovers == [] and outside == []
