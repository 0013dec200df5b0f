"""Typed HTTP client for the calibserve v1 API, synchronous and asynchronous (httpx).

Both clients offer the same methods, one per route of the API (see the table in the README / DESIGN notes).
Every method is written once, in :class:`_Routes`, where it builds a :class:`_Call` (method, path, body and
how to decode the answer); :class:`CalibserveClient` sends calls with ``httpx.Client`` and
:class:`AsyncCalibserveClient` awaits them with ``httpx.AsyncClient``. Retry and decoding rules are shared
functions, so the two clients cannot drift apart.

Arrays go in as numpy arrays (or nested lists, or anything with ``.tolist()``) and come out of
``calibrate``/``predict`` as numpy arrays. Errors answered as ``application/problem+json`` raise a subclass
of :class:`ApiError` chosen by status; connection errors and 503 answers are retried with bounded
exponential backoff (honouring ``Retry-After``), and every request has a timeout.

Examples
--------
>>> with CalibserveClient("http://127.0.0.1:8000", api_key="...") as client:  # doctest: +SKIP
...     client.put_model("resnet", num_classes=10)
...     client.fit("resnet", logits=val_logits, labels=val_labels)
...     answer = client.calibrate("resnet", logits=test_logits)
...     answer["probabilities"].shape
(5000, 10)
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import quote

import httpx
import numpy as np
import orjson

from service.errors import CalibserveError

API_KEY_ENV = "CALIBSERVE_API_KEY"
MAX_BACKOFF_S = 5.0

# ------------------------------------------------------------------------------------------------- errors


class ApiError(CalibserveError):
    """An error answer of the API, decoded from its ``application/problem+json`` body (RFC 9457).

    Attributes
    ----------
    status : int
        HTTP status code.
    title, detail : str
        Short summary and human-readable explanation.
    errors : list of dict
        Field problems (``{"field": ..., "message": ..., "row": ...}``), possibly empty.
    type : str
        URI naming the problem kind.
    """

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        errors: list[dict] | None = None,
        type: str = "about:blank",
    ) -> None:
        super().__init__(f"{status} {title}: {detail}" if detail else f"{status} {title}")
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = list(errors or [])
        self.type = type


class InvalidRequest(ApiError):
    """400 or 422: the request's data or options are wrong."""


class Unauthorized(ApiError):
    """401: no API key, or an unknown one."""


class Forbidden(ApiError):
    """403: the key's role may not do this (a ``read`` key on a write route)."""


class NotFoundError(ApiError):
    """404: no such model, calibrator version or route."""


class ConflictError(ApiError):
    """409: the request contradicts the current state (e.g. deleting the active version)."""


class PayloadTooLarge(ApiError):
    """413: the body is over the server's ``CALIBSERVE_MAX_BODY_BYTES``."""


class ModelError(ApiError):
    """502: the model's TorchScript failed or returned something unusable."""


class ServiceUnavailable(ApiError):
    """503: not ready, overloaded or the store is not writable (raised once retries are spent)."""


