"""``raysync doctor [URI]``: check, on every alive node of a cluster, that calls are isolated and
that the chosen destination works from there — before a long job finds out the hard way.

The seed's validation step (its ``meta_ray_test``), as a command. On each node it runs one
probe call, pinned there (node affinity), decorated with ``isolated_export(URI)``:

- **isolated**: the call's cwd is its own workspace, not the driver's directory and not the
  shared unpacked working_dir;
- **export**: the backend committed a small probe run from that node (which proves the
  destination is visible there, the credentials work and the tools, e.g. rsync, are present);
- **verified**: the probe run read back on this machine matches its checksums.

Probe runs go to ``<URI>/.raysync-doctor/<probe id>`` (or, when the URI has ``{fields}``, to
the URI with every field set to the probe id); they are small and may be deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import ray

from raysync.decorator import isolated_export
from raysync.errors import RaySyncError
from raysync.target import BUILTIN_FIELDS, template_fields
from raysync.workspace import current_workspace

PROBE_FILE = "export/raysync-doctor.txt"


def _listing(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))[:200]
    except OSError:
        return []


def _probe(host_cwd: str, host_listing: list[str], payload: str, **_fields: Any) -> dict[str, Any]:
    """Runs on a node: what the call sees, and one small file to export."""
    cwd = os.getcwd()
    ws = current_workspace()
    Path(PROBE_FILE).write_text(payload)
    return {
        "cwd": cwd,
        "workspace": str(ws.root) if ws else None,
        "host_cwd": host_cwd,
        # The driver's directory, with the driver's files in it (not merely a same-named dir).
        "host_cwd_visible": os.path.isdir(host_cwd) and _listing(host_cwd) == host_listing,
        "node_id": ray.get_runtime_context().get_node_id(),
    }


def probe_uri(uri: str | None) -> tuple[str | None, list[str]]:
    """The URI probes export to, and the template fields the probe must fill."""
    if uri is None:
        return None, []
    fields = [f for f in template_fields(uri) if f not in BUILTIN_FIELDS]
    if template_fields(uri):
        return uri, fields
    return uri.rstrip("/") + "/.raysync-doctor/{probe_id}", ["probe_id"]


def check_nodes(
    uri: str | None,
    *,
    storage_options: dict[str, Any] | None = None,
    backend: str | None = None,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Probe every alive node of the connected cluster; the report ``format_report`` prints."""
    target, fields = probe_uri(uri)
    host_cwd = os.getcwd()
    probe = ray.remote(num_cpus=0, max_retries=0)(
        isolated_export(target, backend=backend, storage_options=storage_options)(_probe)
    )
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"]]
    listing = _listing(host_cwd)
    runs: dict[str, tuple[Any, str]] = {}
    for n in nodes:
        probe_id = f"{n['NodeID'][:12]}-{uuid.uuid4().hex[:8]}"
        payload = f"raysync doctor probe {probe_id}\n"
        strategy = NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ref = probe.options(scheduling_strategy=strategy).remote(
            host_cwd, listing, payload, **dict.fromkeys(fields, probe_id)
        )
        runs[n["NodeID"]] = (ref, payload)
    deadline = time.monotonic() + timeout
    rows = []
    for n in nodes:
        ref, payload = runs[n["NodeID"]]
        rows.append(_result(n, ref, payload, host_cwd, max(0.0, deadline - time.monotonic())))
    return {
        "uri": uri or "(return-by-value, the default)",
        "host_cwd": host_cwd,
        "nodes": rows,
        "ok": all(r["ok"] for r in rows),
    }


