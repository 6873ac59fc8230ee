"""URI helpers: schemes, static roots, rendering, redaction (no Ray needed)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raysync.errors import TemplateError
from raysync.target import redact, render, split_scheme, static_prefix


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://b/k", ("s3", "b/k")),
        ("S3://b/k", ("s3", "b/k")),
        ("file:///abs/p", ("file", "/abs/p")),
        ("rel/path", ("file", "rel/path")),
        ("/abs/path", ("file", "/abs/path")),
    ],
)
def test_split_scheme(uri: str, expected: tuple[str, str]) -> None:
    assert split_scheme(uri) == expected


@pytest.mark.parametrize(
    ("template", "root"),
    [
        ("artifacts/runs/{run_id}", "artifacts/runs"),
        ("artifacts/run-{run_id}/x", "artifacts"),
        ("artifacts/out", "artifacts"),
        ("out", ""),
        ("/mnt/runs/{id}", "/mnt/runs"),
        ("/out", "/"),
    ],
)
def test_static_prefix_is_the_directory_above_the_run(template: str, root: str) -> None:
    assert static_prefix(template) == root


def test_render_supports_attributes_and_format_specs() -> None:
    class Cfg:
        name = "big"

    out = render("runs/{cfg.name}/{step:04d}", {"cfg": Cfg(), "step": 7}, available=[])
    assert out == "runs/big/0007"


@pytest.mark.parametrize("value", ["../x", "/etc", "a/../../b", "", "a\x00"])
def test_render_refuses_values_that_escape(value: str) -> None:
    with pytest.raises(TemplateError, match="cannot name a run"):
        render("runs/{run_id}", {"run_id": value}, available=["run_id"])


def test_render_names_a_missing_field_and_lists_the_available_ones() -> None:
    with pytest.raises(TemplateError, match=r"\{run_id\}") as info:
        render("runs/{run_id}", {"task_id": "t"}, available=["task_id"])
    assert "{task_id}" in str(info.value)


@pytest.mark.parametrize(
    ("uri", "secret"),
    [
        ("s3://AKIAXYZ:hunter2@bucket/k", "hunter2"),
        ("https://host/p?X-Amz-Signature=abc123&x=1", "abc123"),
        ("gs://b/k?token=sekrit", "sekrit"),
    ],
)
def test_redact_hides_credentials_in_uris(uri: str, secret: str) -> None:
    assert secret not in redact(uri)
    assert "***" in redact(uri)


# -- URIs that only look like URIs (issue 16): refused at decoration, never a local dir ------

MALFORMED = [
    "simplecache::s3://bucket/runs/{run_id}",  # fsspec chained URLs
    "filecache::s3://bucket/runs/{run_id}",
    "zip::file:///tmp/a.zip",
    "s3:/bucket/runs/{run_id}",  # one slash
    "s3:bucket/runs",  # none
    "gs:bucket",
    "S3:/bucket/x",
    "file:/tmp/x",
]


@pytest.mark.parametrize("uri", MALFORMED)
def test_a_uri_that_is_not_one_fails_at_decoration_and_creates_nothing(
    uri: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from raysync import isolated_export

    monkeypatch.chdir(tmp_path)
    with pytest.raises(TemplateError) as info:
        isolated_export(uri)
    said = str(info.value)
    assert "://" in said and ("./" in said or "chained" in said)  # says what to write
    assert list(tmp_path.iterdir()) == []


@settings(max_examples=150, deadline=None)
@given(
    scheme=st.from_regex(r"[A-Za-z][A-Za-z0-9+.\-]{0,10}", fullmatch=True),
    rest=st.text(alphabet="ab/:{}_.", max_size=12).filter(lambda r: not r.startswith("//")),
    chained=st.booleans(),
)
def test_every_scheme_like_prefix_without_slashes_is_refused_and_a_plain_path_is_not(
    scheme: str, rest: str, chained: bool
) -> None:
    from raysync.target import check_uri_form

    uri = f"{scheme}::s3://b/{rest}" if chained else f"{scheme}:{rest}"
    with pytest.raises(TemplateError):
        check_uri_form(uri)
    check_uri_form(f"./{scheme}:{rest}")  # the same name as a path, written as one
    check_uri_form(f"{scheme}://bucket/{rest}")  # and as a URI
