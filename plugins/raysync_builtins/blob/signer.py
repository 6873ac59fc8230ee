"""Driver-held credentials (``storage_options={"credentials": "driver"}``): the signer.

The driver keeps the store's credentials. A signer (an actor on the driver's node, pinned
there, ``num_cpus=0``; inside the driver process itself when the call runs there) holds them
and is the only party that talks to the store with them. A worker gets from it:

- presigned URLs, one object each, for the objects of the run it exports (never for a run's
  manifest or lock), with a short expiry (``upload_url_seconds``, 15 minutes): single PUTs
  for small files and packs, and presigned parts of a multipart upload that the signer
  creates, completes or aborts;
- presigned GETs for reading objects under the destination root (resume, re-export);
- listings and deletes under the root, made by the signer.

The lock and the manifest are written by the signer itself, with the store's conditional
write; before it writes a manifest it checks that every object the manifest lists is in the
store with the listed size. So a worker can write
no object outside the root, cannot write a manifest or a lock directly, and cannot commit a
run whose objects are missing. See docs/backends.md, "Workers without credentials".
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Mapping
from typing import Any

from raysync.errors import ConfigError, DestinationError
from raysync.manifest import MANIFEST_NAME, Manifest
from raysync.target import redact
from raysync_builtins.blob import driver_credentials
from raysync_builtins.blob.consts import LOCK_NAME
from raysync_builtins.blob.store import etag_of

#: How errors name a destination the signer does not know.
SHOWN = "(a destination with credentials='driver')"
#: What a worker's options hold instead of credentials.
MODE_KEY = "credentials"
SIGNER_KEY = "signer_target"
#: The worker's TLS check of the store (False, or a CA bundle's path), when not the default.
TLS_KEY = "signed_tls_verify"
#: Options that are not secrets and that the worker's engine needs.
_WORKER_KEYS = frozenset(
    {
        "upload_concurrency",
        "upload_part_concurrency",
        "upload_bytes_in_flight",
        "upload_part_size",
        "upload_pack_below",
        "upload_pack_size",
        "upload_retries",
        "upload_retry_base_delay",
        "upload_retry_max_delay",
        "upload_url_seconds",
    }
)
#: Object names a worker never gets a PUT URL for: the signer writes them.
CONTROL = (MANIFEST_NAME, LOCK_NAME)


def target_id(root_uri: str, options: Mapping[str, Any]) -> str:
    """A stable name for one destination and its options (never revealing them)."""
    doc = json.dumps({"root": root_uri, "options": options}, sort_keys=True, default=repr)
    return hashlib.sha256(doc.encode()).hexdigest()[:20]


def worker_options(root_uri: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options that travel to workers and results: raysync's upload settings and the
    signer's name for this destination; no credential, endpoint or client setting."""
    kept = {k: v for k, v in options.items() if k in _WORKER_KEYS}
    client = options.get("client_kwargs") or {}
    verify = (
        client.get("verify", options.get("verify", True)) if isinstance(client, Mapping) else True
    )
    if verify is not True:  # how to check the store's TLS certificate: not a secret
        kept[TLS_KEY] = verify if isinstance(verify, str) else bool(verify)
    return {**kept, MODE_KEY: "driver", SIGNER_KEY: target_id(root_uri, options)}


def check_mode(scheme: str, options: Mapping[str, Any]) -> None:
    mode = options.get(MODE_KEY, "worker")
    if mode not in ("worker", "driver"):
        raise ConfigError(
            f"storage_options[{MODE_KEY!r}] must be 'worker' or 'driver', not {mode!r}",
            hint="'driver' keeps the credentials on the driver; workers get presigned URLs",
        )
    seconds = options.get("upload_url_seconds", 900)
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not 1 <= seconds <= 604_800:
        raise ConfigError(
            f"storage_options['upload_url_seconds'] must be a whole number of seconds from 1 "
            f"to 604800 (S3's longest presigned URL), not {seconds!r}"
        )
    if mode == "driver" and scheme not in ("s3", "s3a"):
        raise ConfigError(
            f"credentials='driver' works with s3:// only, not {scheme}://",
            hint="drop the option, or export to S3 (or an S3-compatible store)",
        )


