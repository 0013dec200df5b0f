"""Assertions on error answers: RFC 9457 problem+json (v1) and the Open Inference Protocol's ``{"error"}``."""

from __future__ import annotations

from typing import Any


def _status(response: Any) -> int:
    # an httpx / TestClient response, or tests.helpers.rawhttp.RawResponse
    return response.status_code if hasattr(response, "status_code") else response.status


def assert_problem(response: Any, status: int, *needles: str) -> dict:
    """The response is problem+json with ``status`` (and a type and title) and a detail that mentions every
    needle; returns the body."""
    text = getattr(response, "text", None) or repr(response)
    assert _status(response) == status, text
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body = response.json()
    assert body["status"] == status and body["title"] and body["type"], body
    for needle in needles:
        assert needle in body["detail"], (needle, body["detail"])
    return body


def assert_oip_error(response: Any, status: int, *needles: str) -> dict:
    """An Open Inference Protocol error (under /v2): plain JSON ``{"error": message}``; returns the body."""
    assert _status(response) == status, getattr(response, "text", None) or repr(response)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    for needle in needles:
        assert needle in body["error"], (needle, body["error"])
    return body
