"""Domain errors of calibserve.

They carry what went wrong in words a user can act on, and nothing about HTTP: ``service/api/`` alone maps
them to status codes and problem+json bodies, and the CLI maps them to exit code 2.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class CalibserveError(Exception):
    """Base of every error this package raises on purpose."""

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        row: int | None = None,
        details: list[dict] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.row = row
        self.details = details  # one {"field", "message"} per problem, where there are several

    def __str__(self) -> str:
        return self.message


class InvalidInput(CalibserveError, ValueError):
    """The caller's data or options are wrong (shape, NaN, label range, unknown method, ...)."""


class InvalidParameter(InvalidInput):
    """A parameter or a field of a request fails validation (a version that is not a number, a repeated
    query parameter, a body field of the wrong type), as opposed to data that cannot be used."""


@contextmanager
def as_parameters() -> Iterator[None]:
    """InvalidInput raised inside becomes InvalidParameter: what it names are a request's parameters (a
    method, its options), not its data."""
    try:
        yield
    except InvalidParameter:
        raise
    except InvalidInput as exc:
        raise InvalidParameter(exc.message, field=exc.field, row=exc.row, details=exc.details) from None


class NotFitted(InvalidInput):
    """A calibrator was used before ``fit`` (or loaded from an incomplete document)."""


class NotFound(CalibserveError, LookupError):
    """A model or calibrator version that does not exist."""


class Conflict(CalibserveError):
    """The request contradicts the current state (deleting the active version, class count mismatch)."""


class StoreUnavailable(CalibserveError):
    """The calibrator store cannot be written or read (read-only volume, disk full, I/O error)."""


class NotReady(CalibserveError):
    """The service has not finished loading its models and store."""


class ModelFailed(CalibserveError):
    """A TorchScript model raised, or returned NaN or the wrong shape: the model's fault, not the caller's."""


class ModelTimeout(ModelFailed):
    """A TorchScript model did not answer within the time limit (``CALIBSERVE_MODEL_TIMEOUT_S``), or is
    stalled: a forward pass of it ran past the limit and has not returned yet."""


class UpstreamFailed(ModelFailed):
    """The upstream inference server answered a server error, or an answer calibserve cannot use (not the
    protocol, logits missing, of the wrong class count, or not finite): never a silently wrong probability."""


class UpstreamTimeout(ModelTimeout):
    """The upstream inference server did not connect or answer within its time limits
    (``CALIBSERVE_UPSTREAM_CONNECT_TIMEOUT_S``, ``CALIBSERVE_UPSTREAM_TIMEOUT_S``)."""


class UpstreamUnavailable(CalibserveError):
    """The upstream inference server refuses connections (down, restarting): retry shortly."""


class UpstreamRejected(CalibserveError):
    """The upstream inference server refused the request as the caller's fault (its own 4xx status, kept in
    ``upstream_status``): a bad input tensor, an unknown model or output there."""

    def __init__(self, message: str, *, upstream_status: int) -> None:
        super().__init__(message)
        self.upstream_status = upstream_status


class MissingDependency(CalibserveError):
    """The operation needs a package this installation lacks (torch, in an image built without it)."""


class Overloaded(CalibserveError):
    """More requests (or request bytes) are in flight than the configured limits allow; retry shortly."""


class RequestTimeout(CalibserveError):
    """A request's headers, or its body, did not arrive in time (too slowly, or not at all)."""


class HeadersTooLarge(CalibserveError):
    """A request's line and headers are larger than the configured limit."""


class PayloadTooLarge(CalibserveError):
    """A request body (or message) is larger than the configured limit."""


class Unauthenticated(CalibserveError):
    """No API key was presented, or the key is not one of the configured keys."""


class PermissionDenied(CalibserveError):
    """The API key is valid but its role does not allow the operation."""


class UnsupportedMediaType(CalibserveError):
    """The request body is in a format the operation does not read."""


class NotAcceptable(CalibserveError):
    """The client accepts no format the operation can answer in."""


class WorkTimeout(CalibserveError):
    """A computation took longer than its configured limit and was stopped."""


class WorkCancelled(CalibserveError):
    """A computation was stopped because nobody waits for its answer any more (the client went away)."""