def _with_default_credentials(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options, with the driver's own AWS credentials when they name none."""
    return driver_credentials.resolve(options, (MODE_KEY, SIGNER_KEY))[0]


class Signer:
    """Holds the credentials of the destinations it was given; signs and commits for them."""

    def __init__(self, admin: str = "") -> None:
        self._targets: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        # Only the driver that made this signer (it knows this key) adds destinations: a
        # worker cannot widen one, or add its own.
        self._admin = admin

    def __repr__(self) -> str:
        return f"Signer({len(self._targets)} destination(s))"

    def allow(self, tid: str, root_uri: str, options: Mapping[str, Any], admin: str = "") -> None:
        """Serve destination ``tid``: objects strictly below ``root_uri``."""
        from raysync_builtins.blob import BlobBackend

        if not hmac.compare_digest(admin, self._admin):
            raise DestinationError("only the driver adds destinations to its signer", uri=SHOWN)
        full = _with_default_credentials(options)
        # Presigned URLs in Signature V4 (botocore signs some in V2 otherwise).
        config = dict(full.get("config_kwargs") or {})
        config.setdefault("signature_version", "s3v4")
        full["config_kwargs"] = config
        engine, root, _ = BlobBackend._open(root_uri, {**full, "engine": "fsspec"})
        fs = engine.fs  # type: ignore[attr-defined]
        with self._lock:
            known = self._targets.get(tid)
            if known is not None and known["root"] != root.rstrip("/"):
                raise DestinationError("a destination of this signer cannot move", uri=SHOWN)
            self._targets[tid] = {
                "root": root.rstrip("/"),
                "engine": engine,
                "fs": fs,
                "shown": redact(root_uri),
                "seconds": int(options.get("upload_url_seconds", 900)),
            }

    # -- checks --------------------------------------------------------------------------
    def _t(self, tid: str) -> dict[str, Any]:
        t = self._targets.get(tid)
        if t is None:
            raise DestinationError(
                "the driver's signer does not serve this destination",
                uri=SHOWN,
                hint="decorate the function in the driver process of this job",
            )
        return t

    @staticmethod
    def _below(t: dict[str, Any], path: str, *, or_root: bool = False) -> None:
        root = t["root"]
        parts = path.split("/")
        if (
            not (path.startswith(root + "/") or (or_root and path == root))
            or "" in parts
            or "." in parts
            or ".." in parts
        ):
            raise DestinationError(
                f"the signer refuses {redact(path)!r}: not below the destination root",
                uri=t["shown"],
            )

    @classmethod
    def _readable(cls, t: dict[str, Any], path: str) -> None:
        """Below the root, or the manifest or lock of the root or a directory above it (an
        export checks that its run is not nested in another)."""
        head, _, name = path.rpartition("/")
        root = t["root"]
        if name in CONTROL and (head == root or root.startswith(head + "/")) and head:
            return
        cls._below(t, path, or_root=True)

    # -- URLs ----------------------------------------------------------------------------
    def presign(self, tid: str, method: str, paths: list[str]) -> dict[str, str]:
        """``PUT`` or ``GET`` URLs for exactly ``paths`` (never a PUT for a manifest or lock)."""
        t = self._t(tid)
        if method not in ("PUT", "GET"):
            raise DestinationError(f"the signer signs PUT and GET, not {method}", uri=t["shown"])
        client_method = "put_object" if method == "PUT" else "get_object"
        out = {}
        for path in paths:
            self._below(t, path)
            if method == "PUT" and path.rsplit("/", 1)[-1] in CONTROL:
                raise DestinationError(
                    f"the signer writes {path.rsplit('/', 1)[-1]} itself; a worker never does",
                    uri=t["shown"],
                )
            out[path] = self._sign(t, client_method, path)
        return out

    @staticmethod
    def _sign(t: dict[str, Any], client_method: str, path: str, **params: Any) -> str:
        from fsspec.asyn import sync

        fs = t["fs"]
        bucket, _, key = path.partition("/")

        async def sign() -> str:
            await fs.set_session()
            s3 = await fs.get_s3(bucket)
            url: str = await s3.generate_presigned_url(
                ClientMethod=client_method,
                Params={"Bucket": bucket, "Key": key, **params},
                ExpiresIn=t["seconds"],
            )
            return url

        return str(sync(fs.loop, sign))

    # -- multipart -----------------------------------------------------------------------
    def start_multipart(self, tid: str, path: str) -> str:
        t = self._t(tid)
        self._below(t, path)
        if path.rsplit("/", 1)[-1] in CONTROL:
            raise DestinationError("the signer writes manifests and locks itself", uri=t["shown"])
        bucket, _, key = path.partition("/")
        out = t["fs"].call_s3("create_multipart_upload", Bucket=bucket, Key=key)
        return str(out["UploadId"])

    def presign_parts(
        self, tid: str, path: str, upload_id: str, numbers: list[int]
    ) -> dict[int, str]:
        t = self._t(tid)
        self._below(t, path)
        return {
            n: self._sign(t, "upload_part", path, UploadId=upload_id, PartNumber=n) for n in numbers
        }

    def finish_multipart(
        self, tid: str, path: str, upload_id: str, parts: list[dict[str, Any]] | None
    ) -> str | None:
        """Complete the upload with ``parts`` (or abort it when ``None``); its ETag."""
        t = self._t(tid)
        self._below(t, path)
        bucket, _, key = path.partition("/")
        if parts is None:
            t["fs"].call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
            return None
        done = t["fs"].call_s3(
            "complete_multipart_upload",
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
        )
        return etag_of(done)

    # -- what the signer does itself -----------------------------------------------------
    def put_control(self, tid: str, path: str, data: bytes, create: bool) -> str | None:
        """Write a run's lock, or its manifest once every object it lists is there."""
        t = self._t(tid)
        self._below(t, path)
        run, _, name = path.rpartition("/")
        if name not in CONTROL:
            raise DestinationError("the signer writes only manifests and locks", uri=t["shown"])
        if name == MANIFEST_NAME:
            self._check_objects(t, run, data)
            create = True  # never over a committed manifest (a replaced run's goes first)
        # The store's own errors come back as they are: the caller's retry policy tells a
        # throttled write (retried) from a refused one.
        return t["engine"].put(path, data, create=create)  # type: ignore[no-any-return]

    @staticmethod
    def _check_objects(t: dict[str, Any], run: str, data: bytes) -> None:
        manifest = Manifest.from_bytes(data, uri=t["shown"])
        found = t["engine"].listing(run)
        wrong = []
        for f in manifest.files:
            if f.pack is not None:
                obj = f.pack.get("object")
                if not isinstance(obj, str) or obj.rsplit("/", 1)[-1] in CONTROL:
                    wrong.append(f.path)
                elif f"{run}/{obj}" not in found:
                    wrong.append(f.path)
                continue
            info = found.get(f"{run}/{f.path}")
            if info is None or int(info.get("size") or 0) != f.size:
                wrong.append(f.path)
        if wrong:
            raise DestinationError(
                f"the signer refuses the manifest: {len(wrong)} listed object(s) are not in "
                f"the store as listed, e.g. {wrong[0]!r}",
                uri=t["shown"],
            )

    def get(self, tid: str, path: str) -> bytes:
        t = self._t(tid)
        self._readable(t, path)
        return bytes(t["engine"].get(path))

    def listing(self, tid: str, prefix: str) -> dict[str, dict[str, Any]]:
        t = self._t(tid)
        self._readable(t, prefix)
        found = t["engine"].listing(prefix)
        keep = ("size", "etag", "modified")
        return {k: {n: v.get(n) for n in keep} for k, v in found.items()}

    def delete(self, tid: str, paths: list[str]) -> None:
        t = self._t(tid)
        for p in paths:
            self._below(t, p)
        t["engine"].delete(paths)


# -- where the signer lives ------------------------------------------------------------------

#: The signer of this process (the driver's), and handles to actors this driver created: an
#: actor whose handles are all gone is destroyed, and it must live as long as the driver.
_LOCAL = Signer()
_ACTORS: dict[tuple[str, str], Any] = {}
_FOUND: dict[tuple[str, str], Any] = {}


_ADMIN: dict[tuple[str, str], str] = {}


def _admin_key(key: tuple[str, str]) -> str:
    return _ADMIN.setdefault(key, secrets.token_hex(16))


def _cluster(ctx: Any) -> str:
    """This cluster start (a restarted cluster reuses addresses and job ids)."""
    get = getattr(ctx, "get_session_name", None)
    if get is not None:
        session = get()
    else:  # older Ray: only on the node object
        import ray

        node = getattr(ray._private.worker.global_worker, "node", None)
        session = getattr(node, "session_name", "")
    return f"{ctx.gcs_address}|{session}"


def signer_name(job_id: str) -> str:
    return f"raysync-signer-{job_id}"


def prepare(root_uri: str, options: Mapping[str, Any]) -> dict[str, str]:
    """On the driver: serve this destination from this process and, with Ray up, from the
    signer actor on this node; the facts a worker needs to find it."""
    import ray

    tid = target_id(root_uri, options)
    # The driver's own credentials (when the options name none), resolved here, in the driver.
    full, changing = driver_credentials.resolve(options, (MODE_KEY, SIGNER_KEY))
    _LOCAL.allow(tid, root_uri, full)
    if not ray.is_initialized():
        if changing is not None:
            driver_credentials.keep_fresh(
                ("local", tid), changing, full, [lambda o: _LOCAL.allow(tid, root_uri, o)]
            )
        return {"signer": "", "target": tid}
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ctx = ray.get_runtime_context()
    key = (_cluster(ctx), signer_name(ctx.get_job_id()))
    actor = _ACTORS.get(key)
    if actor is None:
        try:
            ray.get_actor(key[1], namespace=ctx.namespace)
        except ValueError:
            pass  # as it should be: no actor of that name yet
        else:  # someone else's actor under the signer's name: never given the credentials
            raise DestinationError(
                f"an actor named {key[1]!r} exists already in this job's namespace, so the "
                "driver does not hand it the credentials",
                uri=SHOWN,
                hint="do not start actors under raysync's names; use another namespace",
            )
        actor = _ACTORS[key] = (
            ray.remote(Signer)
            .options(
                name=key[1],
                namespace=ctx.namespace,
                num_cpus=0,
                max_concurrency=64,
                scheduling_strategy=NodeAffinitySchedulingStrategy(ctx.get_node_id(), soft=False),
            )
            .remote(_admin_key(key))
        )
    ray.get(actor.allow.remote(tid, root_uri, full, _admin_key(key)))
    if changing is not None:

        def to_actor(
            fresh: dict[str, Any], actor: Any = actor, admin: str = _admin_key(key)
        ) -> None:
            try:
                ray.get(actor.allow.remote(tid, root_uri, fresh, admin), timeout=60)
            except ray.exceptions.ActorDiedError:
                raise driver_credentials.Stop from None  # this cluster's signer is gone

        local = lambda fresh: _LOCAL.allow(tid, root_uri, fresh)  # noqa: E731
        driver_credentials.keep_fresh((*key, tid), changing, full, [local, to_actor])
    return {"signer": key[1], "namespace": ctx.namespace or "", "target": tid}


#: Signer calls that may be sent twice without harm.
_IDEMPOTENT = frozenset({"presign", "presign_parts", "get", "listing"})


class SignerClient:
    """Calls one signer: the driver's own (in this process) or the job's actor."""

    def __init__(self, tid: str) -> None:
        self.tid = tid
        self.actor = None if tid in _LOCAL._targets else _find_actor(tid)

    def call(self, method: str, *args: Any) -> Any:
        if self.actor is None:
            return getattr(_LOCAL, method)(self.tid, *args)
        import ray

        for attempt in (1, 2):
            try:
                return ray.get(getattr(self.actor, method).remote(self.tid, *args))
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, BaseException):
                    raise cause from None  # the signer's own error, not Ray's wrapping of it
                raise
            except ray.exceptions.ActorDiedError:
                _FOUND.clear()
                if attempt == 1 and method in _IDEMPOTENT:
                    # The driver may have started another signer (a new one after a
                    # restart): asked there, when asking twice is harmless.
                    try:
                        self.actor = _find_actor(self.tid)
                        continue
                    except DestinationError:
                        pass
                raise DestinationError(
                    "the driver's signer is gone (its driver ended or failed), so this export "
                    "cannot reach the store",
                    uri=SHOWN,
                    hint="keep the driver running until its tasks end",
                ) from None
            except ray.exceptions.ActorUnavailableError:
                # Unreachable for a moment: asked again once, when asking twice is harmless.
                if attempt == 2 or method not in _IDEMPOTENT:
                    raise
                time.sleep(1.0)
        raise AssertionError("unreachable")


def _find_actor(tid: str) -> Any:
    import ray

    if not ray.is_initialized():
        raise DestinationError(
            "this destination keeps its credentials on the driver (credentials='driver'), "
            "and no driver's signer is reachable from here",
            uri=SHOWN,
            hint="export and read such runs from a Ray job whose driver decorated the "
            "function, or pass the credentials themselves in storage_options",
        )
    ctx = ray.get_runtime_context()
    key = (_cluster(ctx), signer_name(ctx.get_job_id()))
    actor = _FOUND.get(key)
    if actor is None:
        try:
            actor = _FOUND[key] = ray.get_actor(key[1], namespace=ctx.namespace)
        except ValueError:
            raise DestinationError(
                "this destination keeps its credentials on the driver (credentials='driver'), "
                "and this job's driver started no signer",
                uri=SHOWN,
                hint="decorate the function in the driver process (import it there before "
                "submitting tasks)",
            ) from None
    return actor
