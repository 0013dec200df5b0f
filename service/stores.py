"""Opening the calibrator store a URL names: a directory (the embedded default) or an S3 bucket."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeAlias
from urllib.parse import unquote, urlsplit

from service.errors import InvalidInput
from service.store import CalibratorStore
from service.store_s3 import S3CalibratorStore, parse_s3_url

__all__ = ["Store", "open_store", "store_url"]

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