_ERROR_CLASSES: dict[int, type[ApiError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLarge,
    422: InvalidRequest,
    502: ModelError,
    503: ServiceUnavailable,
}


def error_from_response(response: httpx.Response) -> ApiError:
    """Build the typed error for a non-2xx answer; a body that is not problem+json still gives one."""
    body: Any = {}
    if response.content:
        try:
            body = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            body = {}
    if not isinstance(body, dict):
        body = {}
    status = response.status_code
    cls = _ERROR_CLASSES.get(status, ApiError)
    detail = body.get("detail")
    if detail is None:
        detail = response.text[:500] if not body else ""
    errors = body.get("errors") if isinstance(body.get("errors"), list) else []
    return cls(
        status,
        str(body.get("title") or response.reason_phrase or "Error"),
        str(detail),
        errors,
        str(body.get("type") or "about:blank"),
    )


# ----------------------------------------------------------------------------------------- calls, decoding

Decode = Literal["json", "json_or_none", "arrays", "bytes", "text"]
_ARRAY_FIELDS = {"probabilities": np.float64, "logits": np.float64, "predicted_class": np.int64}


@dataclass(frozen=True)
class _Call:
    """One request, as data: what both clients send and how to read its answer.

    ``idempotent`` calls (reads, PUT, DELETE, and POSTs that only compute) are retried after any transport
    error; the others (fit, calibrator upload: each makes a new version) only when the request never reached
    the server (connect errors) or was refused with 503 before any work.
    """

    method: str
    path: str
    params: Mapping[str, Any] | None = None
    json: Any = None
    content: bytes | None = None
    content_type: str | None = None
    decode: Decode = "json"
    idempotent: bool = True
    retry_unavailable: bool = True
    headers: Mapping[str, str] = field(default_factory=dict)

    def request(self, http: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        headers = dict(self.headers)
        content = self.content
        if self.json is not None:
            content = orjson.dumps(self.json, option=orjson.OPT_SERIALIZE_NUMPY)
            headers["Content-Type"] = "application/json"
        elif self.content_type is not None:
            headers["Content-Type"] = self.content_type
        params = {k: v for k, v in (self.params or {}).items() if v is not None}
        return http.build_request(self.method, self.path, params=params, content=content, headers=headers)


def _decode(call: _Call, response: httpx.Response) -> Any:
    if not response.is_success:
        raise error_from_response(response)
    if call.decode == "bytes":
        return response.content
    if call.decode == "text":
        return response.text
    if call.decode == "json_or_none" and not response.content:
        return None
    body = orjson.loads(response.content)
    if call.decode == "arrays" and isinstance(body, dict):
        for name, dtype in _ARRAY_FIELDS.items():
            if name in body and body[name] is not None:
                body[name] = np.asarray(body[name], dtype=dtype)
    return body


def _retry_delay(
    call: _Call,
    attempt: int,
    retries: int,
    backoff: float,
    *,
    error: httpx.TransportError | None = None,
    response: httpx.Response | None = None,
) -> float | None:
    """Seconds to wait before trying ``call`` again, or ``None`` when it must not be retried."""
    if attempt >= retries:
        return None
    if error is not None:
        unsent = isinstance(error, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
        if not (unsent or call.idempotent):
            return None
    elif response is None or response.status_code != 503 or not call.retry_unavailable:
        return None
    delay = backoff * 2**attempt
    if response is not None:
        # Retry-After may also be an HTTP date; the exponential delay will do then
        with contextlib.suppress(ValueError):
            delay = max(delay, float(response.headers.get("Retry-After", 0)))
    return min(delay, MAX_BACKOFF_S)


def _array(values: Any) -> Any:
    """A body value for an array argument: a contiguous numpy array orjson can write, or the value as is."""
    if values is None:
        return None
    if hasattr(values, "detach") and hasattr(values, "cpu"):  # a torch tensor, without importing torch
        values = values.detach().cpu().numpy()
    if isinstance(values, np.ndarray):
        if values.dtype.kind not in "fiub":  # object arrays: orjson writes plain lists of Python numbers
            return values.tolist()
        if values.dtype.kind == "f" and values.dtype != np.float32:
            values = values.astype(np.float64, copy=False)  # float16 and big-endian floats: not for orjson
        elif values.dtype.kind in "iub":
            values = values.astype(np.int64, copy=False)
        return np.ascontiguousarray(values)
    if isinstance(values, list | tuple):
        return values
    return np.ascontiguousarray(np.asarray(values))


def _one_of(**scores: Any) -> dict[str, Any]:
    given = {name: _array(value) for name, value in scores.items() if value is not None}
    if len(given) != 1:
        raise ValueError(f"give exactly one of {', '.join(scores)} (got {', '.join(given) or 'none'})")
    return given


NPZ = "application/x-npz"


def _labelled_call(
    path: str, arrays: dict[str, Any], fields: dict[str, Any], *, binary: bool, **call: Any
) -> _Call:
    """A fit, evaluate or metrics request: the arrays as an ``.npz`` body and the other fields as query
    parameters (``binary``), or everything as one JSON object. Arrays that are not numeric (ragged lists)
    go as JSON whatever ``binary`` says, so the server words their problem."""
    params = dict(call.pop("params", None) or {})
    if binary:
        try:
            numeric = {key: np.asarray(value) for key, value in arrays.items() if value is not None}
        except ValueError:  # ragged
            numeric = {}
        if numeric and all(array.dtype.kind in "biuf" for array in numeric.values()):
            buffer = io.BytesIO()
            np.savez(buffer, **numeric)
            query = {
                key: (orjson.dumps(value).decode() if isinstance(value, Mapping) else _query_value(value))
                for key, value in fields.items()
                if value is not None
            }
            return _Call(
                "POST", path, params={**params, **query}, content=buffer.getvalue(), content_type=NPZ, **call
            )
    body = {key: value for key, value in {**arrays, **fields}.items() if value is not None}
    return _Call("POST", path, params=params, json=body, **call)


def _segments(segments: Any) -> Any:
    """Segment keys as they travel: integer keys as an array (an ``.npz`` member), string keys as a JSON
    list (an ``.npz`` body holds numbers only, so the call goes as JSON then)."""
    if segments is None:
        return None
    values = segments.tolist() if isinstance(segments, np.ndarray) else list(segments)
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=np.int64)
    return values


def _query_value(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _name(name: str) -> str:
    return quote(str(name), safe="")


# ------------------------------------------------------------------------------------------------- routes

_Json = TypeVar("_Json")
_JsonOrNone = TypeVar("_JsonOrNone")
_Bytes = TypeVar("_Bytes")
_Text = TypeVar("_Text")


class _Routes(Generic[_Json, _JsonOrNone, _Bytes, _Text]):
    """Every v1 route, once. The type parameters are the answer types: plain for the synchronous client,
    awaitables of them for the asynchronous one."""

    def _send(self, call: _Call) -> Any:
        raise NotImplementedError

    # health and operations

    def healthz(self) -> _Json:
        """``GET /healthz``: liveness."""
        return self._send(_Call("GET", "/healthz"))

    def readyz(self) -> _Json:
        """``GET /readyz``: readiness; raises :class:`ServiceUnavailable` at once (no retry) while not ready."""
        return self._send(_Call("GET", "/readyz", retry_unavailable=False))

    def prometheus_metrics(self) -> _Text:
        """``GET /metrics``: Prometheus text exposition."""
        return self._send(_Call("GET", "/metrics", decode="text"))

    # models

    def list_models(self, *, limit: int | None = None, cursor: str | None = None) -> _Json:
        """``GET /v1/models``: one page of models with their active calibrator."""
        return self._send(_Call("GET", "/v1/models", params={"limit": limit, "cursor": cursor}))

    def put_model(
        self,
        name: str,
        *,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        description: str | None = None,
    ) -> _Json:
        """``PUT /v1/models/{name}``: create or update a logits-only model."""
        body: dict[str, Any] = {"num_classes": int(num_classes)}
        if class_names is not None:
            body["class_names"] = list(class_names)
        if description is not None:
            body["description"] = description
        return self._send(_Call("PUT", f"/v1/models/{_name(name)}", json=body))

    def upload_torchscript(
        self,
        name: str,
        data: bytes,
        *,
        input_shape: Sequence[int] | None = None,
        class_names: Sequence[str] | None = None,
        description: str | None = None,
    ) -> _Json:
        """``PUT /v1/models/{name}/torchscript``: upload a TorchScript file (raw bytes).

        ``input_shape`` (one sample's shape), ``class_names`` and ``description`` travel as the
        ``X-Model-Input-Shape``, ``X-Model-Class-Names`` and ``X-Model-Description`` headers.
        """
        headers = {}
        if input_shape is not None:
            headers["X-Model-Input-Shape"] = ",".join(str(int(size)) for size in input_shape)
        if class_names is not None:
            headers["X-Model-Class-Names"] = ",".join(class_names)
        if description is not None:
            headers["X-Model-Description"] = description
        return self._send(
            _Call(
                "PUT",
                f"/v1/models/{_name(name)}/torchscript",
                content=bytes(data),
                content_type="application/octet-stream",
                headers=headers,
            )
        )

    def get_model(self, name: str) -> _Json:
        """``GET /v1/models/{name}``: model metadata."""
        return self._send(_Call("GET", f"/v1/models/{_name(name)}"))

    def delete_model(self, name: str) -> _JsonOrNone:
        """``DELETE /v1/models/{name}``."""
        return self._send(_Call("DELETE", f"/v1/models/{_name(name)}", decode="json_or_none"))

    def export(self, name: str, *, format: str = "torchscript") -> _Bytes:
        """``GET /v1/models/{name}/export``: the model (with its calibrator) as a file, e.g. TorchScript."""
        return self._send(
            _Call("GET", f"/v1/models/{_name(name)}/export", params={"format": format}, decode="bytes")
        )

    # calibrators

    def fit(
        self,
        name: str,
        *,
        labels: Any,
        logits: Any = None,
        inputs: Any = None,
        probabilities: Any = None,
        method: str = "temperature",
        activate: bool = True,
        options: Mapping[str, Any] | None = None,
        sample_weight: Any = None,
        binary: bool = True,
        conformal: Mapping[str, Any] | None = None,
        conformal_fraction: float | None = None,
    ) -> _Json:
        """``POST /v1/models/{name}/fit``: fit a calibrator on labelled scores; returns its document.

        Give exactly one of ``logits``, ``inputs`` (TorchScript models) or ``probabilities``. The arrays
        travel as an ``.npz`` body (``binary=False``: JSON). ``conformal`` (``{"score": "lac", "alpha":
        0.1, ...}``) stores split-conformal prediction sets in the version, their threshold fitted on
        ``conformal_fraction`` of the rows (the server's default: 0.5).
        """
        arrays = {
            **_one_of(logits=logits, inputs=inputs, probabilities=probabilities),
            "labels": _array(labels),
            "sample_weight": _array(sample_weight),
        }
        fields = {"method": method, "activate": bool(activate), "options": dict(options) if options else None}
        if conformal is not None:
            fields["conformal"] = dict(conformal)
            fields["conformal_fraction"] = conformal_fraction
        return self._send(
            _labelled_call(f"/v1/models/{_name(name)}/fit", arrays, fields, binary=binary, idempotent=False)
        )

    def upload_calibrator(self, name: str, document: Mapping[str, Any]) -> _Json:
        """``POST /v1/models/{name}/calibrators``: store a calibrator document made elsewhere as a new version."""
        return self._send(
            _Call("POST", f"/v1/models/{_name(name)}/calibrators", json=dict(document), idempotent=False)
        )

    def list_calibrators(self, name: str, *, limit: int | None = None, cursor: str | None = None) -> _Json:
        """``GET /v1/models/{name}/calibrators``: versions, newest first, one page."""
        return self._send(
            _Call("GET", f"/v1/models/{_name(name)}/calibrators", params={"limit": limit, "cursor": cursor})
        )

    def get_calibrator(self, name: str, version: int) -> _Json:
        """``GET /v1/models/{name}/calibrators/{version}``: one calibrator document."""
        return self._send(_Call("GET", f"/v1/models/{_name(name)}/calibrators/{int(version)}"))

    def activate(self, name: str, version: int) -> _Json:
        """``POST /v1/models/{name}/calibrators/{version}/activate``: serve this version from now on."""
        return self._send(_Call("POST", f"/v1/models/{_name(name)}/calibrators/{int(version)}/activate"))

    def delete_calibrator(self, name: str, version: int) -> _JsonOrNone:
        """``DELETE /v1/models/{name}/calibrators/{version}`` (never the active one: 409)."""
        return self._send(
            _Call("DELETE", f"/v1/models/{_name(name)}/calibrators/{int(version)}", decode="json_or_none")
        )

    # inference and evaluation

    def calibrate(
        self,
        name: str,
        *,
        logits: Any = None,
        probabilities: Any = None,
        version: int | None = None,
        seed: int | None = None,
        intervals: bool = False,
    ) -> _Json:
        """``POST /v1/models/{name}/calibrate``: calibrated probabilities.

        Returns a dict whose ``probabilities`` (float64, N x K) and ``predicted_class`` (int64, N) are numpy
        arrays, with ``calibrator_version`` (and ``predicted_label`` when the model has class names; and
        ``prediction_sets``, lists of class indices, with ``alpha`` when the version has conformal sets:
        ``seed`` draws randomised ones reproducibly). ``intervals=True`` (venn_abers calibrators) adds
        ``probability_intervals``: ``[p0, p1]`` per row and class.
        """
        body = _one_of(logits=logits, probabilities=probabilities)
        if seed is not None:
            body["seed"] = seed
        if intervals:
            body["intervals"] = True
        return self._send(
            _Call(
                "POST",
                f"/v1/models/{_name(name)}/calibrate",
                params={"version": version},
                json=body,
                decode="arrays",
            )
        )

    def predict(
        self, name: str, *, inputs: Any, version: int | None = None, return_logits: bool = False
    ) -> _Json:
        """``POST /v1/models/{name}/predict``: run the TorchScript model, then calibrate.

        The answer is that of :meth:`calibrate`, plus the model's ``logits`` (numpy) if ``return_logits``.
        """
        return self._send(
            _Call(
                "POST",
                f"/v1/models/{_name(name)}/predict",
                params={"version": version},
                json={"inputs": _array(inputs), "return_logits": bool(return_logits)},
                decode="arrays",
            )
        )

    def evaluate(
        self,
        name: str,
        *,
        labels: Any,
        logits: Any = None,
        inputs: Any = None,
        probabilities: Any = None,
        version: int | None = None,
        n_bins: int = 15,
        binning: str = "width",
        bootstrap: int = 0,
        seed: int = 0,
        nll_clip: float | None = None,
        ece_convention: str | None = None,
        per_class_tests: bool = False,
        segments: Any = None,
        min_segment_size: int = 100,
        binary: bool = True,
        conformal: Mapping[str, Any] | None = None,
        conformal_fraction: float | None = None,
    ) -> _Json:
        """``POST /v1/models/{name}/evaluate``: the evaluation report of labelled data (uncalibrated vs
        calibrated). The arrays travel as an ``.npz`` body (``binary=False``: JSON). NLL is exact (null
        where infinite, with ``nll_infinite_rows``) unless ``nll_clip``; ``ece_convention`` adds
        ``ece_<convention>`` (docs/ece-conventions.md)."""
        arrays = {
            **_one_of(logits=logits, inputs=inputs, probabilities=probabilities),
            "labels": _array(labels),
            "segments": _segments(segments),
        }
        fields = {
            "n_bins": int(n_bins),
            "binning": binning,
            "bootstrap": int(bootstrap),
            "seed": int(seed),
            "nll_clip": nll_clip,
            "ece_convention": ece_convention,
            "per_class_tests": bool(per_class_tests),
            "min_segment_size": int(min_segment_size),
        }
        if conformal is not None:  # sets fitted on part of these rows, their coverage on the rest
            fields["conformal"] = dict(conformal)
            fields["conformal_fraction"] = conformal_fraction
        return self._send(
            _labelled_call(
                f"/v1/models/{_name(name)}/evaluate",
                arrays,
                fields,
                binary=binary,
                params={"version": version},
            )
        )

    def metrics(
        self,
        *,
        labels: Any,
        logits: Any = None,
        probabilities: Any = None,
        n_bins: int = 15,
        binning: str = "width",
        losses: bool = True,
        bootstrap: int = 0,
        seed: int = 0,
        nll_clip: float | None = None,
        ece_convention: str | None = None,
        per_class_tests: bool = False,
        segments: Any = None,
        min_segment_size: int = 100,
        binary: bool = True,
    ) -> _Json:
        """``POST /v1/metrics``: stateless figures (ece, mce, brier, nll, accuracy, reliability bins, losses).
        The arrays travel as an ``.npz`` body (``binary=False``: JSON). NLL is exact (null where infinite,
        with ``nll_infinite_rows``) unless ``nll_clip``."""
        arrays = {
            **_one_of(logits=logits, probabilities=probabilities),
            "labels": _array(labels),
            "segments": _segments(segments),
        }
        fields = {
            "n_bins": int(n_bins),
            "binning": binning,
            "losses": bool(losses),
            "bootstrap": int(bootstrap),
            "seed": int(seed),
            "nll_clip": nll_clip,
            "ece_convention": ece_convention,
            "per_class_tests": bool(per_class_tests),
            "min_segment_size": int(min_segment_size),
        }
        return self._send(_labelled_call("/v1/metrics", arrays, fields, binary=binary))

    # live monitoring

    def outcomes(
        self,
        name: str,
        *,
        labels: Any,
        prediction_ids: Any = None,
        logits: Any = None,
        probabilities: Any = None,
        calibrator_version: int | None = None,
    ) -> _Json:
        """``POST /v1/models/{name}/outcomes``: the true labels of served rows.

        Give exactly one of ``prediction_ids`` (the ids of logged predictions: the ``prediction_ids`` of a
        ``calibrate``/``predict`` answer, or ``<prefix>.<row>`` from a binary answer's
        ``X-Prediction-Id-Prefix``), ``logits`` or ``probabilities`` (labelled scores joined elsewhere, scored
        with ``calibrator_version``, the active one by default). Returns the counts ``counted``, ``repeat``,
        ``unknown``, ``invalid`` and one ``results`` entry per row.

        By id, an outcome counts once whatever is sent again, so the call is retried like a read; a retry
        after a lost answer reports the rows the first attempt counted as ``repeat``. Labelled scores are
        logged as new rows on each call, so they are retried only when the request never reached the server.
        """
        scores = _one_of(prediction_ids=prediction_ids, logits=logits, probabilities=probabilities)
        by_id = "prediction_ids" in scores
        if by_id and calibrator_version is not None:
            raise ValueError("calibrator_version goes with logits or probabilities, not prediction_ids")
        body = {**scores, "labels": _array(labels)}
        if calibrator_version is not None:
            body["calibrator_version"] = int(calibrator_version)
        return self._send(_Call("POST", f"/v1/models/{_name(name)}/outcomes", json=body, idempotent=by_id))

    def monitoring(self, name: str, *, window: str = "1h", calibrator_version: int | None = None) -> _Json:
        """``GET /v1/models/{name}/monitoring``: the calibration figures of the labelled outcomes of the last
        ``window`` (``15m``, ``1h``, ``24h``, ``7d``), the label-free estimates and the drift state, for the
        outcomes of ``calibrator_version`` (the active calibrator's by default)."""
        return self._send(
            _Call(
                "GET",
                f"/v1/models/{_name(name)}/monitoring",
                params={"window": window, "calibrator_version": calibrator_version},
            )
        )

    def refit(
        self,
        name: str,
        *,
        window: str = "24h",
        method: str = "temperature",
        options: Mapping[str, Any] | None = None,
        holdout: float = 0.3,
        activate: bool | Literal["if_better"] = False,
        seed: int = 0,
    ) -> _Json:
        """``POST /v1/models/{name}/refit``: fit a new calibrator version on the window's labelled outcomes,
        ``holdout`` of them held out to compare it with the active one. ``activate``: ``True``, ``False`` or
        ``"if_better"`` (when the held-out NLL improves). Returns the new version's summary, ``activated``,
        the held-out figures of both and ``improves_nll``. Each call stores a new version: never retried
        once the request may have reached the server."""
        body = {
            "window": window,
            "method": method,
            "options": dict(options or {}),
            "holdout": float(holdout),
            "activate": activate if isinstance(activate, str) else bool(activate),
            "seed": int(seed),
        }
        return self._send(_Call("POST", f"/v1/models/{_name(name)}/refit", json=body, idempotent=False))


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"Accept": "application/json, application/problem+json;q=0.9, */*;q=0.1"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


class CalibserveClient(_Routes[dict[str, Any], dict[str, Any] | None, bytes, str]):
    """Synchronous client.

    Parameters
    ----------
    base_url : str
        Service address, e.g. ``"http://127.0.0.1:8000"``.
    api_key : str, optional
        Sent as ``Authorization: Bearer <key>``. Callers reading it from the environment use
        ``CALIBSERVE_API_KEY`` (the CLI does).
    timeout : float
        Seconds for each of connect, read, write and pool acquisition.
    retries : int
        Retries after a connection error or a 503 answer (so ``retries + 1`` attempts at most); the wait
        doubles from ``backoff`` seconds, or follows ``Retry-After``, and never exceeds 5 s.
    transport : httpx.BaseTransport, optional
        For tests (``httpx.MockTransport``) or custom networking.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.2,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.retries = retries
        self.backoff = backoff
        self._http = httpx.Client(
            base_url=base_url, headers=_headers(api_key), timeout=timeout, transport=transport
        )

    def _send(self, call: _Call) -> Any:
        attempt = 0
        while True:
            try:
                response = self._http.send(call.request(self._http))
            except httpx.TransportError as error:
                delay = _retry_delay(call, attempt, self.retries, self.backoff, error=error)
                if delay is None:
                    raise
            else:
                delay = _retry_delay(call, attempt, self.retries, self.backoff, response=response)
                if delay is None:
                    return _decode(call, response)
                response.close()
            time.sleep(delay)
            attempt += 1

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CalibserveClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncCalibserveClient(
    _Routes[
        Awaitable[dict[str, Any]],
        Awaitable[dict[str, Any] | None],
        Awaitable[bytes],
        Awaitable[str],
    ]
):
    """Asynchronous client: the same methods as :class:`CalibserveClient`, each returning an awaitable.

    Parameters are those of :class:`CalibserveClient`; ``transport`` is an ``httpx.AsyncBaseTransport``.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.2,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.retries = retries
        self.backoff = backoff
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=_headers(api_key), timeout=timeout, transport=transport
        )

    async def _send(self, call: _Call) -> Any:
        attempt = 0
        while True:
            try:
                response = await self._http.send(call.request(self._http))
            except httpx.TransportError as error:
                delay = _retry_delay(call, attempt, self.retries, self.backoff, error=error)
                if delay is None:
                    raise
            else:
                delay = _retry_delay(call, attempt, self.retries, self.backoff, response=response)
                if delay is None:
                    return _decode(call, response)
                await response.aclose()
            await asyncio.sleep(delay)
            attempt += 1

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncCalibserveClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
