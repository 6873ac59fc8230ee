"""Bad input raises a clear raysync.errors exception as early as the information exists."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray

from raysync import isolated_export
from raysync.errors import (
    BackendNotFoundError,
    ConfigError,
    DestinationNotVisibleError,
    PayloadTooLargeError,
    RaySyncError,
    RunExistsError,
    TemplateError,
    TreeError,
)
from raysync.manifest import MANIFEST_NAME
from tests.conftest import files_under, kept_workspace

# -- at decoration, on the driver (no Ray needed) -------------------------------------------


def test_unknown_scheme_fails_at_decoration_and_lists_installed_backends() -> None:
    with pytest.raises(BackendNotFoundError) as info:
        isolated_export("nosuch://bucket/x")
    text = str(info.value)
    assert "'nosuch://'" in text
    assert "local (file://)" in text and "value (return://)" in text


def test_unknown_backend_name_fails_at_decoration() -> None:
    with pytest.raises(BackendNotFoundError, match="backend name 'nope'"):
        isolated_export("x", backend="nope")


def test_missing_template_field_fails_at_decoration_listing_available_fields() -> None:
    with pytest.raises(TemplateError) as info:

        @isolated_export("runs/{run_idd}")
        def f(run_id: str) -> None: ...

    text = str(info.value)
    assert "{run_idd} is not an argument of" in text
    for field in ("{run_id}", "{task_id}", "{job_id}", "{node_id}", "{attempt}"):
        assert field in text


@pytest.mark.parametrize("uri", ["runs/{run_id", "runs/{}", "runs/{0}", "runs/{run_id!z}"])
def test_malformed_templates_fail_at_decoration(uri: str) -> None:
    with pytest.raises(TemplateError):

        @isolated_export(uri)
        def f(run_id: str) -> None: ...


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"trees": ["/etc"]}, "must be a relative path"),
        ({"trees": ["../up"]}, "must be a relative path"),
        ({"trees": "export"}, "not the string"),
        ({"trees": []}, "trees is empty"),
        ({"trees": ["export", "export/sub"]}, "overlap"),
        ({"conflict": "merge"}, "conflict='merge'"),
        ({"env": {"X": 1}}, "must map a name"),
        ({"storage_options": {"region": "x"}}, "takes no storage_options"),
    ],
)
def test_bad_options_fail_at_decoration(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        isolated_export("runs/x", **kwargs)  # type: ignore[arg-type]


def test_value_backend_limit_must_be_a_positive_int() -> None:
    with pytest.raises(ConfigError, match="max_bytes must be a positive integer"):
        isolated_export(None, storage_options={"max_bytes": -1})


def test_a_field_value_that_escapes_the_template_is_refused_before_the_call_runs(
    ray_wd: Path, host: Path
) -> None:
    ran = host / "ran"

    @ray.remote(max_retries=0)
    @isolated_export("runs/{run_id}")
    def f(run_id: str, flag: str) -> None:
        Path(flag).write_text("ran")

    with pytest.raises(TemplateError, match="cannot name a run"):
        ray.get(f.remote("../../etc", str(ran)))
    assert not ran.exists()


# -- in the worker, as soon as the information exists ----------------------------------------


def test_return_by_value_over_its_limit_suggests_another_backend_and_keeps_files(
    ray_wd: Path,
) -> None:
    @ray.remote(max_retries=0)
    @isolated_export(None, storage_options={"max_bytes": 1000})
    def big() -> None:
        Path("data/big.bin").write_bytes(os.urandom(5000))

    with pytest.raises(PayloadTooLargeError) as info:
        ray.get(big.remote())
    text = str(info.value)
    assert "5,000 bytes" in text and "1,000 bytes" in text
    assert "s3://" in text  # suggests an object store or a path
    kept = kept_workspace(text)
    assert (kept / "data" / "big.bin").stat().st_size == 5000


def test_tree_that_is_a_file_in_the_working_dir_is_a_tree_error(ray_wd: Path) -> None:
    @ray.remote(max_retries=0)
    @isolated_export(None, trees=["helper.py"])
    def f() -> None: ...

    with pytest.raises(TreeError, match=r"output tree 'helper\.py' is a file"):
        ray.get(f.remote())


def test_tree_replaced_by_a_file_during_the_call_is_a_tree_error(ray_wd: Path) -> None:
    @ray.remote(max_retries=0)
    @isolated_export(None)
    def f() -> None:
        os.rmdir("export")
        Path("export").write_text("oops")

    with pytest.raises(TreeError, match="output tree 'export' is not a directory") as info:
        ray.get(f.remote())
    assert "the artifacts are kept in" in str(info.value)


def test_existing_run_is_an_error_by_default_and_replaced_on_overwrite(
    ray_wd: Path, host: Path
) -> None:
    def make(conflict: str) -> ray.remote_function.RemoteFunction:
        @ray.remote(max_retries=0)
        @isolated_export("same", conflict=conflict)  # type: ignore[arg-type]
        def f(text: str) -> None:
            Path("export/x.txt").write_text(text)

        return f

    ray.get(make("error").remote("first"))
    with pytest.raises(RunExistsError, match="a committed run already exists"):
        ray.get(make("error").remote("second"))
    assert (host / "same" / "export" / "x.txt").read_text() == "first"
    ray.get(make("overwrite").remote("third"))
    assert files_under(host / "same").keys() == {"export/x.txt", MANIFEST_NAME}
    assert (host / "same" / "export" / "x.txt").read_text() == "third"


def test_destination_the_worker_cannot_prove_is_refused_not_created(
    ray_wd: Path, host: Path
) -> None:
    @ray.remote(max_retries=0)
    @isolated_export("proof/{i}")
    def f(i: int) -> None:
        Path("export/x.txt").write_text("x")

    # The driver published its token at decoration; replace it, as a different disk would.
    token = host / "proof" / ".raysync-visible"
    assert token.is_file()
    token.write_text("another disk")
    with pytest.raises(DestinationNotVisibleError, match="is not visible on this node") as info:
        ray.get(f.remote(1))
    assert not (host / "proof" / "1").exists()
    kept = kept_workspace(str(info.value))
    assert (kept / "export" / "x.txt").read_text() == "x"


def test_errors_are_raysync_errors_with_a_fix() -> None:
    with pytest.raises(RaySyncError) as info:
        isolated_export("nosuch://x")
    assert "fix:" in str(info.value)


def test_drivers_preparing_one_root_at_once_all_get_its_one_token(tmp_path: Path) -> None:
    # Found by the commit-protocol model: a driver read the token file another had created
    # but not yet written, and its workers then refused the shared root as "not visible".
    from concurrent.futures import ThreadPoolExecutor

    from raysync.dirrun import check_visible, prepare_root

    for i in range(40):
        root = tmp_path / f"root{i}"
        with ThreadPoolExecutor(4) as pool:
            prepared = list(pool.map(prepare_root, [root] * 4))
        assert len({p["token"] for p in prepared}) == 1, prepared
        for p in prepared:
            check_visible(p, root / "run", str(root / "run"))
        assert sorted(os.listdir(root)) == [".raysync-visible"]  # no draft left behind


def test_a_replaced_or_missing_visibility_token_is_noticed_after_a_good_check(
    tmp_path: Path,
) -> None:
    """Workers remember a token file they read (one stat per call after that, issue 20);
    another file in its place (a different mount, a rewrite) is read again, and a missing
    one refuses: the cache never vouches for a root the driver's token is not in."""
    from raysync.dirrun import check_visible, prepare_root
    from raysync.errors import DestinationNotVisibleError

    root = tmp_path / "root"
    prepared = prepare_root(root)
    check_visible(prepared, root / "run", "u")
    check_visible(prepared, root / "run", "u")  # remembered
    token = root / ".raysync-visible"
    other = tmp_path / "other-token"
    other.write_text("f" * len(prepared["token"]))  # same size, another file
    os.replace(other, token)
    with pytest.raises(DestinationNotVisibleError):
        check_visible(prepared, root / "run", "u")
    token.unlink()
    with pytest.raises(DestinationNotVisibleError):
        check_visible(prepared, root / "run", "u")
    token.write_text(prepared["token"])
    check_visible(prepared, root / "run", "u")
    # Rewritten in place, same size, its time put back: the change time still tells.
    before = token.stat()
    token.write_text("e" * len(prepared["token"]))
    os.utime(token, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(DestinationNotVisibleError):
        check_visible(prepared, root / "run", "u")


def test_a_destination_root_written_with_dotdot_is_refused(tmp_path: Path) -> None:
    """The token is proven through the file system (links followed) but containment is
    decided on names: a root with '..' could pass one and not mean the other."""
    from raysync.dirrun import check_inside
    from raysync.errors import DestinationError

    (tmp_path / "a" / "x").mkdir(parents=True)
    with pytest.raises(DestinationError):
        check_inside(tmp_path / "a" / "x" / ".." / "b", tmp_path / "a" / "b" / "c", "u")
    check_inside(tmp_path / "a" / "b", tmp_path / "a" / "b" / "c", "u")
    with pytest.raises(DestinationError):
        check_inside(tmp_path / "a" / "b", tmp_path / "a" / "b", "u")
    with pytest.raises(DestinationError):
        check_inside(tmp_path / "a" / "b", tmp_path / "a" / "bc", "u")


def test_a_looping_link_named_like_a_tree_in_the_project_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A link to itself called 'export' in the directory the call starts in is absent (as a
    dangling one), not a crash before the user's code."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "export").symlink_to("export")
    monkeypatch.chdir(project)
    out = isolated_export(str(tmp_path / "runs" / "{name}"))(_write_one)
    assert [f.path for f in out(name="r").manifest.files] == ["export/one.txt"]


def _write_one(name: str) -> None:
    Path("export/one.txt").write_text(name)


def test_a_callable_object_can_be_decorated_even_when_unhashable(tmp_path: Path) -> None:
    """An instance with ``__call__`` (whose class defines ``__eq__``, so it is unhashable) is
    decorated like a function; its runs are named after its class."""

    class Step:
        def __eq__(self, other: object) -> bool:
            return isinstance(other, Step)

        def __call__(self, name: str) -> str:
            Path("export/a.txt").write_text(name)
            return name

    step = isolated_export(str(tmp_path / "runs" / "{name}"))(Step())
    results = [step(name=n) for n in ("a", "b")]
    assert [r.value for r in results] == ["a", "b"]
    assert results[0].manifest.run["function"].endswith("Step")
    assert (tmp_path / "runs" / "b" / "export" / "a.txt").read_text() == "b"
