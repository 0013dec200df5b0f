"""The Open Inference Protocol over gRPC: a real ``calibserve serve --grpc-port`` called by ``tritonclient.grpc``
(and by grpc's own stub, for what tritonclient does not send: typed contents, lies), as clients call Triton.

Every RPC answers; the probabilities are those of the HTTP routes to 1e-6, for raw and typed contents,
FP32/FP16/FP64 and pinned versions; each hostile request gets its documented status code and the worker goes
on serving.
"""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.helpers.data import REPO
from tests.helpers.processes import wait_for_workers
from tests.helpers.servers import Server, free_port
from tests.helpers.waiting import wait_until

ADMIN, READ = "admin-key-grpc", "read-key-grpc"
KEY = {"x-api-key": READ}
CLASSES = 10
MAX_BODY = 1024 * 1024
MODEL = "grpc-logits"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpc")
    env = {
        "CALIBSERVE_API_KEYS": f"{ADMIN}:admin,{READ}:read",
        "CALIBSERVE_MAX_BODY_BYTES": str(MAX_BODY),
        "CALIBSERVE_PREDICTION_LOG": "on",
    }
    with Server(root / "store", env=env, grpc=True) as running:
        http = running.client(headers={"X-API-Key": ADMIN})
        assert http.put(f"/v1/models/{MODEL}", json={"num_classes": CLASSES}).status_code in (200, 201)
        rng = np.random.default_rng(17)
        # version 1 (active) fitted where the logits are right, version 2 (staged) where they are noise: the
        # two temperatures, and so the pinned versions' answers, differ
        for informative in (True, False):
            logits = rng.normal(size=(300, CLASSES))
            labels = logits.argmax(axis=1) if informative else rng.integers(0, CLASSES, 300)
            body = {"logits": logits.tolist(), "labels": labels.tolist(), "activate": informative}
            assert http.post(f"/v1/models/{MODEL}/fit", json=body).status_code == 201
        yield running


@pytest.fixture(scope="module")
def client(server):
    return triton_grpc.InferenceServerClient(server.grpc_target)


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.grpc_target, options=[("grpc.max_send_message_length", -1)])
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def logits_of(rows: int, columns: int = CLASSES, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, columns)) * 4


