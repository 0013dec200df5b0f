"""Domain errors as gRPC status codes: the one mapping of the gRPC codec (as ``api/errors.py`` is HTTP's).

| domain error | gRPC status |
|---|---|
| ``InvalidInput`` (bad tensor, name, datatype, shape or byte count; ``UpstreamRejected``) | ``INVALID_ARGUMENT`` |
| ``NotFound`` (unknown model or calibrator version) | ``NOT_FOUND`` |
| ``Unauthenticated`` (no key, unknown key) | ``UNAUTHENTICATED`` |
| ``PermissionDenied`` (the key's role is too low) | ``PERMISSION_DENIED`` |
| ``PayloadTooLarge`` (grpc itself, past ``CALIBSERVE_MAX_BODY_BYTES``; also past ``CALIBSERVE_MAX_CONCURRENCY`` RPCs) | ``RESOURCE_EXHAUSTED`` |
| ``Conflict`` | ``FAILED_PRECONDITION`` |
| ``ModelTimeout``, ``UpstreamTimeout``, ``WorkTimeout``, ``RequestTimeout`` | ``DEADLINE_EXCEEDED`` |
| ``ModelFailed``, ``UpstreamFailed`` (a failing model or upstream answer) | ``INTERNAL`` |
| ``NotReady``, ``Overloaded``, ``StoreUnavailable``, ``UpstreamUnavailable``, ``WorkCancelled`` | ``UNAVAILABLE`` |
| ``MissingDependency`` | ``UNIMPLEMENTED`` |
| anything else (a bug) | ``INTERNAL``, logged |

The request metrics count each RPC under the HTTP status of the same error (``api/errors.py``), so the
alert on 5xx answers covers both protocols.
"""

from __future__ import annotations

import grpc

from service import errors

# Most specific first: the first class an error is an instance of decides its code.
CODE_OF: tuple[tuple[type[errors.CalibserveError], grpc.StatusCode], ...] = (
    (errors.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.UpstreamRejected, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.PayloadTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Conflict, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ModelTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),  # UpstreamTimeout too
    (errors.WorkTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.RequestTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.ModelFailed, grpc.StatusCode.INTERNAL),  # UpstreamFailed too
    (errors.MissingDependency, grpc.StatusCode.UNIMPLEMENTED),
    (errors.NotReady, grpc.StatusCode.UNAVAILABLE),
    (errors.Overloaded, grpc.StatusCode.UNAVAILABLE),
    (errors.StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.UpstreamUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.WorkCancelled, grpc.StatusCode.UNAVAILABLE),
)
# An upstream's own 404 (unknown model or version there) stays NOT_FOUND for the client.
_UPSTREAM_STATUS = {404: grpc.StatusCode.NOT_FOUND}


def code_of(exc: errors.CalibserveError) -> grpc.StatusCode:
    if isinstance(exc, errors.UpstreamRejected) and exc.upstream_status in _UPSTREAM_STATUS:
        return _UPSTREAM_STATUS[exc.upstream_status]
    for cls, code in CODE_OF:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL
