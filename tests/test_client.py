"""The HTTP client: request encoding, problem+json decoding, retries (httpx.MockTransport), then a live server."""

from __future__ import annotations

import asyncio
import io
import json

import httpx
import numpy as np
import pytest

from service import client as client_module
from service.client import (
    ApiError,
    AsyncCalibserveClient,
    CalibserveClient,
    ConflictError,
    Forbidden,
    InvalidRequest,
    ModelError,
    NotFoundError,
    PayloadTooLarge,
    ServiceUnavailable,
    Unauthorized,
)
from service.errors import CalibserveError
from tests.helpers.numerics import softmax_t
from tests.helpers.servers import Server

BASE = "http://calibserve.test"


def problem(status: int, detail: str, **extra) -> httpx.Response:
    body = {"type": f"https://calibserve.dev/problems/{status}", "title": f"title {status}", "status": status}
    body |= {"detail": detail, **extra}
    return httpx.Response(status, json=body, headers={"content-type": "application/problem+json"})


class Recorder:
    """A MockTransport handler that answers from a script and keeps every request it saw."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def sync_client(recorder: Recorder, **kwargs) -> CalibserveClient:
    return CalibserveClient(BASE, transport=httpx.MockTransport(recorder), backoff=0.0, **kwargs)


# ------------------------------------------------------------------------------------------- error decoding


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, InvalidRequest),
        (422, InvalidRequest),
        (401, Unauthorized),
        (403, Forbidden),
        (404, NotFoundError),
        (409, ConflictError),
        (413, PayloadTooLarge),
        (502, ModelError),
        (503, ServiceUnavailable),
        (418, ApiError),
    ],
)
def test_problem_json_becomes_the_typed_error_of_its_status(status, cls):
    field_errors = [{"field": "logits", "message": "contains NaN or Inf at row 3", "row": 3}]
    recorder = Recorder(problem(status, "what went wrong", errors=field_errors))
    with sync_client(recorder, retries=0) as client, pytest.raises(cls) as caught:
        client.get_model("m")
    error = caught.value
    assert type(error) is cls
    assert isinstance(error, CalibserveError)  # the CLI turns it into exit code 2
    assert (error.status, error.title, error.detail) == (status, f"title {status}", "what went wrong")
    assert error.errors == field_errors
    assert error.type == f"https://calibserve.dev/problems/{status}"
    assert str(error) == f"{status} title {status}: what went wrong"


def test_an_error_without_problem_json_still_has_status_and_text():
    recorder = Recorder(httpx.Response(404, text="no such route"))
    with sync_client(recorder) as client, pytest.raises(NotFoundError) as caught:
        client.healthz()
    assert caught.value.status == 404
    assert caught.value.detail == "no such route"
    assert caught.value.errors == []


# ------------------------------------------------------------------------------------------------ requests


def test_fit_sends_arrays_as_npz_and_fields_as_query_parameters_by_default():
    logits = np.array([[1.5, -2.0], [0.25, 3.0]], dtype=np.float32)
    labels = np.array([0, 1], dtype=np.int32)
    recorder = Recorder(httpx.Response(200, json={"version": 1}))
    with sync_client(recorder) as client:
        client.fit("resnet", logits=logits, labels=labels, activate=False, options={"max_iter": 7})
    (request,) = recorder.requests
    assert request.headers["content-type"] == "application/x-npz"
    assert dict(request.url.params) == {
        "method": "temperature",
        "activate": "false",
        "options": '{"max_iter":7}',
    }
    with np.load(io.BytesIO(request.content), allow_pickle=False) as sent:
        assert sorted(sent.files) == ["labels", "logits"]
        np.testing.assert_array_equal(sent["logits"], logits)
        assert sent["logits"].dtype == np.float32
        np.testing.assert_array_equal(sent["labels"], labels)


def test_fit_sends_numpy_arrays_as_json_lists_with_the_key_when_asked():
    logits = np.array([[1.5, -2.0], [0.25, 3.0]], dtype=np.float32)
    labels = np.array([0, 1], dtype=np.int32)
    recorder = Recorder(httpx.Response(200, json={"version": 1, "temperature": 1.5}))
    with sync_client(recorder, api_key="s3cret") as client:
        document = client.fit(
            "resnet", logits=logits, labels=labels, method="temperature", activate=False, binary=False
        )
    assert document == {"version": 1, "temperature": 1.5}
    (request,) = recorder.requests
    assert request.method == "POST"
    assert request.url.path == "/v1/models/resnet/fit"
    assert request.headers["authorization"] == "Bearer s3cret"
    assert request.headers["content-type"] == "application/json"
    body = json.loads(request.content)
    assert body == {
        "logits": [[1.5, -2.0], [0.25, 3.0]],
        "labels": [0, 1],
        "method": "temperature",
        "activate": False,
    }


def test_model_names_are_quoted_into_one_path_segment():
    recorder = Recorder(httpx.Response(200, json={}))
    with sync_client(recorder) as client:
        client.get_model("../etc/passwd")
    assert recorder.requests[0].url.raw_path == b"/v1/models/..%2Fetc%2Fpasswd"


def test_calibrate_returns_numpy_arrays_and_pins_a_version():
    answer = {"probabilities": [[0.25, 0.75]], "predicted_class": [1], "calibrator_version": 4}
    recorder = Recorder(httpx.Response(200, json=answer))
    with sync_client(recorder) as client:
        result = client.calibrate("m", probabilities=[[0.4, 0.6]], version=4)
    assert recorder.requests[0].url.params["version"] == "4"
    assert json.loads(recorder.requests[0].content) == {"probabilities": [[0.4, 0.6]]}
    assert isinstance(result["probabilities"], np.ndarray) and result["probabilities"].dtype == np.float64
    np.testing.assert_array_equal(result["probabilities"], [[0.25, 0.75]])
    np.testing.assert_array_equal(result["predicted_class"], [1])
    assert result["calibrator_version"] == 4


def test_exactly_one_kind_of_scores_is_required():
    recorder = Recorder(httpx.Response(200, json={}))
    with sync_client(recorder) as client:
        with pytest.raises(ValueError, match="exactly one of logits, probabilities"):
            client.calibrate("m")
        with pytest.raises(ValueError, match="got logits, probabilities"):
            client.calibrate("m", logits=[[0.0, 1.0]], probabilities=[[0.5, 0.5]])
    assert recorder.requests == []


def test_export_returns_bytes_and_delete_accepts_an_empty_answer():
    recorder = Recorder(httpx.Response(200, content=b"PK\x03\x04model"), httpx.Response(204))
    with sync_client(recorder) as client:
        assert client.export("m") == b"PK\x03\x04model"
        assert client.delete_calibrator("m", 2) is None
    assert recorder.requests[0].url.params["format"] == "torchscript"
    assert (recorder.requests[1].method, recorder.requests[1].url.path) == (
        "DELETE",
        "/v1/models/m/calibrators/2",
    )


# ------------------------------------------------------------------------------------------------- retries


def test_503_is_retried_until_an_answer_comes():
    recorder = Recorder(
        problem(503, "not ready"), problem(503, "not ready"), httpx.Response(200, json={"ok": 1})
    )
    with sync_client(recorder, retries=3) as client:
        assert client.list_models() == {"ok": 1}
    assert len(recorder.requests) == 3


def test_retries_are_bounded_and_end_in_the_typed_error():
    recorder = Recorder(problem(503, "overloaded"))
    with sync_client(recorder, retries=2) as client, pytest.raises(ServiceUnavailable, match="overloaded"):
        client.metrics(logits=[[0.0, 1.0]], labels=[1])
    assert len(recorder.requests) == 3


def test_readyz_reports_503_at_once():
    recorder = Recorder(problem(503, "loading models"))
    with sync_client(recorder, retries=3) as client, pytest.raises(ServiceUnavailable):
        client.readyz()
    assert len(recorder.requests) == 1


def test_client_errors_are_not_retried():
    recorder = Recorder(problem(400, "labels has 3 entries but the scores have 2 rows"))
    with sync_client(recorder, retries=3) as client, pytest.raises(InvalidRequest):
        client.evaluate("m", logits=[[0.0, 1.0], [1.0, 0.0]], labels=[0, 1, 1])
    assert len(recorder.requests) == 1


def test_connection_errors_are_retried_for_every_call():
    recorder = Recorder(httpx.ConnectError("refused"), httpx.Response(200, json={"version": 2}))
    with sync_client(recorder, retries=1) as client:
        assert client.fit("m", logits=[[0.0, 1.0]], labels=[1]) == {"version": 2}
    assert len(recorder.requests) == 2


def test_a_read_timeout_retries_a_computation_but_never_a_fit():
    # a fit that timed out may have been stored: sending it again would make a second version
    recorder = Recorder(httpx.ReadTimeout("slow"), httpx.Response(200, json={}))
    with sync_client(recorder, retries=3) as client, pytest.raises(httpx.ReadTimeout):
        client.fit("m", logits=[[0.0, 1.0]], labels=[1])
    assert len(recorder.requests) == 1

    recorder = Recorder(httpx.ReadTimeout("slow"), httpx.Response(200, json={"probabilities": [[0.5, 0.5]]}))
    with sync_client(recorder, retries=3) as client:
        assert client.calibrate("m", logits=[[0.0, 0.0]])["probabilities"].shape == (1, 2)
    assert len(recorder.requests) == 2


def test_backoff_doubles_honours_retry_after_and_is_capped():
    call = client_module._Call("GET", "/v1/models")
    unavailable = httpx.Response(503, headers={"Retry-After": "2"})
    assert client_module._retry_delay(call, 0, 3, 0.1, error=httpx.ConnectError("x")) == pytest.approx(0.1)
    assert client_module._retry_delay(call, 2, 3, 0.1, error=httpx.ConnectError("x")) == pytest.approx(0.4)
    assert client_module._retry_delay(call, 0, 3, 0.1, response=unavailable) == pytest.approx(2.0)
    assert client_module._retry_delay(call, 2, 3, 10.0, response=unavailable) == client_module.MAX_BACKOFF_S
    assert client_module._retry_delay(call, 3, 3, 0.1, response=unavailable) is None
    assert client_module._retry_delay(call, 0, 3, 0.1, response=httpx.Response(500)) is None


# --------------------------------------------------------------------------------------------------- async


def test_async_client_shares_encoding_retries_and_errors():
    answer = {"probabilities": [[0.1, 0.9]], "predicted_class": [1], "calibrator_version": 1}
    recorder = Recorder(
        httpx.ConnectError("refused"),
        problem(503, "busy"),
        httpx.Response(200, json=answer),
        problem(409, "version 1 is active"),
    )

    async def scenario():
        transport = httpx.MockTransport(recorder)
        async with AsyncCalibserveClient(BASE, api_key="k", transport=transport, backoff=0.0) as client:
            result = await client.calibrate("m", logits=np.array([[0.0, 2.0]]))
            with pytest.raises(ConflictError, match="version 1 is active"):
                await client.delete_calibrator("m", 1)
        return result

    result = asyncio.run(scenario())
    np.testing.assert_array_equal(result["predicted_class"], [1])
    assert result["probabilities"].dtype == np.float64
    assert len(recorder.requests) == 4
    assert all(request.headers["authorization"] == "Bearer k" for request in recorder.requests)
    assert json.loads(recorder.requests[2].content) == {"logits": [[0.0, 2.0]]}


# ---------------------------------------------------------------------------------------------- live server

ADMIN, READER = "admin-key-for-tests", "read-key-for-tests"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = tmp_path_factory.mktemp("client-store")
    with Server(store, env={"CALIBSERVE_API_KEYS": f"{ADMIN}:admin,{READER}:read"}) as running:
        yield running


def test_live_round_trip_through_every_route(server, cifar10):
    with CalibserveClient(server.url, api_key=ADMIN, timeout=60.0) as client:
        assert client.healthz()
        assert client.readyz()
        assert "# HELP" in client.prometheus_metrics()
        client.put_model("wrn", num_classes=10, description="WideResNet-16-4 on CIFAR-10")
        assert client.get_model("wrn")["num_classes"] == 10
        assert "wrn" in [item["name"] for item in client.list_models(limit=1000)["items"]]

        document = client.fit("wrn", logits=cifar10["logits_val"], labels=cifar10["labels_val"])
        temperature = document["temperature"]
        assert temperature == pytest.approx(2.03915, abs=1e-4)
        version = document["version"]
        assert client.get_calibrator("wrn", version) == document

        answer = client.calibrate("wrn", logits=cifar10["logits_test"])
        assert answer["calibrator_version"] == version
        np.testing.assert_allclose(
            answer["probabilities"], softmax_t(cifar10["logits_test"], temperature), atol=1e-6
        )
        np.testing.assert_array_equal(answer["predicted_class"], cifar10["logits_test"].argmax(axis=1))

        report = client.evaluate("wrn", logits=cifar10["logits_test"], labels=cifar10["labels_test"])
        assert report["uncalibrated"]["ece"] == pytest.approx(0.055219, abs=2e-6)
        assert report["calibrated"]["ece"] == pytest.approx(0.006447, abs=2e-6)
        figures = client.metrics(logits=cifar10["logits_test"], labels=cifar10["labels_test"])
        assert figures["ece"] == pytest.approx(report["uncalibrated"]["ece"], abs=1e-12)
        as_json = client.evaluate(
            "wrn", logits=cifar10["logits_test"], labels=cifar10["labels_test"], binary=False
        )
        # one answer whichever body carried the logits; JSON rounds float32 to its shortest decimal, which
        # then parses as a nearby float64, so the figures agree to float32 resolution, not bit for bit
        for figure, value in report["calibrated"].items():
            assert as_json["calibrated"][figure] == pytest.approx(value, rel=1e-6, abs=1e-9), figure

        staged = client.fit(
            "wrn", logits=cifar10["logits_val"][:500], labels=cifar10["labels_val"][:500], activate=False
        )
        uploaded = client.upload_calibrator("wrn", {**document, "version": None})
        assert len({version, staged["version"], uploaded["version"]}) == 3
        listed = [entry["version"] for entry in client.list_calibrators("wrn")["items"]]
        assert listed == sorted(listed, reverse=True) and set(listed) >= {version, uploaded["version"]}
        client.activate("wrn", staged["version"])
        assert (
            client.calibrate("wrn", logits=cifar10["logits_test"][:3])["calibrator_version"]
            == staged["version"]
        )
        pinned = client.calibrate("wrn", logits=cifar10["logits_test"][:3], version=version)
        assert pinned["calibrator_version"] == version
        with pytest.raises(ConflictError):
            client.delete_calibrator("wrn", staged["version"])  # the active one
        client.delete_calibrator("wrn", uploaded["version"])
        with pytest.raises(NotFoundError):
            client.get_calibrator("wrn", uploaded["version"])
        with pytest.raises(InvalidRequest) as caught:
            client.calibrate("wrn", logits=[[1.0, 2.0]])  # 2 columns for a 10-class model
        assert caught.value.status == 400 and "10 classes" in caught.value.detail
        with pytest.raises(InvalidRequest):
            client.get_model("x" * 300)
        client.delete_model("wrn")
        with pytest.raises(NotFoundError):
            client.get_model("wrn")


def test_live_roles_are_enforced_and_reported(server):
    with CalibserveClient(server.url, retries=0) as anonymous, pytest.raises(Unauthorized):
        anonymous.list_models()
    with CalibserveClient(server.url, api_key=READER, retries=0) as reader:
        assert isinstance(reader.list_models()["items"], list)
        with pytest.raises(Forbidden):
            reader.put_model("forbidden", num_classes=3)


def test_live_async_client_gives_the_same_answer(server, cifar10):
    logits = cifar10["logits_test"][:64]

    async def scenario():
        async with AsyncCalibserveClient(server.url, api_key=ADMIN) as client:
            await client.put_model("async-wrn", num_classes=10)
            await client.fit("async-wrn", logits=cifar10["logits_val"], labels=cifar10["labels_val"])
            answers = await asyncio.gather(*(client.calibrate("async-wrn", logits=logits) for _ in range(4)))
            await client.delete_model("async-wrn")
            return answers

    answers = asyncio.run(scenario())
    with CalibserveClient(server.url, api_key=ADMIN) as client:
        assert client.healthz()
    for answer in answers:  # the same rows through the same calibrator and code path: bit for bit
        np.testing.assert_array_equal(answer["probabilities"], answers[0]["probabilities"])
    assert answers[0]["probabilities"].shape == (64, 10)


def test_live_export_of_a_torchscript_model(server):
    with CalibserveClient(server.url, api_key=ADMIN) as client:
        try:
            data = client.export("digits-mlp")
        except NotFoundError as error:
            if "digits-mlp" in error.detail:
                raise
            pytest.skip(f"export route not there yet: {error}")
    assert data[:2] == b"PK"  # TorchScript files are zip archives
