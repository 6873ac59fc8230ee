"""URI helpers: schemes, static roots, rendering, redaction (no Ray needed)."""

from __future__ import annotations

import pytest

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
