"""Opening the calibrator store a URL names (a directory, the embedded default, or an S3 bucket), and copying
one store into another (``calibserve store copy``: a directory to a bucket, or back)."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import unquote, urlsplit

import orjson

from service.errors import InvalidInput, StoreUnavailable
from service.store import CalibratorStore
from service.store_s3 import S3CalibratorStore, parse_s3_url

__all__ = ["CopyReport", "Store", "copy_store", "open_store", "store_url"]

logger = logging.getLogger(__name__)

# Both classes have the same public interface (tests/test_store.py runs one suite on both).
Store: TypeAlias = CalibratorStore | S3CalibratorStore


def store_url(location: str | os.PathLike[str]) -> str:
    """The URL of a store location: ``s3://...`` and ``file://...`` as given, a plain path as ``file://``."""
    text = os.fspath(location)
    if text.startswith(("s3://", "file://")):
        return text
    if "://" in text:
        raise InvalidInput(
            f"unsupported store URL {text.split('://', 1)[0]}://...: use s3://bucket/prefix, file:///path "
            "or a directory",
            field="store_url",
        )
    return Path(text).absolute().as_uri()


def open_store(
    location: str | os.PathLike[str],
    *,
    refresh_s: float = 1.0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Store:
    """The store at ``location``: ``s3://bucket/prefix``, ``file:///path`` or a directory path.

    Parameters
    ----------
    location : str or path-like
        Where the store is.
    refresh_s : float, default=1.0
        S3 only: longest time a model's metadata and active pointer are served from memory.
    cache_dir : path-like or None
        S3 only: local directory for downloaded TorchScript files.
    """
    url = store_url(location)
    if url.startswith("s3://"):
        parse_s3_url(url)
        return S3CalibratorStore(url, refresh_s=refresh_s, cache_dir=cache_dir)
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise InvalidInput(
            f"file:// store URLs name a local path, got host {parts.netloc!r}", field="store_url"
        )
    return CalibratorStore(Path(unquote(parts.path)))


@dataclass
class CopyReport:
    """What :func:`copy_store` did: models seen, versions written and already there, pointers moved."""

    models: int = 0
    versions_copied: int = 0
    versions_present: int = 0
    pointers_moved: int = 0
    torchscript_copied: int = 0


def document_sha256(document: dict[str, Any]) -> str:
    """sha256 of a document's canonical JSON (sorted keys): equal for equal documents in any store."""
    return hashlib.sha256(orjson.dumps(document, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _pages(fetch: Any, *args: Any) -> Iterator[dict[str, Any]]:
    cursor = None
    while True:
        items, cursor = fetch(*args, limit=1000, cursor=cursor)
        yield from items
        if cursor is None:
            return


def copy_store(source: Store, target: Store) -> CopyReport:
    """Copy every model (metadata, uploaded TorchScript, every calibrator version under its own number, the
    active pointer) from ``source`` into ``target``.

    Idempotent: what is already there, identical, is left alone, so an interrupted copy is simply run again.
    Each document is read back from the target and its sha256 compared with the source's; a mismatch, or a
    different document under the same number in the target, raises (StoreUnavailable / Conflict) and stops
    the copy.
    """
    report = CopyReport()
    for metadata in list(_pages(source.list_models)):
        name = metadata.pop("name")
        report.models += 1
        if not target.model_exists(name) or target.get_model(name) != {**metadata, "name": name}:
            target.put_model(name, metadata)
        path = source.torchscript_path(name)
        if path is not None:
            data = path.read_bytes()
            present = target.torchscript_path(name)
            if present is None or present.read_bytes() != data:
                target.put_torchscript(name, data)
                report.torchscript_copied += 1
        for document in sorted(_pages(source.list_calibrators, name), key=lambda d: d["version"]):
            if target.import_calibrator(name, document):
                report.versions_copied += 1
            else:
                report.versions_present += 1
            copied = target.get_calibrator(name, document["version"])
            if document_sha256(copied) != document_sha256(document):
                raise StoreUnavailable(
                    f"model {name!r} version {document['version']}: the copy's sha256 differs from the source's"
                )
        active = source.active_version(name)
        if active is not None and target.active_version(name) != active:
            target.activate(name, active)
            report.pointers_moved += 1
        logger.info("copied model %s", name)
    return report
