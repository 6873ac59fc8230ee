"""Demo pipeline: writes relative paths, exactly like code that assumes it owns its cwd."""

import argparse
import csv
import hashlib
import json
import os
import random
import socket
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--run", required=True)
parser.add_argument("--profile", default="fast")
args = parser.parse_args()

rows = {"fast": 200, "full": 5000}.get(args.profile, 200)
rng = random.Random(hashlib.sha256(args.run.encode()).digest())

export = Path("export") / args.run
data = Path("data") / args.run
artifacts = Path(os.environ.get("TV_ARTIFACTS_DIR", "artifacts")) / "summaries" / "runs" / args.run
for d in (export, data, artifacts):
    d.mkdir(parents=True, exist_ok=True)

samples = [(i, rng.random(), rng.gauss(0, 1)) for i in range(rows)]
with open(data / "samples.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["i", "u", "z"])
    w.writerows(samples)
(data / "blob.bin").write_bytes(rng.randbytes(64 * 1024))

loss = sum(abs(z) for _, _, z in samples) / rows
(export / "metrics.json").write_text(json.dumps({"run": args.run, "loss": loss, "rows": rows}))
(export / "config.json").write_text(json.dumps({"profile": args.profile, "cwd": os.getcwd()}))
(artifacts / "summary.json").write_text(
    json.dumps({"run": args.run, "host": socket.gethostname(), "loss": loss})
)
print(json.dumps({"run": args.run, "loss": loss}))
