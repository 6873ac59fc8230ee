"""Which engine serves a URI: obstore for ``s3://`` when it is installed and understands
every option (``engine="auto"``, the default), fsspec for everything else."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

from raysync.errors import ConfigError, MissingDependencyError
from raysync_builtins.blob.store import Engine, Options, log

#: Schemes the obstore engine serves.
OBSTORE_SCHEMES = frozenset({"s3", "s3a"})

_SAID: set[str] = set()


def obstore_installed() -> bool:
    return importlib.util.find_spec("obstore") is not None


def choose(scheme: str, fs_options: Mapping[str, Any], opts: Options) -> str:
    """ "obstore" or "fsspec" for this scheme and these options; a clear error when the
    engine asked for cannot serve them."""
    if opts.engine == "fsspec":
        return "fsspec"
    if scheme not in OBSTORE_SCHEMES:
        if opts.engine == "obstore":
            raise ConfigError(
                f"storage_options engine='obstore' serves s3:// only, not {scheme}://",
                hint="leave engine unset (fsspec serves this protocol)",
            )
        return "fsspec"
    from raysync_builtins.blob.engine_obstore import Unsupported, s3_config

    if not obstore_installed():
        if opts.engine == "obstore":
            raise MissingDependencyError(
                "s3:// with engine='obstore'", extra="s3", package="obstore"
            )
        return "fsspec"
    try:
        s3_config(fs_options)
    except Unsupported as e:
        if opts.engine == "obstore":
            raise ConfigError(
                f"the obstore engine cannot honour {e}",
                hint="remove that option, or pass engine='fsspec' to use s3fs",
            ) from None
        if str(e) not in _SAID:
            _SAID.add(str(e))
            log.info("raysync: s3:// through fsspec (s3fs), as obstore cannot honour %s", e)
        return "fsspec"
    return "obstore"


def obstore_engine(
    scheme: str, rest: str, fs_options: Mapping[str, Any], opts: Options
) -> Engine | None:
    """The obstore engine for ``scheme://rest`` when :func:`choose` picks it, else ``None``."""
    if choose(scheme, fs_options, opts) != "obstore":
        return None
    from raysync_builtins.blob.engine_obstore import ObstoreEngine

    bucket = rest.split("/", 1)[0]
    if not bucket:
        raise ConfigError(f"{scheme}:// needs a bucket", hint=f"e.g. {scheme}://bucket/runs/x")
    return ObstoreEngine(bucket, fs_options, opts)
