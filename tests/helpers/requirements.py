"""What a test does when something it needs is missing here: skip locally, fail where everything must run (CI).

``CALIBSERVE_REQUIRE_ALL=1`` (``.ci/run`` exports it) turns each :func:`require_or_skip` into a failure, so that
a test that quietly stopped running (a tool missing from the CI image, a server that no longer starts) is noticed.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

REQUIRE_ALL = "CALIBSERVE_REQUIRE_ALL"


def everything_required() -> bool:
    return os.environ.get(REQUIRE_ALL) == "1"


def require_or_skip(reason: str) -> NoReturn:
    """Skip the calling test (or fixture) because of ``reason``; fail it instead under ``CALIBSERVE_REQUIRE_ALL=1``."""
    if everything_required():
        pytest.fail(f"{reason} ({REQUIRE_ALL}=1: required, not skipped)", pytrace=False)
    pytest.skip(reason)
