"""A fake secret planted in storage_options never leaves process memory (issue 21's canary
harness, normal mode): not in any Ray log, the internal KV, the destination, an error the
driver sees, or a worker's environment; for every built-in backend that takes a credential
(S3 keys, an rsync daemon's password, an ssh key's path), through exports that succeed, fail
and are retried."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import ray

from raysync import isolated_export
from tests import canary
from tests.destinations import Dest, make_dest


def _with_secret(backend: str, dest: Dest, secret: str, tmp_path: Path) -> dict[str, Any]:
    options = dict(dest.options or {})
    if backend == "s3":
        options["secret"] = secret  # moto takes any key
    elif backend == "rsync-daemon":
        options["password"] = secret
    else:  # rsync-ssh: the key's path names the secret
        command = list(options["ssh_command"])
        key = command[command.index("-i") + 1]
        secret_key = tmp_path / secret / "client_key"
        secret_key.parent.mkdir()
        shutil.copy(key, secret_key)
        secret_key.chmod(0o600)
        command[command.index("-i") + 1] = str(secret_key)
        options["ssh_command"] = command
    return options


@pytest.mark.parametrize("backend", ["s3", "rsync-daemon", "rsync-ssh"])
def test_a_secret_in_storage_options_appears_nowhere_outside_memory(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, ray_wd: Path
) -> None:
    dest = make_dest(request, backend, tmp_path)
    secret = canary.new()
    options = _with_secret(backend, dest, secret, tmp_path)
    marks = tmp_path / "marks"
    marks.mkdir()

    @ray.remote(max_retries=1)
    @isolated_export(dest.uri("{name}"), storage_options=options)
    def call(name: str, how: str) -> str:
        return canary.act(name, how, marks)

    errors: list[BaseException] = []
    assert ray.get(call.remote("ok", "succeed"), timeout=120).value == "ok"
    assert ray.get(call.remote("again", "retry"), timeout=120).value == "again"
    with pytest.raises(ray.exceptions.RayTaskError) as failed:
        ray.get(call.remote("bad", "fail"), timeout=120)
    errors.append(failed.value)
    # An export the destination refuses: the error a user reads names the place, not the key.
    with pytest.raises(ray.exceptions.RayTaskError) as refused:
        ray.get(call.remote("ok", "succeed"), timeout=120)  # a committed run: a conflict
    errors.append(refused.value)
    found = canary.places(secret, errors=errors, destination=dest.files().items())
    assert found == []


def test_the_harness_finds_a_canary_where_it_looks(ray_wd: Path, tmp_path: Path) -> None:
    """The harness itself: a canary written into a log and into the destination is found."""
    from raysync import rayshim

    secret = canary.new()
    session = rayshim.session_dir()
    assert session is not None
    log = Path(session) / "logs" / f"raysync-canary-{secret[-8:]}.log"
    log.write_text(f"a careless line with {secret}\n")
    try:
        found = canary.places(secret, destination=[("manifest", secret.encode())])
    finally:
        log.unlink()
    assert any("session file" in f for f in found) and "destination manifest" in found
