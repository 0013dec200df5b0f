"""The identifiers that reach the disk and the wire: model names and calibrator version numbers.

Both are checked here once, before anything touches the store, by every protocol (v1 path parameters, the
Open Inference Protocol's model and version segments, CLI arguments) and by the store itself.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from service.errors import InvalidInput, InvalidParameter

__all__ = ["MAX_VERSION", "MODEL_NAME_PATTERN", "is_model_name", "parse_version", "validate_model_name"]

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# fullmatch, never match: "$" also matches before a trailing newline.
_MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# Versions are allocated by the store from 1 up; the bound keeps them within a signed 32-bit integer, which
# is what clients in other languages (and the OIP's string version) can round-trip.
MAX_VERSION = 2**31 - 1


def is_model_name(name: str) -> bool:
    return _MODEL_NAME_RE.fullmatch(name) is not None


def validate_model_name(name: object) -> str:
    """Return ``name`` if it is a valid model name, else raise InvalidInput (field ``"name"``).

    A valid name matches ``^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$``: 1 to 64 ASCII characters, starting with a
    letter or digit. That rules out ``..``, hidden names, path separators, NUL and newlines, so a valid name
    is always a single, visible path component directly under the store root.
    """
    if not isinstance(name, str):
        raise InvalidInput(
            f"invalid model name: it must be a string, got {type(name).__name__}", field="name"
        )
    if _MODEL_NAME_RE.fullmatch(name) is None:
        shown = name if len(name) <= 80 else name[:80] + "..."
        raise InvalidInput(
            f"invalid model name {shown!r}: it must match {MODEL_NAME_PATTERN} "
            "(1-64 letters, digits, '.', '_' or '-', starting with a letter or digit)",
            field="name",
        )
    return name


def parse_version(text: str | None, *, field: str = "version") -> int | None:
    """A calibrator version from a path segment or query value (None when absent).

    ASCII digits only, 1 to :data:`MAX_VERSION`; anything else raises InvalidParameter naming ``field``.
    """
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 10:
        raise InvalidParameter(
            f"{field} must be a calibrator version (an integer from 1 to {MAX_VERSION}), got {text[:40]!r}",
            field=field,
        )
    number = int(text)
    if not 1 <= number <= MAX_VERSION:
        raise InvalidParameter(
            f"{field} must be a calibrator version (an integer from 1 to {MAX_VERSION}), got {number}",
            field=field,
        )
    return number


def normalise_url(url: str) -> str:
    """``http(s)://host[:port]`` without a trailing slash, or ``grpc://host:port`` (the protocol over gRPC);
    a bare ``host:port`` (as KServe passes its ``--predictor_host``) is taken as ``http://``. InvalidInput
    for anything else."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidInput(
            "the upstream URL must be a non-empty string such as http://triton:8000", field="url"
        )
    text = url.strip()
    if "://" not in text:
        text = f"http://{text}"
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https", "grpc") or not parts.hostname:
        raise InvalidInput(
            f"upstream URL {url!r} must be http://host[:port], https://host[:port] or grpc://host:port",
            field="url",
        )
    if parts.scheme == "grpc" and parts.path.strip("/"):
        raise InvalidInput(f"upstream URL {url!r}: a gRPC server has no path", field="url")
    if parts.query or parts.fragment:
        raise InvalidInput(f"upstream URL {url!r} must not have a query or fragment", field="url")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        raise InvalidInput(f"upstream URL {url!r} has an invalid port", field="url") from None
    return text.rstrip("/")


_DURATION = re.compile(r"([1-9][0-9]{0,6})([smhd])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: Any, *, field: str = "window") -> int:
    """Seconds of a duration such as ``15m``, ``1h``, ``24h``, ``7d`` (a positive integer and one unit of
    s, m, h, d); InvalidParameter naming ``field`` otherwise."""
    match = _DURATION.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise InvalidParameter(
            f"{field} {text!r} must be a duration such as 15m, 1h, 24h or 7d (a number and s, m, h or d)",
            field=field,
        )
    return int(match.group(1)) * _SECONDS[match.group(2)]
