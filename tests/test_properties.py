"""Property-based tests: hostile inputs found by generators, not by imagination (CRAFT.md).

Template values, run names, file names, manifests and secrets are drawn from an adversarial
alphabet: dots, percent escapes, globs, separators, control and non-UTF-8 bytes, long names.
The examples are bounded and the seed is fixed (``--hypothesis-seed`` in pyproject.toml's
pytest options); a failure prints the seed and the example to reproduce it.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from raysync import checksum
from raysync.errors import IntegrityError, MaterializeError, TemplateError, UnsafePathError
from raysync.manifest import FileEntry, Manifest, check_relpath, safe_join
from raysync.redaction import redact, remember
from raysync.result import place_files
from raysync.target import render, static_prefix

#: Pieces an attacker (or an unlucky user) builds names from.
PIECES = [
    ".",
    "..",
    "...",
    "/",
    "//",
    "\\",
    "%2e",
    "%2E",
    "%2f",
    "%252e",
    "%00",
    "%0a",
    "*",
    "?",
    "[",
    "]",
    "::",
    "~",
    "-",
    " ",
    "\n",
    "\r",
    "\t",
    "\x00",
    "\x1b",
    "\x7f",
    "\x85",
    os.fsdecode(b"\xff\xfe"),
    "é",
    "a",
    "run",
    "x" * 255,
]
adversarial = st.lists(st.sampled_from(PIECES), min_size=0, max_size=6).map("".join) | st.text(
    max_size=12
)

SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)


def _segments(path: str) -> list[str]:
    return path.replace("\\", "/").split("/")


TEMPLATES = [
    "runs/{name}",
    "{name}",
    "/abs/runs/{name}",
    "s3://bucket/runs/{name}",
    "rsync://host/mod/runs/{name}/x",
    "host://runs/v{name}",
    "runs/{name}.{name}",
]


@SETTINGS
@given(template=st.sampled_from(TEMPLATES), value=adversarial)
def test_a_rendered_run_is_strictly_below_its_root_after_every_decoding(
    template: str, value: str
) -> None:
    """Either the value is refused, or the run it names lies strictly below the template's
    static root, with no '.', '..' or empty segment and no control character, however many
    times a backend percent-decodes it."""
    try:
        out = render(template, {"name": value}, available=["name"])
    except TemplateError:
        return
    scheme_free = out.split("://", 1)[-1]
    root = static_prefix(template.split("://", 1)[-1])
    prefix = root if root in ("", "/") else root + "/"
    assert scheme_free.startswith(prefix)
    tail = scheme_free[len(prefix) :]
    form = tail
    for _ in range(4):
        assert tail and all(s not in ("", ".", "..") for s in _segments(form)), out
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in form), out
        assert "::" not in form
        form = unquote(form, errors="surrogateescape")


@SETTINGS
@given(path=adversarial)
def test_a_manifest_path_never_lands_outside_its_destination(path: str, tmp_path: Path) -> None:
    try:
        joined = safe_join(tmp_path, path)
    except UnsafePathError:
        return
    assert check_relpath(path) == path
    real = os.path.normpath(joined)
    assert real.startswith(str(tmp_path) + os.sep)
    assert os.path.relpath(real, tmp_path) == path.rstrip("/")


# -- manifests ---------------------------------------------------------------------------------

VALID = {
    "format": "raysync.manifest",
    "version": 2,
    "checksum": "xxh3-128",
    "run": {"task_id": "t"},
    "trees": ["export"],
    "files": [
        {"path": "export/a", "size": 1, "mode": 420, "digest": "ab12"},
        {"path": "export/b/c", "size": 0, "mode": 493, "digest": "cd34"},
    ],
}
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True)
    | adversarial,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(["path", "size", "mode", "digest", "pack", "x"]), children
        )
    ),
    max_leaves=8,
)


def _mutate(doc: Any, where: list[Any], value: Any) -> Any:
    """``doc`` with the item at the path ``where`` (keys or indexes) replaced by ``value``,
    or deleted when ``value`` is the sentinel ``...``."""
    if not where:
        return value
    head, rest = where[0], where[1:]
    if isinstance(doc, dict):
        out = dict(doc)
        if rest or value is not ...:
            out[head] = _mutate(doc.get(head), rest, value)
        else:
            out.pop(head, None)
        return out
    if isinstance(doc, list) and doc:
        out_list = list(doc)
        i = head % len(doc) if isinstance(head, int) else 0
        out_list[i] = _mutate(doc[i], rest, value)
        return out_list
    return value


paths_into_manifest = st.sampled_from(
    [
        ["format"],
        ["version"],
        ["checksum"],
        ["run"],
        ["trees"],
        ["files"],
        ["files", 0],
        ["files", 0, "path"],
        ["files", 1, "size"],
        ["files", 0, "mode"],
        ["files", 1, "digest"],
        ["files", 0, "pack"],
        ["files", 0, "etag"],
    ]
)


@SETTINGS
@given(where=paths_into_manifest, value=json_values | st.just(...))
def test_a_damaged_manifest_is_read_or_refused_clearly_never_a_crash(
    where: list[Any], value: Any
) -> None:
    doc = _mutate(VALID, where, value)
    try:
        data = json.dumps(doc, allow_nan=True).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError):
        return
    try:
        m = Manifest.from_bytes(data)
    except (IntegrityError, UnsafePathError):
        return
    for f in m.files:
        assert check_relpath(f.path) == f.path
        assert isinstance(f.size, int) and 0 <= f.size
        assert isinstance(f.mode, int) and 0 <= f.mode <= 0o7777
        assert isinstance(f.digest, str)
    Manifest.from_bytes(m.to_bytes())  # what it read, it can write and read again


@SETTINGS
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_as_a_manifest_are_refused_clearly(data: bytes) -> None:
    try:
        Manifest.from_bytes(data)
    except (IntegrityError, UnsafePathError):
        pass


def test_a_deeply_nested_manifest_is_refused_clearly() -> None:
    with pytest.raises(IntegrityError):
        Manifest.from_bytes(b"[" * 100_000 + b"]" * 100_000)


# -- secrets -----------------------------------------------------------------------------------

secret_text = st.text(
    alphabet=st.sampled_from(list("abcXYZ019/+=@:%?&#-_.~ '\"<>")), min_size=6, max_size=30
)


@SETTINGS
@given(secret=secret_text, path=adversarial)
def test_a_secret_given_in_a_uri_never_survives_redaction(secret: str, path: str) -> None:
    assume("@" not in path)
    secret = "SeCr" + secret  # never a substring of the rest of the message by chance
    uri = f"s3://AKIDPROPERTY:{secret}@bucket/{path}"
    remember(uri)
    text = f"error: could not open {uri!r}; retrying {uri} (bucket {secret.split('/')[0]}...)"
    assert secret not in redact(text)


@SETTINGS
@given(secret=secret_text)
def test_a_secret_in_storage_options_never_survives_redaction(secret: str) -> None:
    secret = "OpTs" + secret
    remember("s3://bucket/x", {"client_kwargs": {"aws_secret_access_key": secret}, "token": "t"})
    assert secret not in redact(f"botocore said: SignatureDoesNotMatch for {secret}")


def test_an_unknown_uri_with_credentials_is_redacted_whatever_the_password_holds() -> None:
    for password in ["pa/ss", "p@ss", "p@s/s:w", "a%2Fb"]:
        out = redact(f"failed: s3://user:{password}@bucket/runs/x and more")
        assert password not in out and "bucket/runs/x" in out


# -- placing files -----------------------------------------------------------------------------

names = st.lists(
    st.sampled_from(["a", "b", "data", "export", "*", "[x]", "x y", "é"]), min_size=1, max_size=3
).map("/".join)


@settings(max_examples=150, deadline=None, database=None)
@given(
    files=st.dictionaries(names, st.binary(max_size=20), min_size=1, max_size=5),
    existing=st.dictionaries(
        names, st.sampled_from(["file", "dir", "link-out", "same"]), max_size=4
    ),
    mode=st.integers(min_value=0, max_value=0o7777),
    overwrite=st.booleans(),
)
def test_placing_files_is_all_or_nothing_and_never_escapes(
    tmp_path_factory: pytest.TempPathFactory,
    files: dict[str, bytes],
    existing: dict[str, str],
    mode: int,
    overwrite: bool,
) -> None:
    # A manifest cannot hold a path that is also a directory of another: such sets are
    # refused when a manifest is read, so they are not drawn here.
    dirs = {"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)}
    assume(not dirs & set(files))
    base = tmp_path_factory.mktemp("place")
    dest, outside = base / "dest", base / "outside"
    dest.mkdir()
    outside.mkdir()
    for rel, kind in existing.items():
        p = dest / rel
        if any((dest / q).is_symlink() for q in Path(rel).parents):
            continue  # the setup itself must not write through a link
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            if kind == "dir":
                p.mkdir()
            elif kind == "link-out":
                p.symlink_to(outside)
            else:
                p.write_bytes(files.get(rel, b"") if kind == "same" else b"other")
        except OSError:
            continue
    before = _snapshot(dest)
    entries = [
        FileEntry(p, len(d), mode, checksum.of_bytes(d, checksum.DEFAULT)) for p, d in files.items()
    ]
    try:
        place_files(
            dest,
            entries,
            lambda f: iter([files[f.path]]),
            uri="test",
            checksum=checksum.DEFAULT,
            overwrite=overwrite,
        )
    except MaterializeError:
        assert _snapshot(dest) == before  # nothing written
    else:
        for rel, data in files.items():
            p = dest / rel
            assert not p.is_symlink() and p.read_bytes() == data
            assert stat.S_IMODE(p.stat().st_mode) & 0o7000 == 0
    assert list(outside.iterdir()) == []
    assert [p.name for p in dest.iterdir() if p.name.startswith(".raysync")] == []


def _snapshot(root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = (
                p.read_bytes() if p.is_file() and not p.is_symlink() else p.is_symlink()
            )
    return out


entries = st.builds(
    FileEntry,
    path=adversarial,
    size=st.integers(min_value=0, max_value=2**63),
    mode=st.integers(min_value=0, max_value=0o777),
    digest=adversarial,
    source=st.none() | adversarial,
    pack=st.none() | st.fixed_dictionaries({"object": adversarial, "offset": st.integers(0, 99)}),
    etag=st.none() | adversarial,
    fingerprint=st.none() | st.tuples(*[st.integers(0, 2**40)] * 5),
    shard=st.none() | adversarial,
)


@SETTINGS
@given(files=st.lists(entries, max_size=6), run=st.dictionaries(adversarial, adversarial))
def test_a_manifest_is_written_as_the_json_encoder_would_and_pickles_whole(
    files: list[FileEntry], run: dict[str, str]
) -> None:
    """The manifest's hand-built lines (issue 20: the encoder's set-up per file cost more
    than a small file's copy) say exactly what the encoder says, and a manifest (a result's
    part that crosses Ray, pickled as tuples) comes back with every field, unserialised
    ones included."""
    import pickle

    import ray.cloudpickle

    from raysync.result import ExportResult, ExportStats

    m = Manifest(files=files, run=run, trees=["export"])
    doc = json.loads(m.to_bytes())
    assert doc["files"] == [json.loads(json.dumps(f.to_json(), sort_keys=True)) for f in files]
    assert doc["run"] == run and doc["totals"]["files"] == len(files)
    result = ExportResult(None, "u", "local", m, ExportStats(len(files), 0, 0.1, 0.2, {}))
    for dumps in (pickle.dumps, ray.cloudpickle.dumps):
        back = pickle.loads(dumps(result))  # noqa: S301 - bytes this test made
        assert back == result
        assert [
            (f.source, f.fingerprint, f.pack, f.etag, f.shard) for f in back.manifest.files
        ] == [(f.source, f.fingerprint, f.pack, f.etag, f.shard) for f in files]
