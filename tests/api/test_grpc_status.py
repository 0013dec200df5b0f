"""The gRPC codec's one map from domain errors to status codes: every domain error has its documented code,
and the README's table lists every code the map gives."""

from __future__ import annotations

import inspect
import re

import grpc
import pytest

from service import errors
from service.api.grpc.status import code_of
from tests.helpers.data import REPO

DOMAIN_ERRORS = sorted(
    (
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.CalibserveError) and cls is not errors.CalibserveError
    ),
    key=lambda cls: cls.__name__,
)
EXPECTED = {
    "InvalidInput": "INVALID_ARGUMENT",
    "InvalidParameter": "INVALID_ARGUMENT",
    "NotFitted": "INVALID_ARGUMENT",
    "NotFound": "NOT_FOUND",
    "Unauthenticated": "UNAUTHENTICATED",
    "PermissionDenied": "PERMISSION_DENIED",
    "PayloadTooLarge": "RESOURCE_EXHAUSTED",
    "Conflict": "FAILED_PRECONDITION",
    "ModelTimeout": "DEADLINE_EXCEEDED",
    "UpstreamTimeout": "DEADLINE_EXCEEDED",
    "WorkTimeout": "DEADLINE_EXCEEDED",
    "RequestTimeout": "DEADLINE_EXCEEDED",
    "ModelFailed": "INTERNAL",
    "UpstreamFailed": "INTERNAL",
    "MissingDependency": "UNIMPLEMENTED",
    "NotReady": "UNAVAILABLE",
    "Overloaded": "UNAVAILABLE",
    "StoreUnavailable": "UNAVAILABLE",
    "UpstreamUnavailable": "UNAVAILABLE",
    "WorkCancelled": "UNAVAILABLE",
}


def instance(cls: type[errors.CalibserveError]) -> errors.CalibserveError:
    if cls is errors.UpstreamRejected:
        return cls("refused", upstream_status=400)
    return cls("message")


@pytest.mark.parametrize(
    "cls", [cls for cls in DOMAIN_ERRORS if cls.__name__ in EXPECTED], ids=lambda c: c.__name__
)
def test_each_domain_error_has_its_code(cls):
    assert code_of(instance(cls)).name == EXPECTED[cls.__name__]


# Errors of HTTP's framing (headers, media types): no gRPC call raises them.
HTTP_ONLY = {"HeadersTooLarge", "UnsupportedMediaType", "NotAcceptable"}


def test_every_domain_error_is_mapped():
    names = {cls.__name__ for cls in DOMAIN_ERRORS}
    assert names - set(EXPECTED) <= HTTP_ONLY | {"UpstreamRejected"}, names - set(EXPECTED)


def test_an_upstreams_refusal_keeps_not_found():
    assert code_of(errors.UpstreamRejected("no model", upstream_status=404)) == grpc.StatusCode.NOT_FOUND
    assert code_of(errors.UpstreamRejected("bad", upstream_status=400)) == grpc.StatusCode.INVALID_ARGUMENT


def test_the_readme_documents_every_code():
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Open Inference Protocol over gRPC") :]
    documented = set(re.findall(r"^\| `([A-Z_]+)`", section, flags=re.MULTILINE))
    documented |= set(re.findall(r"^\| `[A-Z_]+` / `([A-Z_]+)`", section, flags=re.MULTILINE))
    given = {code_of(instance(cls)).name for cls in DOMAIN_ERRORS if cls.__name__ not in HTTP_ONLY}
    assert given <= documented, given - documented