def grpc_infer(
    client, array, datatype, *, model=MODEL, version="", input_name="logits", outputs=None, headers=KEY
):
    tensor = triton_grpc.InferInput(input_name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    requested = [triton_grpc.InferRequestedOutput(name) for name in outputs] if outputs else None
    return client.infer(model, [tensor], model_version=version, outputs=requested, headers=headers)


def http_infer(server, array, datatype, *, model=MODEL, version="", input_name="logits", outputs=None):
    """The same request over HTTP (binary tensors), as tritonclient.http sends it."""
    client = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
    tensor = triton_http.InferInput(input_name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=True)
    requested = (
        [triton_http.InferRequestedOutput(name, binary_data=True) for name in outputs] if outputs else None
    )
    return client.infer(
        model, [tensor], model_version=version, outputs=requested, headers={"X-API-Key": READ}
    )


def status_of(call) -> str:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value.status()


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()


def still_serving(client) -> None:
    assert client.is_server_live()
    answer = grpc_infer(client, logits_of(2).astype(np.float32), "FP32")
    assert answer.as_numpy("probabilities").shape == (2, CLASSES)


# ------------------------------------------------------------------------------------------- every RPC


def test_server_rpcs_are_open(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata(as_json=True)
    assert metadata["name"] == "calibserve" and "binary_tensor_data" in metadata["extensions"]


def test_model_metadata_and_readiness(client):
    metadata = client.get_model_metadata(MODEL, headers=KEY, as_json=True)
    assert metadata["versions"] == ["2", "1"] and metadata["platform"] == "calibserve_logits"
    assert {item["name"] for item in metadata["inputs"]} == {"logits", "probabilities"}
    assert [item["name"] for item in metadata["outputs"]] == ["probabilities", "logits", "predicted_class"]
    assert metadata["outputs"][0]["shape"] == ["-1", str(CLASSES)]
    pinned = client.get_model_metadata(MODEL, model_version="1", headers=KEY, as_json=True)
    assert pinned["versions"] == ["1"]
    assert client.is_model_ready(MODEL, headers=KEY)
    assert client.is_model_ready(MODEL, model_version="2", headers=KEY)


@pytest.mark.parametrize("datatype", ["FP32", "FP16", "FP64"])
@pytest.mark.parametrize("shape", [(1, CLASSES), (64, CLASSES)])
def test_raw_contents_give_the_http_answer(server, client, datatype, shape):
    array = logits_of(*shape).astype({"FP32": np.float32, "FP16": np.float16, "FP64": np.float64}[datatype])
    outputs = ["probabilities", "logits", "predicted_class"]
    answer = grpc_infer(client, array, datatype, outputs=outputs)
    expected = http_infer(server, array, datatype, outputs=outputs)
    for name in outputs:
        np.testing.assert_allclose(answer.as_numpy(name), expected.as_numpy(name), rtol=0, atol=1e-6)
        assert answer.as_numpy(name).dtype == expected.as_numpy(name).dtype
    assert answer.as_numpy("probabilities").dtype == (np.float64 if datatype == "FP64" else np.float32)
    response = answer.get_response(as_json=True)
    assert response["model_version"] == "1"
    assert response["parameters"]["calibrator_version"]["int64_param"] == "1"
    ids = response["parameters"]["prediction_ids"]["string_param"].split(",")
    assert len(ids) == shape[0]  # the prediction log counts gRPC answers too


def test_pinned_versions_answer_as_over_http(server, client):
    array = logits_of(8).astype(np.float32)
    answers = {}
    for version in ("1", "2"):
        answer = grpc_infer(client, array, "FP32", version=version).as_numpy("probabilities")
        expected = http_infer(server, array, "FP32", version=version).as_numpy("probabilities")
        np.testing.assert_allclose(answer, expected, rtol=0, atol=1e-6)
        answers[version] = answer
    assert not np.allclose(answers["1"], answers["2"])
    unpinned = grpc_infer(client, array, "FP32").as_numpy("probabilities")
    np.testing.assert_array_equal(unpinned, answers["1"])


def test_probabilities_input(server, client):
    logits = logits_of(5)
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = (probabilities / probabilities.sum(axis=1, keepdims=True)).astype(np.float32)
    outputs = ["probabilities", "logits"]
    answer = grpc_infer(client, probabilities, "FP32", input_name="probabilities", outputs=outputs)
    expected = http_infer(server, probabilities, "FP32", input_name="probabilities", outputs=outputs)
    for name in outputs:
        np.testing.assert_allclose(answer.as_numpy(name), expected.as_numpy(name), rtol=0, atol=1e-6)


def test_torchscript_inputs(server, client):
    pixels = np.random.default_rng(3).uniform(0, 16, size=(4, 64)).astype(np.float32)
    outputs = ["probabilities", "logits", "predicted_class"]
    answer = grpc_infer(client, pixels, "FP32", model="digits-mlp", input_name="inputs", outputs=outputs)
    expected = http_infer(server, pixels, "FP32", model="digits-mlp", input_name="inputs", outputs=outputs)
    for name in outputs:
        np.testing.assert_allclose(answer.as_numpy(name), expected.as_numpy(name), rtol=0, atol=1e-6)


@pytest.mark.parametrize("datatype", ["FP32", "FP64"])
def test_typed_contents_in_typed_contents_out(client, stub, datatype):
    array = logits_of(3)
    request = service_pb2.ModelInferRequest(model_name=MODEL, id="typed-1")
    tensor = request.inputs.add(name="logits", datatype=datatype, shape=list(array.shape))
    getattr(tensor.contents, f"{datatype.lower()}_contents").extend(array.reshape(-1).tolist())
    request.outputs.add(name="probabilities")
    request.outputs.add(name="predicted_class")
    response = stub.ModelInfer(request, metadata=tuple(KEY.items()))
    assert response.id == "typed-1" and not response.raw_output_contents
    probabilities = np.array(getattr(response.outputs[0].contents, f"{datatype.lower()}_contents"))
    raw = grpc_infer(client, array.astype(np.float32 if datatype == "FP32" else np.float64), datatype)
    np.testing.assert_allclose(
        probabilities.reshape(3, CLASSES), raw.as_numpy("probabilities"), rtol=0, atol=1e-6
    )
    assert (
        list(response.outputs[1].contents.int64_contents) == raw.as_numpy("probabilities").argmax(1).tolist()
    )


def test_request_metrics_count_grpc_calls(server, client):
    grpc_infer(client, logits_of(1).astype(np.float32), "FP32")
    text = httpx.get(server.url + "/metrics", headers={"X-API-Key": READ}).text
    infer_lines = [
        line
        for line in text.splitlines()
        if line.startswith("calibserve_requests_total{")
        and 'method="GRPC"' in line
        and 'route="/inference.GRPCInferenceService/ModelInfer"' in line
        and f'model="{MODEL}"' in line
        and 'status="200"' in line
    ]
    assert infer_lines and float(infer_lines[0].rsplit(" ", 1)[1]) >= 1


# --------------------------------------------------------------------------------------- hostile input


def test_keys_from_metadata(client):
    array = logits_of(1).astype(np.float32)
    assert status_of(lambda: grpc_infer(client, array, "FP32", headers={})) == "StatusCode.UNAUTHENTICATED"
    wrong = {"x-api-key": "not-a-key"}
    assert status_of(lambda: grpc_infer(client, array, "FP32", headers=wrong)) == "StatusCode.UNAUTHENTICATED"
    bearer = {"authorization": f"Bearer {READ}"}
    assert grpc_infer(client, array, "FP32", headers=bearer).as_numpy("probabilities").shape == (1, CLASSES)
    assert status_of(lambda: client.get_model_metadata(MODEL)) == "StatusCode.UNAUTHENTICATED"
    assert status_of(lambda: client.is_model_ready(MODEL)) == "StatusCode.UNAUTHENTICATED"
    still_serving(client)


def test_roles_are_checked(server):
    # every RPC needs only the read role, so a role too low cannot be shown with calibserve's two roles; a key
    # of the admin role (above read) is accepted
    admin = triton_grpc.InferenceServerClient(server.grpc_target)
    answer = grpc_infer(admin, logits_of(1).astype(np.float32), "FP32", headers={"x-api-key": ADMIN})
    assert answer.as_numpy("probabilities").shape == (1, CLASSES)


@pytest.mark.parametrize(
    ("model", "version", "expected"),
    [
        ("no-such-model", "", "StatusCode.NOT_FOUND"),
        (MODEL, "99", "StatusCode.NOT_FOUND"),
        (MODEL, "one", "StatusCode.INVALID_ARGUMENT"),
        ("../etc", "", "StatusCode.INVALID_ARGUMENT"),
    ],
)
def test_unknown_models_and_versions(client, model, version, expected):
    array = logits_of(1).astype(np.float32)
    assert status_of(lambda: grpc_infer(client, array, "FP32", model=model, version=version)) == expected
    assert status_of(lambda: client.get_model_metadata(model, model_version=version, headers=KEY)) == expected
    assert status_of(lambda: client.is_model_ready(model, model_version=version, headers=KEY)) == expected
    still_serving(client)


def _request(
    array: np.ndarray, datatype: str, *, name: str = "logits", shape=None, raw=None
) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name=name, datatype=datatype, shape=list(shape or array.shape))
    request.raw_input_contents.append(array.tobytes() if raw is None else raw)
    return request


def _typed(values: list[float], shape: list[int], datatype: str = "FP32") -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="logits", datatype=datatype, shape=shape)
    tensor.contents.fp32_contents.extend(values)
    return request


