"""``python -m raysync.bench``: raysync's export throughput against the tools users would
otherwise use, measured in one run, interleaved, reported as medians and ratios.

Backends (``--backend``; ``--target URI`` measures against a destination of your own):

- ``local`` (local-copy) against ``cp -a``, ``shutil.copytree`` and fsspec's naive
  ``put(recursive=True)``;
- ``fsspec`` against an S3 API: a moto server the bench starts in its own process on
  127.0.0.1 over HTTPS (``pip install 'raysync[bench]'``), ``--endpoint URL``, or
  ``--target s3://bucket/prefix``. Baselines: the server's own PUT ceiling (boto3
  ``put_object`` from 16 threads, data in memory; trees of small files), naive
  ``s3fs.put(recursive=True)`` and boto3's transfer manager. raysync runs one object per file,
  and in packing mode (``upload_pack_below``) on trees with small files;
- ``rsync`` to a mounted path (a local directory here) against plain ``rsync -a``;
- ``incremental``: re-exporting an unchanged tree (local-copy and fsspec) against a full
  export of it, from the same call (``sync_every``: fingerprints known) and from a retried
  task (every file hashed again);
- ``ray``: the decorator's per-call overhead on a local Ray (an empty tree against a bare
  task) and return-by-value throughput (against a task returning the same bytes).

Shapes (``--shape``): ``small`` (20,000 x 4 KiB in nested directories), ``medium``
(500 x 1 MiB), ``mixed`` (2,000 x 4 KiB + 50 x 1 MiB + 2 x 32 MiB) and, with ``--full``,
``large`` (4 x 256 MiB). Against an S3 API the many-file trees are smaller unless
``--s3-full`` (500 x 4 KiB, 100 x 1 MiB, ...), since a server taking ~200 PUTs/s needs
minutes for 20,000 files. ``--tree NAME=500x4K+2x32M`` measures a tree of your own. All
data is incompressible.

Each repetition writes to a fresh destination, and the contenders take turns
(A B C A B C ...). Reported per contender: median seconds, files/s, MB/s, peak extra memory
(RSS above what the bench held before; for a command, the command's own peak) and the ratio
to the best baseline (the fastest non-raysync contender) and to each baseline.
"""

from raysync.bench.cli import main

__all__ = ["main"]
