"""The checksums a manifest can record, and how to compute them.

Every manifest names one algorithm (its ``checksum`` field) and records one hex digest per
file. The trade-off (docs/manifest.md, "Choosing the checksum"):

- ``xxh3-128`` (default): a non-cryptographic 128-bit hash at memory speed (≈ 25 GB/s per
  core here). It catches every accident — truncation, bit rot, a torn or mixed-up copy —
  with a 2⁻¹²⁸ chance of missing one, but it is **not tamper-evident**: someone who can
  write the destination can forge a file with the same digest.
- ``blake3``: cryptographic and tamper-evident at ≈ 4 GB/s per core (needs the ``blake3``
  package: ``pip install 'raysync[blake3]'``).
- ``sha256``: cryptographic, understood by every tool (``sha256sum``), ≈ 1.8 GB/s per core.
  Runs written by raysync before version 2 of the manifest use it.

A manifest is only as tamper-evident as the place it is stored: with any algorithm, someone
who can rewrite the files can also rewrite the manifest. Pick ``blake3`` or ``sha256`` when
you keep digests elsewhere (a registry, a signed release) and need them to be unforgeable.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from raysync.errors import ConfigError

DEFAULT = "xxh3-128"
CHUNK = 1 << 20


class Hasher(Protocol):
    """What every algorithm's hasher offers (hashlib's interface)."""

    def update(self, data: Any, /) -> Any: ...

    def hexdigest(self) -> str: ...


def _xxh3() -> Hasher:
    import xxhash

    return xxhash.xxh3_128()


def _blake3() -> Hasher:
    try:
        from blake3 import blake3
    except ImportError as e:
        raise ConfigError(
            "checksum='blake3' needs the blake3 package, which is not installed",
            hint="pip install 'raysync[blake3]' (or choose checksum='sha256')",
        ) from e
    return blake3()


_FACTORIES: dict[str, Callable[[], Hasher]] = {
    "xxh3-128": _xxh3,
    "blake3": _blake3,
    "sha256": hashlib.sha256,
}
#: The algorithms a manifest may name.
ALGORITHMS: tuple[str, ...] = tuple(_FACTORIES)


def check(name: str) -> str:
    """``name`` if raysync can compute it here; a :class:`ConfigError` otherwise."""
    if name not in _FACTORIES:
        raise ConfigError(
            f"checksum={name!r} is not one of {', '.join(ALGORITHMS)}",
            hint="use 'xxh3-128' (fast, catches corruption) or 'blake3'/'sha256' "
            "(tamper-evident); see docs/manifest.md",
        )
    new(name)  # a missing optional package fails here, on the driver
    return name


def new(name: str = DEFAULT) -> Hasher:
    """A fresh hasher for algorithm ``name``."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ConfigError(
            f"unknown checksum algorithm {name!r} (this raysync knows {', '.join(ALGORITHMS)})",
            hint="upgrade raysync to read runs written by a newer version",
        ) from None
    return factory()


def of_bytes(data: bytes | memoryview, name: str = DEFAULT) -> str:
    return oneshot(name)(data)


def oneshot(name: str = DEFAULT) -> Callable[[bytes | memoryview], str]:
    """A function from bytes to their hex digest: for many small files, cheaper than a
    hasher object per file."""
    if name == "xxh3-128":
        import xxhash

        return xxhash.xxh3_128_hexdigest

    def digest(data: bytes | memoryview) -> str:
        h = new(name)
        h.update(data)
        return h.hexdigest()

    return digest


def of_file(path: Path, name: str = DEFAULT) -> str:
    """Hex digest of a file, streamed in 1 MiB chunks."""
    h = new(name)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()