ONE = logits_of(2).astype(np.float32)


def _two_raw() -> service_pb2.ModelInferRequest:
    request = _request(ONE, "FP32")
    request.raw_input_contents.append(b"\0" * 8)
    return request


def _raw_and_typed() -> service_pb2.ModelInferRequest:
    request = _request(ONE, "FP32")
    request.inputs[0].contents.fp32_contents.extend([0.0] * ONE.size)
    return request


def _unknown_output() -> service_pb2.ModelInferRequest:
    request = _request(ONE, "FP32")
    request.outputs.add(name="secrets")
    return request


def _nan() -> service_pb2.ModelInferRequest:
    values = ONE.copy()
    values[1, 3] = np.nan
    return _request(values, "FP32")


HOSTILE = {
    "int32 datatype": lambda: _request(ONE.astype(np.int32), "INT32"),
    "bytes datatype": lambda: _request(ONE, "BYTES"),
    "unknown datatype": lambda: _request(ONE, "FP8"),
    "shape larger than the bytes": lambda: _request(ONE, "FP32", shape=[4, CLASSES]),
    "shape smaller than the bytes": lambda: _request(ONE, "FP32", shape=[1, CLASSES]),
    "odd byte count": lambda: _request(ONE, "FP32", raw=ONE.tobytes()[:-1]),
    "negative shape": lambda: _request(ONE, "FP32", shape=[-2, -CLASSES]),
    "one-dimensional logits": lambda: _request(ONE, "FP32", shape=[2 * CLASSES]),
    "wrong class count": lambda: _request(ONE, "FP32", shape=[4, CLASSES // 2]),
    "typed count lie": lambda: _typed([0.5] * 7, [2, CLASSES]),
    "fp16 in typed contents": lambda: _typed([0.5] * 20, [2, CLASSES], "FP16"),
    "typed and raw": _raw_and_typed,
    "two raw contents for one input": _two_raw,
    "unknown input name": lambda: _request(ONE, "FP32", name="pixels"),
    "unknown output": _unknown_output,
    "not finite": _nan,
    "no inputs": lambda: service_pb2.ModelInferRequest(model_name=MODEL),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_requests_are_invalid_arguments(client, stub, case):
    request = HOSTILE[case]()
    assert (
        code_of(lambda: stub.ModelInfer(request, metadata=tuple(KEY.items())))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    still_serving(client)


def test_oversized_messages_are_resource_exhausted(client, stub):
    rows = MAX_BODY // (CLASSES * 4) + 1
    request = _request(logits_of(rows).astype(np.float32), "FP32")
    assert code_of(lambda: stub.ModelInfer(request, metadata=tuple(KEY.items()))) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    still_serving(client)


def test_unimplemented_rpcs(stub, client):
    call = lambda: stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(), metadata=tuple(KEY.items()))  # noqa: E731
    assert code_of(call) == grpc.StatusCode.UNIMPLEMENTED
    still_serving(client)


# ------------------------------------------------------------------------------------------ several workers


def listening_inodes(port: int) -> set[str]:
    """Inodes of the sockets listening on ``port`` (state 0A); grpc binds 127.0.0.1 as an IPv6 socket on
    ::ffff:127.0.0.1, so /proc/net/tcp6 is read too."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    return inodes


def socket_inodes(pid: int) -> set[str]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                found.add(target[len("socket:[") : -1])
    return found


def test_every_worker_serves_the_grpc_port(tmp_path):
    """Each worker listens on the gRPC port itself (SO_REUSEPORT): a socket of its own, checked in /proc."""
    with Server(tmp_path / "store", workers=2, grpc=True) as running:
        workers = wait_for_workers(running, 2)
        wait_until(
            lambda: len(listening_inodes(running.grpc_port)) == 2, "both workers listen on the gRPC port"
        )
        listeners = listening_inodes(running.grpc_port)
        held = [socket_inodes(pid) & listeners for pid in workers]
        assert all(len(mine) == 1 for mine in held) and held[0] != held[1], held
        for _ in range(4):  # new channels, each a new connection that either worker may take
            client = triton_grpc.InferenceServerClient(running.grpc_target)
            assert client.is_server_ready()
            client.close()
        # SO_REUSEPORT would let a second calibserve join the port and split the calls between two stores: the
        # supervisor holds the port's claim, so a second one refuses to start, naming it
        command = [sys.executable, "-m", "service", "serve", "--port", str(free_port())]
        command += ["--grpc-port", str(running.grpc_port), "--store-dir", str(tmp_path / "other")]
        second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
        assert second.returncode != 0 and str(running.grpc_port) in second.stderr, second.stderr[-2000:]
        assert running.stop() == 0  # SIGTERM: the workers' gRPC servers stop with them


# ------------------------------------------------------------------------------------------------ streaming


def test_stream_infer_answers_each_request_and_survives_a_bad_one(server, client):
    """ModelStreamInfer (tritonclient's start_stream): answers in order, the HTTP route's probabilities, and a
    bad request in the stream is its own error while the next is answered."""
    answers: queue.Queue = queue.Queue()
    stream = triton_grpc.InferenceServerClient(server.grpc_target)
    stream.start_stream(callback=lambda result, error: answers.put((result, error)), headers=KEY)
    try:
        arrays = [logits_of(3, seed=seed).astype(np.float32) for seed in range(3)]
        for index, array in enumerate(arrays):
            model = "no-such-model" if index == 1 else MODEL
            tensor = triton_grpc.InferInput("logits", list(array.shape), "FP32")
            tensor.set_data_from_numpy(array)
            stream.async_stream_infer(model, [tensor], request_id=f"s{index}")
        got = [answers.get(timeout=60) for _ in arrays]
    finally:
        stream.stop_stream()
        stream.close()
    (first, error0), (_, error1), (third, error2) = got
    assert error0 is None and error2 is None
    assert error1 is not None and "no-such-model" in str(error1)
    for result, array in ((first, arrays[0]), (third, arrays[2])):
        expected = http_infer(server, array, "FP32").as_numpy("probabilities")
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=0, atol=1e-6)
    assert [first.get_response().id, third.get_response().id] == ["s0", "s2"]
    still_serving(client)


def test_stream_infer_needs_a_key(server, client):
    answers: queue.Queue = queue.Queue()
    stream = triton_grpc.InferenceServerClient(server.grpc_target)
    stream.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        array = logits_of(1).astype(np.float32)
        tensor = triton_grpc.InferInput("logits", list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        # the stream ends when it opens without a key: the request may find it ended already
        with contextlib.suppress(InferenceServerException):
            stream.async_stream_infer(MODEL, [tensor])
        result, error = answers.get(timeout=60)
    finally:
        stream.stop_stream()
        stream.close()
    assert result is None and "UNAUTHENTICATED" in str(error.status())
    still_serving(client)


def test_conformal_prediction_sets_over_grpc(server, client):
    """A version fitted with conformal sets answers them over gRPC as over HTTP: a [N, K] UINT8 output by
    default, ``alpha`` in the parameters; a seed parameter makes randomised sets reproducible."""
    http = server.client(headers={"X-API-Key": ADMIN})
    name = "grpc-sets"
    assert http.put(f"/v1/models/{name}", json={"num_classes": CLASSES}).status_code in (200, 201)
    rng = np.random.default_rng(23)
    logits = rng.normal(size=(400, CLASSES)) * 3
    labels = (logits + rng.gumbel(size=logits.shape)).argmax(axis=1)
    body = {
        "logits": logits.tolist(),
        "labels": labels.tolist(),
        "conformal": {"score": "aps", "randomized": True},
    }
    assert http.post(f"/v1/models/{name}/fit", json=body).status_code == 201
    array = logits_of(16).astype(np.float32)
    tensor = triton_grpc.InferInput("logits", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    answer = client.infer(name, [tensor], headers=KEY, parameters={"seed": 5})
    sets = answer.as_numpy("prediction_sets")
    assert sets.dtype == np.uint8 and sets.shape == (16, CLASSES)
    assert answer.get_response(as_json=True)["parameters"]["alpha"]["double_param"] == 0.1
    over_http = http.post(f"/v1/models/{name}/calibrate", json={"logits": array.tolist(), "seed": 5}).json()
    assert [np.flatnonzero(row).tolist() for row in sets] == over_http["prediction_sets"]