def _result(
    node: dict[str, Any], ref: Any, payload: str, host_cwd: str, timeout: float
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "node_id": node["NodeID"],
        "address": node["NodeManagerAddress"],
        "isolated": None,
        "host_cwd_visible": None,
        "exported": False,
        "verified": False,
        "uri": None,
        "problem": None,
        "fix": None,
    }
    try:
        result = ray.get(ref, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        row["problem"] = f"the probe did not finish within {timeout:.0f} s"
        row["fix"] = "check that the node has free resources and its raylet is healthy"
        return _verdict(row)
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if isinstance(e.cause, BaseException) else e
        row["problem"] = _first_line(cause)
        row["fix"] = getattr(cause, "hint", None)
        return _verdict(row)
    except RaySyncError as e:
        row["problem"], row["fix"] = _first_line(e), e.hint
        return _verdict(row)
    seen = result.value
    row["isolated"] = bool(
        seen["workspace"]
        and seen["cwd"] == seen["workspace"]
        and os.path.normpath(seen["cwd"]) != os.path.normpath(host_cwd)
    )
    row["host_cwd_visible"] = seen["host_cwd_visible"]
    row["exported"] = True
    row["uri"] = result.uri
    try:
        with tempfile.TemporaryDirectory(prefix="raysync-doctor-") as tmp:
            out = result.materialize(Path(tmp) / "run")
            row["verified"] = (out / PROBE_FILE).read_text() == payload
            if not row["verified"]:
                row["problem"] = "the probe file read back differs from what was written"
    except RaySyncError as e:
        row["problem"], row["fix"] = f"read back failed: {_first_line(e)}", e.hint
    if row["isolated"] is False and row["problem"] is None:
        row["problem"] = f"the call ran in {seen['cwd']}, not in its own workspace"
        row["fix"] = "decorate with @isolated_export and keep chdir=True"
    return _verdict(row)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.split("\n  fix:")[0].strip()[:1000]


def _verdict(row: dict[str, Any]) -> dict[str, Any]:
    row["ok"] = bool(row["isolated"] and row["exported"] and row["verified"])
    return row


def format_report(report: dict[str, Any]) -> str:
    def mark(v: Any) -> str:
        return "-" if v is None else ("yes" if v else "NO")

    lines = [f"raysync doctor: {report['uri']}", f"driver cwd: {report['host_cwd']}", ""]
    lines.append(
        f"{'node':<14} {'address':<15} {'isolated':<9} {'exported':<9} {'verified':<9} "
        f"{'sees driver cwd':<16} verdict"
    )
    for r in report["nodes"]:
        lines.append(
            f"{r['node_id'][:12]:<14} {r['address']:<15} {mark(r['isolated']):<9} "
            f"{mark(r['exported']):<9} {mark(r['verified']):<9} "
            f"{mark(r['host_cwd_visible']):<16} {'PASS' if r['ok'] else 'FAIL'}"
        )
    for r in report["nodes"]:
        if not r["ok"]:
            lines.append(f"\nnode {r['node_id'][:12]} ({r['address']}): {r['problem']}")
            if r["fix"]:
                lines.append(f"  fix: {r['fix']}")
    failed = sum(1 for r in report["nodes"] if not r["ok"])
    lines.append(
        "\n"
        + (
            f"all {len(report['nodes'])} node(s) passed"
            if not failed
            else f"{failed} of {len(report['nodes'])} node(s) FAILED"
        )
    )
    return "\n".join(lines)


def main(
    uri: str | None,
    *,
    address: str | None,
    storage_options: dict[str, Any] | None,
    backend: str | None,
    working_dir: str | None,
    node_ip_address: str | None,
    timeout: float,
    as_json: bool,
) -> int:
    init: dict[str, Any] = {"address": address or "auto", "log_to_driver": False}
    if working_dir:
        from raysync.project import runtime_env

        init["runtime_env"] = runtime_env(working_dir, pip=False)
    if node_ip_address:
        init["_node_ip_address"] = node_ip_address
    # Ray prints its own warnings ("(raylet) WARNING: ...") to the driver's stdout on some
    # versions (2.40), whatever log_to_driver says: while Ray runs, stdout is stderr, so
    # that the report (--json) is all that stdout holds.
    with contextlib.redirect_stdout(sys.stderr):
        ray.init(**init)
        try:
            report = check_nodes(
                uri, storage_options=storage_options, backend=backend, timeout=timeout
            )
        finally:
            ray.shutdown()
    print(json.dumps(report, indent=1) if as_json else format_report(report))
    return 0 if report["ok"] else 1
