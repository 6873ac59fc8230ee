"""The fsspec backend's names and tables."""

from __future__ import annotations

LOCK_NAME = ".raysync-lock"
#: Protocols whose optional package is one of raysync's extras.
EXTRAS = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gcs",
    "gcs": "gcs",
    "az": "azure",
    "abfs": "azure",
    "abfss": "azure",
    "adl": "azure",
}
#: The longest object key (in UTF-8 bytes) the store takes: checked before anything is sent.
KEY_LIMIT = {"s3": 1024, "s3a": 1024, "gs": 1024, "gcs": 1024, "az": 1024, "abfs": 1024}
#: Protocols where an exclusive create is known to be enforced by the store.
CONDITIONAL = {"s3", "s3a", "memory"}
#: fsspec protocols that are not storage a run can be written to.
NOT_STORAGE = {
    "file",
    "local",
    "return",
    "http",
    "https",
    "data",
    "reference",
    "cached",
    "blockcache",
    "filecache",
    "simplecache",
    "zip",
    "tar",
    "libarchive",
    "dir",
    "generic",
    "async_wrapper",
    "asyncwrapper",
    "asynclocal",
    "github",
    "git",
    "gist",
}


#: Packs are named ``.raysync-pack-<export id>-<n>.tar`` at the run's root.
PACK_PREFIX = ".raysync-pack-"
_TAR_BLOCK = 512
