"""S3CalibratorStore: the calibrator store on S3-compatible object storage (AWS S3, MinIO, Ceph, R2, SeaweedFS).

The same public interface and guarantees as :class:`service.store.CalibratorStore`, for replicas on many
hosts that share no POSIX directory. Layout under ``s3://bucket/prefix/``::

    <prefix>/<model>/model.json                    model metadata (JSON object)
    <prefix>/<model>/model.pt                      uploaded TorchScript bytes (optional)
    <prefix>/<model>/active                        pointer: {"version": n | null, "nonce": ...}
    <prefix>/<model>/calibrators/<version>.json    one calibrator document, never overwritten
    <prefix>/<model>/calibrators/.reserved/<n>     empty marker: version number n has been handed out
    <prefix>/<model>/calibrators/.deleted/<n>      empty marker: version n is deleted (or being deleted)

How the guarantees hold without locks (S3 conditional writes are atomic on the server):

- **Version numbers are never reused.** A number is claimed by creating ``.reserved/<n>`` with
  ``PutObject(IfNoneMatch="*")``: exactly one writer gets it, the others get 412 and try the next number.
  Markers are kept forever, so a number stays taken after its version is deleted. The document is then
  written with ``IfNoneMatch="*"`` too, so a stored version is never overwritten. A PutObject is atomic: a
  reader sees the whole document or none.
- **The active pointer moves by compare-and-swap** (``PutObject(IfMatch=<ETag read>)``, or
  ``IfNoneMatch="*"`` when there is none yet). Its body carries a fresh nonce, so every write gives it a new
  ETag. Activations from several replicas never interleave into a pointer nobody wrote; a lost swap re-reads
  and retries (the last activation wins), and after :data:`CAS_ATTEMPTS` lost rounds the caller gets
  :class:`~service.errors.Conflict` (409).
- **"Delete v unless it is active" cannot race "activate v".** Deleting writes ``.deleted/<v>``, then swaps
  the pointer to itself (new nonce) unless it names v, then removes the document. Activating reads the
  pointer, then checks the document and the ``.deleted`` marker, then swaps: an activation that read the
  pointer before the delete's swap loses its own swap, one that read it after sees the marker.
- **A crash between writing a version and moving the pointer** leaves the old pointer, so the old active
  version keeps serving; the new version is stored inactive. A failed activation of a new fit withdraws the
  new document (unless the pointer names it), so that an error means "no new version", as on a directory.
- **Bounded staleness.** Each process caches every model's metadata and pointer for at most ``refresh_s``
  seconds (``CALIBSERVE_STORE_REFRESH_S``). A background thread refreshes the models in use with
  ETag-conditional GETs (an unchanged object costs a 304, not a download), so the request path reads memory.
  A change written by any replica is served by every replica within ``refresh_s`` plus one round trip;
  :meth:`S3CalibratorStore.get_calibrator` (``?version=N``) always reads the bucket and is exact.
- **Faults** (bucket unreachable, 5xx, throttling after botocore's bounded retries with jittered backoff, a
  missing bucket, credentials refused) raise :class:`~service.errors.StoreUnavailable` with a one-line
  reason. While the bucket is unreachable, :meth:`~S3CalibratorStore.change_stamp` keeps answering from the
  cache, so calibrate and predict keep serving the cached active calibrators; :attr:`view_age_s` says how
  old that view is.

Deleting a model removes ``model.json`` first (the model is gone for every reader at once), then the rest. A
write racing the deletion (a fit on another replica) can leave objects under the name; a model later created
under that name lists them (its numbering then continues after them, so none is reused). Deleting the model
again clears them.
boto3 is imported on first use (the ``s3`` extra): a directory store never needs it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from service.errors import Conflict, InvalidInput, NotFound, StoreUnavailable
from service.lazy import lazy_module
from service.names import validate_model_name
from service.store import _check_limit, _check_version, _encode, calibrator_page, model_page

boto3 = lazy_module("boto3", globals(), needed_for="an s3:// calibrator store (the `s3` extra)")
botocore_config = lazy_module(
    "botocore.config", globals(), needed_for="an s3:// calibrator store", binding="botocore_config"
)
botocore_exceptions = lazy_module(
    "botocore.exceptions", globals(), needed_for="an s3:// calibrator store", binding="botocore_exceptions"
)

__all__ = ["CAS_ATTEMPTS", "S3CalibratorStore", "parse_s3_url"]

logger = logging.getLogger(__name__)

CAS_ATTEMPTS = 16
# How long a model stays on the background refresher's list after the last request that needed it, and how
# many (the most recently used) it refreshes per round. Each costs two conditional GETs per refresh_s / 2 and
# worker; a model off the list is read again by the first request that needs it (in a thread).
WATCH_S = 60.0
MAX_WATCHED = 256
# botocore's "standard" retry mode: exponential backoff with full jitter on throttling, 5xx and connection
# errors. Three attempts in all (the first and two retries: `total_max_attempts`; botocore's `max_attempts`
# counts retries only) bound a failing call to a few seconds, so a write answers 503 rather than hang.
RETRY_ATTEMPTS = 3
CONNECT_TIMEOUT_S = 2.0
READ_TIMEOUT_S = 10.0

_MODEL_FILE = "model.json"
_TORCHSCRIPT_FILE = "model.pt"
_POINTER_FILE = "active"
_CALIBRATORS = "calibrators/"
_RESERVED = "calibrators/.reserved/"
_DELETED = "calibrators/.deleted/"
_VERSION_KEY_RE = re.compile(r"calibrators/(?:\.reserved/|\.deleted/)?([1-9][0-9]*)(\.json)?")
_DOCUMENT_KEY_RE = re.compile(r"calibrators/([1-9][0-9]*)\.json")
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_CREDENTIAL_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "403"}
)
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
# 409 ConditionalRequestConflict: another conditional write to the key was in flight (AWS); retry as a 412.
_LOST_RACE_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict"})


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix/")`` (prefix ``""`` for the whole bucket)."""
    if not url.startswith("s3://"):
        raise InvalidInput(f"an S3 store URL starts with s3://, got {url!r}", field="store_url")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not _BUCKET_RE.fullmatch(bucket):
        raise InvalidInput(f"invalid S3 bucket name {bucket!r} in {url!r}", field="store_url")
    prefix = prefix.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise InvalidInput(f"invalid S3 key prefix {prefix!r} in {url!r}", field="store_url")
    return bucket, (prefix + "/" if prefix else "")


