"""The trees the bench exports: the named shapes, ``--tree`` specs, writing them."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

KIB, MIB = 1024, 1024 * 1024

#: A tree: groups of (count, bytes per file).
Tree = tuple[tuple[int, int], ...]

SHAPES: dict[str, Tree] = {
    "small": ((20_000, 4 * KIB),),
    "medium": ((500, MIB),),
    "mixed": ((2_000, 4 * KIB), (50, MIB), (2, 32 * MIB)),
    "large": ((4, 256 * MIB),),
}
#: Against an S3 API without --full: the same shapes, fewer files.
S3_SHAPES: dict[str, Tree] = {
    "small": ((500, 4 * KIB),),
    "medium": ((100, MIB),),
    "mixed": ((200, 4 * KIB), (10, MIB), (1, 32 * MIB)),
    "large": ((2, 64 * MIB),),
}
#: Against a fast local S3 server (rclone): the sizes S3 clients publish figures for.
FAST_S3_SHAPES: dict[str, Tree] = {
    "small": ((2_000, 4 * KIB),),
    "medium": ((100, MIB),),
    "mixed": ((1_000, 4 * KIB), (20, MIB), (2, 32 * MIB)),
    "large": ((4, 256 * MIB),),
}
#: The incremental measure: 1 GiB with --full, 256 MiB otherwise, in 16 MiB files.
REEXPORT = {True: ((64, 16 * MIB),), False: ((16, 16 * MIB),)}
DEFAULT_SHAPES = ("small", "medium", "mixed")


def parse_tree(spec: str) -> tuple[str, Tree]:
    """``NAME=COUNTxSIZE[+COUNTxSIZE...]`` with sizes like ``4K``, ``1M``, ``2G``, ``100``."""
    name, _, body = spec.partition("=")
    units = {"": 1, "K": KIB, "M": MIB, "G": 1024 * MIB}
    groups = []
    for part in body.split("+"):
        m = re.fullmatch(r"(\d+)x(\d+)([KMG]?)", part.strip(), re.IGNORECASE)
        if not m:
            raise argparse.ArgumentTypeError(
                f"--tree {spec!r}: write NAME=COUNTxSIZE[+COUNTxSIZE...], e.g. small=500x4K"
            )
        groups.append((int(m.group(1)), int(m.group(2)) * units[m.group(3).upper()]))
    if not name or not groups:
        raise argparse.ArgumentTypeError(f"--tree {spec!r}: name the tree, e.g. small=500x4K")
    return name, tuple(groups)


def make_tree(root: Path, tree: Tree) -> None:
    """Incompressible files under ``root/export``: groups of many files in nested dirs."""
    for g, (count, size) in enumerate(tree):
        for i in range(count):
            d = root / "export" / f"g{g}"
            if count > 50:
                d = d / f"d{i % 20:02d}" / f"e{i % 7}"
            d.mkdir(parents=True, exist_ok=True)
            with open(d / f"f{i:06d}.bin", "wb") as f:
                left = size
                while left:
                    n = min(left, 4 * MIB)
                    f.write(os.urandom(n))
                    left -= n


def tree_totals(tree: Tree) -> tuple[int, int]:
    return sum(c for c, _ in tree), sum(c * s for c, s in tree)


# -- memory --------------------------------------------------------------------------------