class _LostRace(Exception):
    """A conditional write found the key changed (412): the caller retries."""


@dataclass(frozen=True, slots=True)
class _View:
    """What this process knows of one model: metadata and pointer with their ETags (None: absent)."""

    model_etag: str | None = None
    model: bytes | None = None
    pointer_etag: str | None = None
    version: int | None = None
    corrupt: str | None = None  # why the pointer does not parse (reported by the reads that need it)
    active: dict[str, Any] | None = None  # the document the pointer names, once read
    checked_at: float = -1e18
    used_at: float = 0.0


def _pointer_body(version: int | None) -> bytes:
    return orjson.dumps({"version": version, "nonce": uuid.uuid4().hex}, option=orjson.OPT_APPEND_NEWLINE)


class S3CalibratorStore:
    """Versioned calibrator documents and model metadata in an S3 bucket (see the module docstring).

    Parameters
    ----------
    url : str
        ``s3://bucket/prefix``. Endpoint, region and credentials come from the standard AWS environment
        and configuration files (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ...).
    refresh_s : float, default=1.0
        Longest time a model's metadata and active pointer are served from this process's cache. 0 reads
        the bucket (conditionally) on every call.
    cache_dir : path-like or None
        Local directory for downloaded TorchScript files (``root``); a new temporary directory if None.
    client : botocore S3 client or None
        A client to use; by default one is made on first use from the AWS environment.

    Notes
    -----
    Nothing touches the network in ``__init__``. Instances are safe to share between threads; any number of
    processes on any number of hosts may use the same bucket and prefix at once.
    """

    def __init__(
        self,
        url: str,
        *,
        refresh_s: float = 1.0,
        cache_dir: str | os.PathLike[str] | None = None,
        client: Any = None,
    ) -> None:
        self.url = url
        self.bucket, self.prefix = parse_s3_url(url)
        if refresh_s < 0:
            raise InvalidInput(f"refresh_s must be >= 0, got {refresh_s}", field="store_refresh_s")
        self.refresh_s = float(refresh_s)
        self.root = (
            Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="calibserve-s3-"))
        )
        self._client = client
        self._lock = threading.Lock()
        self._views: dict[str, _View] = {}
        self._torchscript: dict[str, tuple[str, float]] = {}  # name -> (ETag of the local copy, checked at)
        self._fault: tuple[str, float] | None = None  # (reason, since) while the bucket cannot be read
        self._last_ok = time.monotonic()
        self._refresher: threading.Thread | None = None
        self._stop = threading.Event()

    def __repr__(self) -> str:
        return f"S3CalibratorStore({self.url!r})"

    # -- the client and its errors ------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    config = botocore_config.Config(
                        retries={"total_max_attempts": RETRY_ATTEMPTS, "mode": "standard"},
                        connect_timeout=CONNECT_TIMEOUT_S,
                        read_timeout=READ_TIMEOUT_S,
                        max_pool_connections=32,
                    )
                    self._client = boto3.session.Session().client("s3", config=config)
        return self._client

    def _key(self, name: str, suffix: str = "") -> str:
        return f"{self.prefix}{name}/{suffix}"

    def _fault_of(self, exc: Exception, action: str) -> StoreUnavailable:
        """One line that says what failed: unreachable, missing bucket, credentials refused, or the code."""
        if isinstance(exc, botocore_exceptions.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                reason = f"bucket {self.bucket!r} does not exist"
            elif code in _CREDENTIAL_CODES:
                reason = f"credentials refused by the object store ({code})"
            elif code in ("SlowDown", "Throttling", "ThrottlingException", "503"):
                reason = f"the object store is throttling requests ({code}; tried {RETRY_ATTEMPTS} times)"
            else:
                reason = f"the object store answered {status} {code}: {error.get('Message', '')}".rstrip(": ")
        elif isinstance(exc, botocore_exceptions.NoCredentialsError):
            reason = "no AWS credentials found (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...)"
        elif isinstance(exc, botocore_exceptions.BotoCoreError):
            reason = f"the object store is unreachable ({exc})"
        else:
            reason = f"{type(exc).__name__}: {exc}"
        logger.error("calibrator store (%s) %s failed: %s", self.url, action, reason)
        return StoreUnavailable(f"calibrator store {self.url} is not {action}: {reason}")

    @contextlib.contextmanager
    def _calls(self, action: str) -> Iterator[None]:
        """Map botocore's exceptions to StoreUnavailable ("not readable" / "not writable")."""
        try:
            yield
        except (botocore_exceptions.ClientError, botocore_exceptions.BotoCoreError) as exc:
            raise self._fault_of(exc, action) from exc

    @staticmethod
    def _code(exc: Exception) -> str:
        if isinstance(exc, botocore_exceptions.ClientError):
            return str(exc.response.get("Error", {}).get("Code", ""))
        return ""

    def _get(self, key: str, *, etag: str | None = None) -> tuple[bytes, str] | bool | None:
        """The object's bytes and ETag; None if absent; True when ``etag`` still matches (304)."""
        arguments: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if etag is not None:
            arguments["IfNoneMatch"] = etag
        try:
            with self._calls("readable"):
                try:
                    answer = self.client.get_object(**arguments)
                    return answer["Body"].read(), answer["ETag"]
                except botocore_exceptions.ClientError as exc:
                    code = self._code(exc)
                    if code in _MISSING_CODES:
                        return None
                    if code in ("304", "NotModified"):
                        return True
                    raise
        except StoreUnavailable:
            raise
        except Exception as exc:  # a connection dropped in the middle of the body
            raise self._fault_of(exc, "readable") from exc

    def _put(self, key: str, body: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        """PutObject; the new ETag. _LostRace when a condition failed."""
        arguments: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Body": body}
        if if_none_match:
            arguments["IfNoneMatch"] = "*"
        if if_match is not None:
            arguments["IfMatch"] = if_match
        with self._calls("writable"):
            try:
                return str(self.client.put_object(**arguments)["ETag"])
            except botocore_exceptions.ClientError as exc:
                if self._code(exc) in _LOST_RACE_CODES:
                    raise _LostRace(key) from None
                if if_match is not None and self._code(exc) in _MISSING_CODES:
                    raise _LostRace(key) from None  # the pointer was deleted meanwhile
                raise

    def _delete(self, key: str) -> None:
        with self._calls("writable"):
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def _keys(self, prefix: str) -> Iterator[str]:
        """Every key under ``prefix``, in S3's (lexicographic) order."""
        with self._calls("readable"):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                for item in page.get("Contents", ()):
                    yield item["Key"]

    def _parse(self, data: bytes, key: str) -> dict[str, Any]:
        try:
            document = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            logger.error("corrupt object in calibrator store: %s: %s", key, exc)
            raise StoreUnavailable(f"stored object {key} is corrupt: not valid JSON ({exc})") from exc
        if not isinstance(document, dict):
            raise StoreUnavailable(f"stored object {key} is corrupt: not a JSON object")
        return document

    def _parse_pointer(self, data: bytes, key: str) -> int | None:
        version = self._parse(data, key).get("version")
        if version is None:
            return None
        try:
            return _check_version(version)
        except InvalidInput as exc:
            raise StoreUnavailable(f"stored object {key} is corrupt: not a version number") from exc

    def _not_found(self, name: str) -> NotFound:
        return NotFound(f"model {name!r} does not exist")

    # -- the cached view of a model ------------------------------------------------------------------------

    def _refresh(self, name: str) -> _View:
        """Read the model's metadata and pointer (conditionally on the cached ETags) and cache them."""
        old = self._views.get(name) or _View()
        try:
            model = self._get(self._key(name, _MODEL_FILE), etag=old.model_etag)
            pointer = self._get(self._key(name, _POINTER_FILE), etag=old.pointer_etag)
        except StoreUnavailable as exc:
            with self._lock:
                if self._fault is None:
                    self._fault = (str(exc), time.monotonic())
                if name in self._views:  # try again after refresh_s, not on every request meanwhile
                    self._views[name] = replace(self._views[name], checked_at=time.monotonic())
            raise
        view = replace(old, checked_at=time.monotonic())
        if model is None:
            view = replace(view, model_etag=None, model=None)
        elif model is not True:
            view = replace(view, model=model[0], model_etag=model[1])
        if pointer is None:
            view = replace(view, pointer_etag=None, version=None, corrupt=None, active=None)
        elif pointer is not True:
            try:
                version, corrupt = self._parse_pointer(pointer[0], self._key(name, _POINTER_FILE)), None
            except StoreUnavailable as exc:
                version, corrupt = None, str(exc)
            view = replace(view, pointer_etag=pointer[1], version=version, corrupt=corrupt, active=None)
        if view.model is None:
            view = replace(view, pointer_etag=None, version=None, corrupt=None, active=None)
        if view.version is not None and view.active is None:
            # Read here (in the refresher's thread) so that a request finds the new active document cached.
            found = self._get(self._key(name, f"{_CALIBRATORS}{view.version}.json"))
            with contextlib.suppress(StoreUnavailable):  # a corrupt one is reported by active_calibrator()
                if isinstance(found, tuple):
                    view = replace(view, active=self._parse(found[0], self._key(name, _CALIBRATORS)))
        with self._lock:
            self._fault = None
            self._last_ok = time.monotonic()
            if len(self._views) > 65536:
                self._views.clear()
            self._views[name] = view
        return view

    def _view(self, name: str, *, fresh: bool = False) -> _View:
        """The cached view, read again if older than refresh_s (or if ``fresh``, as writes ask).

        While the bucket cannot be read, reads that need not be fresh get the last known view (what the
        cached calibrators serve), and only a model never read raises StoreUnavailable.
        """
        view = self._views.get(name)
        if fresh or view is None or time.monotonic() - view.checked_at > self.refresh_s:
            try:
                view = self._refresh(name)
            except StoreUnavailable:
                if fresh or view is None:
                    raise
        return view

    def _remember(self, name: str, **changes: Any) -> None:
        """Update the cache after a write of this process, so it reads its own writes at once."""
        with self._lock:
            view = self._views.get(name) or _View()
            self._views[name] = replace(view, **changes)

    def _ensure_refresher(self) -> None:
        if self.refresh_s <= 0 or self._refresher is not None:
            return
        with self._lock:
            if self._refresher is None:
                self._refresher = threading.Thread(
                    target=self._refresh_loop, name="calibserve-s3-refresh", daemon=True
                )
                self._refresher.start()

    def _refresh_loop(self) -> None:
        """Keep the views of the models in use fresh, so requests never wait for the bucket."""
        while not self._stop.wait(self.refresh_s / 2):
            now = time.monotonic()
            watched = sorted(
                (
                    (view.used_at, name)
                    for name, view in list(self._views.items())
                    if now - view.used_at <= WATCH_S
                ),
                reverse=True,
            )[:MAX_WATCHED]
            for _, name in watched:
                view = self._views.get(name)
                if view is None or now - view.checked_at < self.refresh_s / 4:
                    continue  # refreshed meanwhile (by a write or a request)
                try:
                    self._refresh(name)
                except StoreUnavailable:
                    break  # the fault is recorded; try again next round
                except Exception:  # never let one model stop the refresher
                    logger.exception("refreshing model %s from the calibrator store failed", name)

    def close(self) -> None:
        """Stop the background refresher (the cache stays usable)."""
        self._stop.set()

    #: Reads are requests to the bucket: callers on an event loop run them in a thread.
    remote = True

    def serves_from_memory(self, name: str) -> bool:
        """Whether :meth:`change_stamp` answers from memory (a fresh cached view, or any cached view while
        the bucket cannot be read) rather than with requests to the bucket."""
        view = self._views.get(name)
        if view is None:
            return False
        return self._fault is not None or time.monotonic() - view.checked_at <= self.refresh_s

    @property
    def view_age_s(self) -> float:
        """Seconds since this process last read the bucket successfully (0 while it reads it fine)."""
        if self._fault is None:
            return 0.0
        return time.monotonic() - self._last_ok

    @property
    def fault(self) -> str | None:
        """Why the bucket cannot be read right now, or None."""
        return None if self._fault is None else self._fault[0]

    # -- change detection ----------------------------------------------------------------------------------

    def change_stamp(self, name: str) -> tuple[Any, Any]:
        """``(ETag of model.json, ETag of the pointer)``, ``(None, None)`` for no model; at most refresh_s old.

        Served from memory for models in use (the background thread refreshes them); while the bucket cannot
        be read, the last known stamp is returned (so the cached calibrator keeps serving) and no request
        waits for the bucket. StoreUnavailable only for a model this process has never read.
        """
        validate_model_name(name)
        now = time.monotonic()
        view = self._views.get(name)
        if view is None or (now - view.checked_at > self.refresh_s and self._fault is None):
            try:
                view = self._refresh(name)
            except StoreUnavailable:
                if view is None:
                    raise
        if now - view.used_at > 1.0:
            self._remember(name, used_at=now)
        self._ensure_refresher()
        return (view.model_etag, view.pointer_etag)

    def active_stamp(self, name: str) -> tuple[Any, ...]:
        """The pointer's ETag (changes with every activation), ``()`` while none is active; NotFound."""
        view = self._view(validate_model_name(name))
        if view.model is None:
            raise self._not_found(name)
        return () if view.pointer_etag is None else (view.pointer_etag,)

    # -- models --------------------------------------------------------------------------------------------

    def put_model(self, name: str, metadata: dict[str, Any]) -> dict[str, Any]:
        """Create a model or replace its metadata; return the stored metadata (with ``"name"``)."""
        validate_model_name(name)
        if not isinstance(metadata, dict):
            raise InvalidInput("model metadata must be a JSON object", field="metadata")
        data = _encode({**metadata, "name": name}, what="model metadata")
        etag = self._put(self._key(name, _MODEL_FILE), data)
        self._remember(name, model=data, model_etag=etag, checked_at=-1e18)
        return orjson.loads(data)  # type: ignore[no-any-return]

    def get_model(self, name: str) -> dict[str, Any]:
        """The model's metadata; NotFound if there is no such model."""
        view = self._view(validate_model_name(name))
        if view.model is None:
            raise self._not_found(name)
        metadata = self._parse(view.model, self._key(name, _MODEL_FILE))
        metadata["name"] = name
        return metadata

    def model_exists(self, name: str) -> bool:
        """Whether the model exists (has its metadata object), as of at most refresh_s ago."""
        return self._view(validate_model_name(name)).model is not None

    def _require_model(self, name: str) -> None:
        if self._view(name, fresh=True).model is None:
            raise self._not_found(name)

    def _model_names(self) -> list[str]:
        names: list[str] = []
        with self._calls("readable"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix, Delimiter="/"
            )
            for page in pages:
                for common in page.get("CommonPrefixes", ()):
                    candidate = common["Prefix"][len(self.prefix) :].rstrip("/")
                    with contextlib.suppress(InvalidInput):
                        names.append(validate_model_name(candidate))
        return sorted(names)

    def list_models(
        self, *, limit: int = 100, cursor: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of model metadata sorted by name, and the next page's cursor (as the directory store)."""
        limit = _check_limit(limit)
        if cursor is not None:
            try:
                validate_model_name(cursor)
            except InvalidInput:
                raise InvalidInput(f"invalid cursor {cursor!r}", field="cursor") from None
        return model_page(self, self._model_names(), limit=limit, cursor=cursor)

    def delete_model(self, name: str) -> None:
        """Delete a model: its metadata first (gone for every reader at once), then every other object."""
        validate_model_name(name)
        self._require_model(name)
        self._delete(self._key(name, _MODEL_FILE))
        keys = list(self._keys(self._key(name)))
        with self._calls("writable"):
            for start in range(0, len(keys), 1000):
                batch = [{"Key": key} for key in keys[start : start + 1000]]
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        with self._lock:
            self._views.pop(name, None)
            self._torchscript.pop(name, None)
        with contextlib.suppress(OSError):
            (self.root / name / _TORCHSCRIPT_FILE).unlink()

    # -- TorchScript ---------------------------------------------------------------------------------------

    def put_torchscript(self, name: str, data: bytes) -> Path:
        """Store the TorchScript file of an existing model; return the path of its local copy."""
        validate_model_name(name)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidInput("TorchScript data must be bytes", field="data")
        self._require_model(name)
        etag = self._put(self._key(name, _TORCHSCRIPT_FILE), bytes(data))
        return self._cache_torchscript(name, bytes(data), etag)

    def _cache_torchscript(self, name: str, data: bytes, etag: str) -> Path:
        path = self.root / name / _TORCHSCRIPT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{_TORCHSCRIPT_FILE}.{uuid.uuid4().hex}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        with self._lock:
            self._torchscript[name] = (etag, time.monotonic())
        return path

    def torchscript_path(self, name: str) -> Path | None:
        """Local copy of the model's uploaded TorchScript (downloaded when it changed), None if none was
        uploaded; NotFound for no model. Checked against the bucket at most every refresh_s."""
        validate_model_name(name)
        path = self.root / name / _TORCHSCRIPT_FILE
        known = self._torchscript.get(name)
        if known is not None and time.monotonic() - known[1] <= self.refresh_s and path.is_file():
            return path
        found = self._get(
            self._key(name, _TORCHSCRIPT_FILE), etag=known[0] if known and path.is_file() else None
        )
        if found is None:
            if not self.model_exists(name):
                raise self._not_found(name)
            with self._lock:
                self._torchscript.pop(name, None)
            return None
        if found is True:
            with self._lock:
                self._torchscript[name] = (known[0], time.monotonic())  # type: ignore[index]
            return path
        return self._cache_torchscript(name, found[0], found[1])

    # -- calibrators ---------------------------------------------------------------------------------------

    def add_calibrator(self, name: str, document: dict[str, Any], *, activate: bool = True) -> dict[str, Any]:
        """Store ``document`` as the model's next version (and activate it); return the stored document.

        The number is claimed with a conditional create, so replicas never get the same one; a lost claim
        tries the next number. On failure nothing is stored, the active version is unchanged and the claimed
        number stays unused.
        """
        validate_model_name(name)
        if not isinstance(document, dict):
            raise InvalidInput("calibrator document must be a JSON object", field="document")
        _encode({**document, "model": name, "version": 0}, what="calibrator document")  # fail before claiming
        self._require_model(name)
        taken = [
            int(m[1]) for key in self._keys(self._key(name, _CALIBRATORS)) if (m := self._match(name, key))
        ]
        candidate = 1 + max(taken, default=0)
        while True:
            try:
                self._put(self._key(name, f"{_RESERVED}{candidate}"), b"", if_none_match=True)
            except _LostRace:
                candidate += 1
                continue
            data = _encode({**document, "model": name, "version": candidate}, what="calibrator document")
            try:
                self._put(self._key(name, f"{_CALIBRATORS}{candidate}.json"), data, if_none_match=True)
            except _LostRace:
                candidate += 1  # a document without a marker (copied in by hand): skip past it
                continue
            break
        if activate:
            try:
                self._swap_pointer(name, candidate, check=None)
            except (StoreUnavailable, Conflict):
                self._withdraw(name, candidate)
                raise
            # cached with the pointer, so this process serves it even if the bucket goes away right now
            self._remember(name, active=orjson.loads(data))
        logger.info("stored calibrator version %d of model %r (activate=%s)", candidate, name, activate)
        return orjson.loads(data)  # type: ignore[no-any-return]

    def import_calibrator(self, name: str, document: dict[str, Any]) -> bool:
        """Store a document under its own ``version`` (a copy from another store), inactive.

        Returns True when written, False when that very document was there already (copies are idempotent);
        Conflict when another document holds the number. The number is reserved like any other.
        """
        validate_model_name(name)
        if not isinstance(document, dict):
            raise InvalidInput("calibrator document must be a JSON object", field="document")
        version = _check_version(document.get("version"))
        data = _encode({**document, "model": name}, what="calibrator document")
        self._require_model(name)
        with contextlib.suppress(_LostRace):
            self._put(self._key(name, f"{_RESERVED}{version}"), b"", if_none_match=True)
        try:
            self._put(self._key(name, f"{_CALIBRATORS}{version}.json"), data, if_none_match=True)
        except _LostRace:
            if self.get_calibrator(name, version) != orjson.loads(data):
                raise Conflict(f"model {name!r} holds a different calibrator version {version}") from None
            return False
        return True

    def _match(self, name: str, key: str) -> re.Match[str] | None:
        return _VERSION_KEY_RE.fullmatch(key[len(self._key(name)) :])

    def _withdraw(self, name: str, version: int) -> None:
        """Remove a new version whose activation failed, unless the pointer names it after all."""
        try:
            if self._view(name, fresh=True).version != version:
                self._delete(self._key(name, f"{_CALIBRATORS}{version}.json"))
        except StoreUnavailable:
            logger.warning(
                "version %d of model %r stays stored, inactive, after a failed activation", version, name
            )

    def _swap_pointer(self, name: str, version: int | None, *, check: Any) -> None:
        """Point at ``version`` by compare-and-swap, re-reading after each lost swap.

        ``check(view)`` runs after each read of the pointer and before the swap (it may raise). Conflict
        after CAS_ATTEMPTS lost rounds.
        """
        for attempt in range(CAS_ATTEMPTS):
            view = self._view(name, fresh=True)
            if view.model is None:
                raise self._not_found(name)
            target = check(view) if check is not None else version
            body = _pointer_body(target)
            try:
                if view.pointer_etag is None:
                    etag = self._put(self._key(name, _POINTER_FILE), body, if_none_match=True)
                else:
                    etag = self._put(self._key(name, _POINTER_FILE), body, if_match=view.pointer_etag)
            except _LostRace:
                time.sleep(random.uniform(0, 0.005 * 2 ** min(attempt, 6)))  # jitter: let the winner finish
                continue
            self._remember(
                name, pointer_etag=etag, version=target, corrupt=None, active=None, checked_at=-1e18
            )
            return
        raise Conflict(
            f"the active pointer of model {name!r} changed {CAS_ATTEMPTS} times while this write tried to "
            "move it; retry"
        )

    def get_calibrator(self, name: str, version: int) -> dict[str, Any]:
        """One stored calibrator document, read from the bucket (exact); NotFound if absent."""
        validate_model_name(name)
        version = _check_version(version)
        key = self._key(name, f"{_CALIBRATORS}{version}.json")
        found = self._get(key)
        if not isinstance(found, tuple):
            if not self.model_exists(name):
                raise self._not_found(name)
            raise NotFound(f"model {name!r} has no calibrator version {version}")
        return self._parse(found[0], key)

    def _versions(self, name: str) -> list[int]:
        versions = sorted(
            (
                int(m[1])
                for key in self._keys(self._key(name, _CALIBRATORS))
                if (m := _DOCUMENT_KEY_RE.fullmatch(key[len(self._key(name)) :]))
            ),
            reverse=True,
        )
        if not self.model_exists(name):
            raise self._not_found(name)
        return versions

    def list_calibrators(
        self, name: str, *, limit: int = 50, cursor: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of the model's calibrator documents, newest first, and the next page's cursor."""
        validate_model_name(name)
        return calibrator_page(self, name, limit=limit, cursor=cursor)

    def delete_calibrator(self, name: str, version: int) -> None:
        """Delete one version; Conflict if it is the active one. Its number stays reserved forever."""
        validate_model_name(name)
        version = _check_version(version)
        self._require_model(name)
        key = self._key(name, f"{_CALIBRATORS}{version}.json")
        if self._get(key) is None:
            raise NotFound(f"model {name!r} has no calibrator version {version}")
        marker = self._key(name, f"{_DELETED}{version}")
        self._put(marker, b"")

        def unless_active(view: _View) -> int | None:
            if view.corrupt is not None:
                raise StoreUnavailable(view.corrupt)
            if view.version == version:
                raise Conflict(
                    f"calibrator version {version} is the active one of model {name!r}: "
                    "activate another version first"
                )
            return view.version

        try:
            # Rewriting the pointer (same version, new nonce) makes every activation that read it before the
            # marker existed lose its swap.
            self._swap_pointer(name, None, check=unless_active)
        except Conflict:
            self._delete(marker)
            raise
        self._delete(key)
        logger.info("deleted calibrator version %d of model %r", version, name)

    def activate(self, name: str, version: int) -> dict[str, Any]:
        """Make ``version`` the active one (compare-and-swap of the pointer); return its document."""
        validate_model_name(name)
        version = _check_version(version)
        found: dict[str, Any] = {}

        def exists_and_not_deleted(view: _View) -> int:
            # After reading the pointer: a delete that started later makes this swap fail.
            found["document"] = self.get_calibrator(name, version)
            if self._get(self._key(name, f"{_DELETED}{version}")) is not None:
                raise NotFound(f"model {name!r} has no calibrator version {version}")
            return version

        self._swap_pointer(name, version, check=exists_and_not_deleted)
        self._remember(name, active=found["document"])
        logger.info("activated calibrator version %d of model %r", version, name)
        return found["document"]

    def active_version(self, name: str) -> int | None:
        """The active version number (at most refresh_s old), None if none; NotFound for no model."""
        view = self._view(validate_model_name(name))
        if view.model is None:
            raise self._not_found(name)
        if view.corrupt is not None:
            raise StoreUnavailable(view.corrupt)
        return view.version

    def active_calibrator(self, name: str) -> dict[str, Any] | None:
        """The active calibrator document (at most refresh_s old), None if none; NotFound for no model."""
        view = self._view(validate_model_name(name))
        if view.model is None:
            raise self._not_found(name)
        if view.corrupt is not None:
            raise StoreUnavailable(view.corrupt)
        if view.version is None:
            return None
        if view.active is not None and view.active.get("version") == view.version:
            return view.active
        for _ in range(8):
            try:
                document = self.get_calibrator(name, view.version)  # type: ignore[arg-type]
            except NotFound:
                # Another replica may have activated a different version and deleted this one.
                view = self._view(name, fresh=True)
                if view.version is None:
                    return None
                continue
            with self._lock:
                if self._views.get(name) is view:
                    self._views[name] = replace(view, active=document)
            return document
        raise StoreUnavailable(
            f"the active pointer of model {name!r} names calibrator version {view.version}, which does not exist"
        )

    # -- operations ----------------------------------------------------------------------------------------

    def check_writable(self) -> None:
        """Raise StoreUnavailable unless an object can be written to and removed from the prefix."""
        key = f"{self.prefix}.write-probe/{uuid.uuid4().hex}"
        self._put(key, b"ok\n")
        self._delete(key)

    def cleanup_temp_files(self, *, min_age_s: float = 60.0) -> int:
        """Nothing to clean in the bucket (every write is one atomic PutObject); removes stale temp files of
        the local TorchScript cache. Returns how many were removed."""
        cutoff = time.time() - min_age_s
        removed = 0
        for path in self.root.glob(f"*/.{_TORCHSCRIPT_FILE}.*.tmp"):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        return removed
