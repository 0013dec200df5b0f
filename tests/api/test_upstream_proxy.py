"""calibserve in front of a real Triton Inference Server (tests/triton/serve.py, through the ``triton`` fixture):
a V2 client (tritonclient) calls calibserve as it would call Triton, and gets calibrated probabilities in the
same round trip; fits and evaluations run their inputs through Triton; faults of the upstream get their
documented status while calibserve keeps serving its other models."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading

import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http
from scipy.special import expit, softmax
from tritonclient.utils import InferenceServerException

from service import workflows
from service.core import conformal
from tests.helpers.data import REPO
from tests.helpers.servers import Server, free_port
from tests.helpers.triton import linear_logits, start_triton
from tests.helpers.waiting import wait_until

UPSTREAM_TIMEOUT_S = 1.5  # the slow model sleeps 3 s
BATCH = 100  # rows per upstream call of a fit: the lookup fit below takes several


@pytest.fixture(scope="module")
def proxy(triton, tmp_path_factory):
    """calibserve with Triton as its default upstream, and one upstream model declared in its models directory."""
    root = tmp_path_factory.mktemp("proxy")
    declared = root / "models" / "declared"
    declared.mkdir(parents=True)
    record = {"num_classes": 3, "upstream": {"url": triton.url, "model": "linear", "output": "logits"}}
    (declared / "model.json").write_text(json.dumps(record))
    env = {
        "CALIBSERVE_UPSTREAM": triton.url,
        "CALIBSERVE_UPSTREAM_TIMEOUT_S": str(UPSTREAM_TIMEOUT_S),
        "CALIBSERVE_UPSTREAM_BATCH_SIZE": str(BATCH),
    }
    server = Server(root / "store", models=root / "models", env=env)
    yield server
    server.stop()


def client_of(url: str) -> triton_http.InferenceServerClient:
    return triton_http.InferenceServerClient(url.removeprefix("http://"))


def infer(url, model, arrays, *, outputs=None, binary=False, datatype="FP32"):
    """tritonclient's infer of ``model`` at ``url`` with named inputs; outputs (names) in binary or JSON."""
    inputs = []
    for name, array in arrays.items():
        tensor = triton_http.InferInput(
            name, list(array.shape), datatype if array.dtype.kind == "f" else "INT64"
        )
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    requested = None
    if outputs is not None:
        requested = [triton_http.InferRequestedOutput(name, binary_data=binary) for name in outputs]
    with client_of(url) as client:
        return client.infer(model, inputs, outputs=requested, request_id="r1")


def rows(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)


def labels_for(logits, temperature, seed=1):
    """Labels drawn from softmax(logits / temperature): a model over-confident by that temperature."""
    rng = np.random.default_rng(seed)
    p = softmax(np.asarray(logits, np.float64) / temperature, axis=1)
    return np.array([rng.choice(p.shape[1], p=row) for row in p])


def assert_close(actual, expected, rtol=1e-6, atol=1e-6):
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol=rtol, atol=atol
    )


# ------------------------------------------------------------------------------------- transparent proxy


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_a_name_only_triton_knows_passes_through_unchanged_until_calibrated(triton, proxy, binary):
    x = rows(5).astype(np.float64)
    direct = infer(triton.url, "linear64", {"x": x}, binary=binary, datatype="FP64")
    through = infer(proxy.url, "linear64", {"x": x}, binary=binary, datatype="FP64")
    assert [o["name"] for o in through.get_response()["outputs"]] == ["logits"]
    np.testing.assert_array_equal(through.as_numpy("logits"), direct.as_numpy("logits"))
    assert through.get_response()["id"] == "r1"


def test_a_temperature_fitted_through_the_proxy_calibrates_tritonclient_answers(triton, proxy):
    x = rows(600)
    with client_of(triton.url) as client:
        tensor = triton_http.InferInput("x", list(x[:64].shape), "FP32")
        logits = []
        for start in range(0, len(x), 64):  # Triton's logits, as the model's max_batch_size allows
            tensor = triton_http.InferInput("x", list(x[start : start + 64].shape), "FP32")
            tensor.set_data_from_numpy(x[start : start + 64])
            logits.append(client.infer("linear", [tensor]).as_numpy("logits"))
    logits = np.concatenate(logits)
    assert_close(logits, linear_logits(x), rtol=1e-5)
    labels = labels_for(logits, 2.5)

    with httpx.Client(base_url=proxy.url, timeout=60) as http:
        fitted = http.post("/v1/models/linear/fit", json={"inputs": x.tolist(), "labels": labels.tolist()})
        assert fitted.status_code == 201, fitted.text
        document = fitted.json()
    expected = workflows.fit_document(logits, labels, from_logits=True, method="temperature", model="linear")
    assert document["temperature"] == pytest.approx(expected["temperature"], rel=1e-9)
    assert 1.5 < document["temperature"] < 5.0  # labels drawn at T = 2.5; 600 of them
    temperature = document["temperature"]

    sample = rows(7, seed=5)
    want = softmax(linear_logits(sample).astype(np.float64) / temperature, axis=1)
    direct = infer(triton.url, "linear", {"x": sample})
    for binary in (False, True):
        answer = infer(
            proxy.url,
            "linear",
            {"x": sample},
            outputs=["probabilities", "predicted_class", "norm"],
            binary=binary,
        )
        assert_close(answer.as_numpy("probabilities"), want)
        np.testing.assert_array_equal(answer.as_numpy("predicted_class"), want.argmax(axis=1))
        np.testing.assert_array_equal(answer.as_numpy("norm"), direct.as_numpy("norm"))  # passed through
        response = answer.get_response()
        assert response["parameters"]["calibrator_version"] == 1
        assert response["model_version"] == "1"
        assert response["id"] == "r1"
        assert [o["name"] for o in response["outputs"]] == ["probabilities", "predicted_class", "norm"]
    # a pinned calibrator version answers the same (the version in the path is calibserve's, as everywhere)
    with client_of(proxy.url) as client:
        tensor = triton_http.InferInput("x", list(sample.shape), "FP32")
        tensor.set_data_from_numpy(sample, binary_data=True)
        pinned = client.infer("linear", [tensor], model_version="1")
        assert_close(pinned.as_numpy("probabilities"), want)
        with pytest.raises(InferenceServerException) as caught:
            client.infer("linear", [tensor], model_version="7")
        assert caught.value.status() == "404"
    # without outputs: probabilities and every other output of Triton (not the logits it replaced)
    plain = infer(proxy.url, "linear", {"x": sample})
    assert [o["name"] for o in plain.get_response()["outputs"]] == ["probabilities", "norm"]
    assert_close(plain.as_numpy("probabilities"), want)
    # the logits themselves when asked for by name
    asked = infer(proxy.url, "linear", {"x": sample}, outputs=["logits"], binary=True)
    np.testing.assert_array_equal(asked.as_numpy("logits"), direct.as_numpy("logits"))

    with httpx.Client(base_url=proxy.url, timeout=60) as http:  # v1 predict of the same model
        predicted = http.post("/v1/models/linear/predict", json={"inputs": sample.tolist()})
        assert predicted.status_code == 200, predicted.text
        assert_close(predicted.json()["probabilities"], want)


def _request_body(x, *, binary, outputs, request_id):
    """tritonclient's own body of an infer request (JSON or binary tensors), and its headers."""
    tensor = triton_http.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    requested = [triton_http.InferRequestedOutput(name, binary_data=binary) for name in outputs]
    body, header_length = triton_http.InferenceServerClient.generate_request_body(
        [tensor], outputs=requested, request_id=request_id
    )
    headers = {} if header_length is None else {"Inference-Header-Content-Length": str(header_length)}
    return body, headers


def _metric(text, name):
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_concurrent_requests_share_upstream_calls_and_each_gets_its_own_rows(triton, proxy):
    """48 requests at once (1 to 4 rows, JSON and binary, some asking for Triton's other output, one with
    NaN inputs): calls to Triton are shared, each answer holds the calibrated softmax of its own rows, and
    the one request whose logits are NaN fails alone."""
    with httpx.Client(base_url=proxy.url, timeout=60) as http:
        made = http.put("/v1/models/shared", json={"num_classes": 3, "upstream": {"model": "linear"}})
        assert made.status_code == 201, made.text
        x = rows(300, seed=11)
        labels = labels_for(linear_logits(x), 2.0)
        fitted = http.post("/v1/models/shared/fit", json={"inputs": x.tolist(), "labels": labels.tolist()})
        assert fitted.status_code == 201, fitted.text
        temperature = fitted.json()["temperature"]
        before = http.get("/metrics").text

    rng = np.random.default_rng(3)
    requests = []
    for index in range(48):
        sample = rows(int(rng.integers(1, 5)), seed=100 + index)
        if index == 17:
            sample[0, 0] = np.nan
        outputs = ["probabilities", "norm"] if index % 3 == 0 else ["probabilities"]
        requests.append((sample, index % 2 == 1, outputs, f"r{index}"))

    async def send_all():
        async with httpx.AsyncClient(base_url=proxy.url, timeout=60) as client:

            async def one(sample, binary, outputs, request_id):
                body, headers = _request_body(sample, binary=binary, outputs=outputs, request_id=request_id)
                return await client.post("/v2/models/shared/infer", content=body, headers=headers)

            return await asyncio.gather(*(one(*request) for request in requests))

    answers = asyncio.run(send_all())
    for (sample, binary, outputs, request_id), answer in zip(requests, answers, strict=True):
        if request_id == "r17":
            assert answer.status_code == 502, answer.text
            assert "NaN" in answer.json()["error"] and "shared" in answer.json()["error"]
            continue
        assert answer.status_code == 200, answer.text
        length = answer.headers.get("inference-header-content-length")
        result = triton_http.InferResult.from_response_body(
            answer.content, header_length=None if length is None else int(length)
        )
        response = result.get_response()
        assert response["id"] == request_id
        assert [o["name"] for o in response["outputs"]] == outputs
        assert all(("parameters" in o) == binary for o in response["outputs"])
        want = softmax(linear_logits(sample) / temperature, axis=1)
        assert_close(result.as_numpy("probabilities"), want)
        if "norm" in outputs:
            assert result.as_numpy("norm").shape == (len(sample), 1)
            assert_close(result.as_numpy("norm"), sample.sum(axis=1, keepdims=True), rtol=1e-5)

    with httpx.Client(base_url=proxy.url, timeout=60) as http:
        after = http.get("/metrics").text
    calls = _metric(after, "calibserve_upstream_batch_requests_count") - _metric(
        before, "calibserve_upstream_batch_requests_count"
    )
    served = _metric(after, "calibserve_upstream_batch_requests_sum") - _metric(
        before, "calibserve_upstream_batch_requests_sum"
    )
    # the requests of one shape (JSON or binary decode alike) share calls: fewer calls than requests
    assert served >= len(requests)
    assert 0 < calls < len(requests)


def test_fit_and_evaluate_from_real_data_run_the_inputs_through_triton_in_batches(
    triton, proxy, cifar10, tmp_path
):
    """The lookup model answers the stored CIFAR-10 logits of the row indices it is sent: fitting on indices
    through the proxy (CLI and HTTP) equals fitting on those logits, in several upstream calls."""
    logits = triton.lookup
    index = np.random.default_rng(3).choice(len(logits), size=450, replace=False)
    labels = cifar10["labels_test"][index]
    expected = workflows.fit_document(
        logits[index], labels, from_logits=True, method="temperature", model="x"
    )

    np.save(tmp_path / "index.npy", index.reshape(-1, 1).astype(np.int64))
    np.save(tmp_path / "labels.npy", labels)
    command = [sys.executable, "-m", "service", "fit", "--server", proxy.url, "--model", "lookup"]
    command += ["--inputs", str(tmp_path / "index.npy"), "--labels", str(tmp_path / "labels.npy")]
    command += ["--out", str(tmp_path / "fit.json")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    document = json.loads((tmp_path / "fit.json").read_text())
    assert document["temperature"] == pytest.approx(expected["temperature"], rel=1e-9)
    assert document["fit"]["n"] == len(index)

    with httpx.Client(base_url=proxy.url, timeout=60) as http:
        body = {"inputs": index.reshape(-1, 1).tolist(), "labels": labels.tolist()}
        report = http.post("/v1/models/lookup/evaluate", json=body)
        assert report.status_code == 200, report.text
    local = workflows.evaluate(
        logits[index], labels, from_logits=True, calibrator=workflows.load_calibrator(document)
    )
    assert report.json()["calibrated"]["ece"] == pytest.approx(local["calibrated"]["ece"], rel=1e-9)
    assert report.json()["uncalibrated"]["nll"] == pytest.approx(local["uncalibrated"]["nll"], rel=1e-9)


def test_a_multi_input_model_takes_named_inputs_and_passes_its_other_outputs_through(triton, proxy):
    a, b = rows(300)[:, :2], rows(300, seed=9)[:, :2]
    direct = []
    for start in range(0, 300, 64):
        direct.append(infer(triton.url, "multi", {"a": a[start : start + 64], "b": b[start : start + 64]}))
    logits = np.concatenate([answer.as_numpy("logits") for answer in direct])
    labels = labels_for(logits, 1.7)
    tensors = [
        {"name": "a", "datatype": "FP32", "shape": list(a.shape), "data": a.ravel().tolist()},
        {"name": "b", "datatype": "FP32", "shape": list(b.shape), "data": b.ravel().tolist()},
    ]
    with httpx.Client(base_url=proxy.url, timeout=60) as http:
        fitted = http.post(
            "/v1/models/multi/fit", json={"upstream_inputs": tensors, "labels": labels.tolist()}
        )
        assert fitted.status_code == 201, fitted.text
        single = http.post("/v1/models/multi/predict", json={"inputs": a.tolist()})
        assert single.status_code == 400
        assert "2 inputs" in single.json()["detail"]
    expected = workflows.fit_document(logits, labels, from_logits=True, method="temperature", model="multi")
    assert fitted.json()["temperature"] == pytest.approx(expected["temperature"], rel=1e-9)

    answer = infer(
        proxy.url, "multi", {"a": a[:5], "b": b[:5]}, outputs=["probabilities", "extra"], binary=True
    )
    assert_close(answer.as_numpy("probabilities"), softmax(logits[:5] / fitted.json()["temperature"], axis=1))
    np.testing.assert_array_equal(answer.as_numpy("extra"), direct[0].as_numpy("extra")[:5])


# ----------------------------------------------------------------------------------------- declared models


def test_declared_models_binary_and_fp64_logits(triton, proxy):
    with httpx.Client(base_url=proxy.url, timeout=30) as http:
        made = http.put(
            "/v1/models/coin", json={"num_classes": 2, "upstream": {"url": triton.url, "model": "binary"}}
        )
        assert made.status_code == 201, made.text
        assert made.json()["upstream"] == {"url": triton.url, "model": "binary"}
        wide = http.put("/v1/models/wide", json={"num_classes": 3, "upstream": {"model": "linear64"}})
        assert wide.status_code == 201, wide.text
    x = rows(6)
    coin = infer(proxy.url, "coin", {"x": x}, outputs=["probabilities"], binary=True)
    z = (x.astype(np.float32) @ triton.w.astype(np.float32)).astype(np.float64)
    assert_close(coin.as_numpy("probabilities"), np.column_stack([1 - expit(z), expit(z)]), rtol=1e-5)
    # a declared model with no calibrator is calibrated all the same: plain softmax, float64 for FP64 logits
    wide_answer = infer(proxy.url, "wide", {"x": x.astype(np.float64)}, datatype="FP64", binary=True)
    outputs = {o["name"]: o for o in wide_answer.get_response()["outputs"]}
    assert outputs["probabilities"]["datatype"] == "FP64"
    assert_close(
        wide_answer.as_numpy("probabilities"), softmax(linear_logits(x.astype(np.float64)), axis=1), rtol=1e-5
    )
    with httpx.Client(base_url=proxy.url, timeout=30) as http:
        half = http.put("/v1/models/half", json={"num_classes": 3, "upstream": {"model": "linear16"}})
        assert half.status_code == 201, half.text
    half_answer = infer(proxy.url, "half", {"x": x}, binary=True)
    outputs = {o["name"]: o for o in half_answer.get_response()["outputs"]}
    assert outputs["probabilities"]["datatype"] == "FP32"
    fp16 = linear_logits(x).astype(np.float16).astype(np.float64)
    assert_close(half_answer.as_numpy("probabilities"), softmax(fp16, axis=1), rtol=1e-5)
    declared = infer(proxy.url, "declared", {"x": x}, outputs=["probabilities"])
    assert_close(
        declared.as_numpy("probabilities"), softmax(linear_logits(x).astype(np.float64), axis=1), rtol=1e-5
    )


def test_metadata_merges_the_upstreams_and_readiness_reports_it(triton, proxy):
    with client_of(proxy.url) as client:
        metadata = client.get_model_metadata("declared")
        assert client.is_server_ready()
        assert client.is_model_ready("declared")
    with client_of(triton.url) as client:
        upstream = client.get_model_metadata("linear")
    assert metadata["platform"] == "calibserve_upstream"
    assert metadata["inputs"] == upstream["inputs"]
    names = [output["name"] for output in metadata["outputs"]]
    assert names == ["probabilities", "predicted_class", *(o["name"] for o in upstream["outputs"])]
    assert metadata["outputs"][0]["shape"] == [-1, 3]
    assert metadata["parameters"]["upstream"]["model"] == "linear"
    ready = httpx.get(proxy.url + "/readyz").json()
    assert ready["upstreams"][triton.url] == {"ready": True}


def test_bad_upstream_declarations_are_refused_naming_the_field(proxy):
    with httpx.Client(base_url=proxy.url, timeout=30) as http:
        for upstream, field in [
            ({"url": "ftp://host:1"}, "url"),
            ({"model": "a/b"}, "upstream.model"),
            ({"version": "one two"}, "upstream.version"),
            ({"outputs": "logits"}, "upstream"),
            ("http://x", "upstream"),
        ]:
            answer = http.put("/v1/models/bad", json={"num_classes": 3, "upstream": upstream})
            assert answer.status_code in (400, 422), answer.text
            assert answer.headers["content-type"] == "application/problem+json"
            assert any(error["field"] == field for error in answer.json()["errors"]), answer.json()
        assert http.get("/v1/models/bad").json()["upstream"] == {"model": "bad"}  # transparent, not declared


# ----------------------------------------------------------------------------------------------- faults


def test_wrong_logits_from_the_upstream_are_a_502_naming_the_model(triton, proxy):
    with httpx.Client(base_url=proxy.url, timeout=30) as http:
        for name, upstream, why in (("fives", "wrong", "5 logit columns"), ("nans", "nan", "NaN")):
            made = http.put(f"/v1/models/{name}", json={"num_classes": 3, "upstream": {"model": upstream}})
            assert made.status_code == 201
            with pytest.raises(InferenceServerException) as caught:
                infer(proxy.url, name, {"x": rows(2)})
            assert caught.value.status() == "502"
            assert name in caught.value.message() and upstream in caught.value.message()
            assert why in caught.value.message()
            v1 = http.post(f"/v1/models/{name}/predict", json={"inputs": rows(2).tolist()})
            assert v1.status_code == 502
            assert v1.headers["content-type"] == "application/problem+json"
            assert name in v1.json()["detail"]


def test_the_upstreams_own_4xx_passes_through_and_a_slow_upstream_is_a_504(triton, proxy):
    with pytest.raises(InferenceServerException) as caught:
        infer(proxy.url, "no_such_model", {"x": rows(1)})
    assert caught.value.status() == "404"
    assert "no_such_model" in caught.value.message()
    bad_shape = httpx.post(
        proxy.url + "/v2/models/declared/infer",
        json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]},
    )
    assert bad_shape.status_code == 400
    assert "linear" in bad_shape.json()["error"]
    v1 = httpx.post(proxy.url + "/v1/models/no_such_model/predict", json={"inputs": [[1, 2, 3, 4]]})
    assert v1.status_code == 404
    assert v1.headers["content-type"] == "application/problem+json"

    # The slow model sleeps longer than the upstream time limit: 504, and meanwhile the rest is served.
    slow: dict = {}

    def call_slow():
        slow["answer"] = httpx.post(
            proxy.url + "/v2/models/slow/infer",
            json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]},
            timeout=30,
        )

    thread = threading.Thread(target=call_slow)
    thread.start()
    served_meanwhile = 0
    while thread.is_alive() and served_meanwhile < 3:
        answer = infer(proxy.url, "declared", {"x": rows(2)}, outputs=["probabilities"])
        assert answer.as_numpy("probabilities").shape == (2, 3)
        served_meanwhile += 1
    still_waiting = thread.is_alive()
    thread.join(30)
    assert slow["answer"].status_code == 504, slow["answer"].text
    assert "time limit" in slow["answer"].json()["error"]
    assert served_meanwhile >= 1 and (still_waiting or served_meanwhile == 3)


def test_an_upstream_stopped_mid_test_is_a_503_and_calibserve_serves_the_rest(triton, proxy):
    second = start_triton(models=("linear",))
    try:
        with httpx.Client(base_url=proxy.url, timeout=30) as http:
            made = http.put(
                "/v1/models/stoppable",
                json={"num_classes": 3, "upstream": {"url": second.url, "model": "linear"}},
            )
            assert made.status_code == 201
            body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
            assert http.post("/v2/models/stoppable/infer", json=body).status_code == 200
            second.stop()
            down = http.post("/v2/models/stoppable/infer", json=body)
            assert down.status_code == 503
            assert down.headers["retry-after"] == "1"
            assert second.url in down.json()["error"]
            v1 = http.post("/v1/models/stoppable/predict", json={"inputs": [[1, 2, 3, 4]]})
            assert v1.status_code == 503 and v1.headers["content-type"] == "application/problem+json"
            ready = http.get("/v2/health/ready")
            assert ready.status_code == 503 and second.url in ready.json()["error"]
            assert http.get("/readyz").status_code == 503
            assert http.get("/healthz").status_code == 200  # live
            assert http.get("/v2/health/live").status_code == 200
            assert http.post("/v2/models/declared/infer", json=body).status_code == 200  # the other upstream
            second.start()
            wait_until(
                lambda: http.post("/v2/models/stoppable/infer", json=body).status_code == 200, "it answers"
            )
            wait_until(lambda: http.get("/v2/health/ready").status_code == 200, "calibserve is ready again")
    finally:
        second.close()


# ------------------------------------------------------------------------------------------------ KServe


def test_kserve_transformer_arguments_run_calibserve_in_front_of_the_predictor(triton, tmp_path):
    port = free_port()
    host = triton.url.removeprefix("http://")
    command = [sys.executable, "-m", "service", "serve", "--protocol", "v2", "--predictor_host", host]
    command += ["--http_port", str(port), "--model_name", "linear", "--store-dir", str(tmp_path / "store")]
    command += ["--models-dir", str(tmp_path / "none")]
    process = subprocess.Popen(command, cwd=REPO, start_new_session=True, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"

        def ready():
            try:
                return httpx.get(url + "/v2/health/ready").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, "the transformer is ready")
        answer = infer(url, "linear", {"x": rows(3)}, binary=True)
        np.testing.assert_array_equal(
            answer.as_numpy("logits"), infer(triton.url, "linear", {"x": rows(3)}).as_numpy("logits")
        )
    finally:
        process.terminate()
        process.wait(30)
    refused = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--protocol", "v1", "--predictor_host", host],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 2
    assert "v2" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_an_upstream_model_with_conformal_sets_answers_them(triton, proxy, cifar10):
    """A model served by Triton (the lookup of CIFAR-10 logits), fitted through the proxy with randomised APS
    sets: tritonclient gets ``prediction_sets`` (UINT8, [N, K]) beside the probabilities and ``alpha``, and a
    request ``parameters.seed`` (never forwarded to Triton) makes them reproducible."""
    index = np.arange(1000).reshape(-1, 1).astype(np.int64)
    with httpx.Client(base_url=proxy.url, timeout=60) as http:
        record = {"num_classes": 10, "upstream": {"url": triton.url, "model": "lookup"}}
        assert http.put("/v1/models/lookup-sets", json=record).status_code == 201
        body = {
            "inputs": index.tolist(),
            "labels": cifar10["labels_test"][:1000].tolist(),
            "conformal": {"score": "aps", "randomized": True, "alpha": 0.2},
        }
        fitted = http.post("/v1/models/lookup-sets/fit", json=body)
        assert fitted.status_code == 201, fitted.text
        request = {
            "inputs": [
                {"name": "index", "datatype": "INT64", "shape": [8, 1], "data": list(range(1000, 1008))}
            ],
            "parameters": {"seed": 11},
        }
        answers = [http.post("/v2/models/lookup-sets/infer", json=request).json() for _ in range(2)]
    outputs = {item["name"]: item for item in answers[0]["outputs"]}
    assert answers[0]["parameters"]["alpha"] == 0.2
    assert outputs["prediction_sets"]["datatype"] == "UINT8" and outputs["prediction_sets"]["shape"] == [
        8,
        10,
    ]
    assert answers[0]["outputs"] == answers[1]["outputs"]  # the same seed, the same sets
    calibrator = workflows.load_calibrator(fitted.json())
    probabilities = calibrator.transform(triton.lookup[1000:1008])  # float64, as the server computes them
    assert_close(np.asarray(outputs["probabilities"]["data"]).reshape(8, 10), probabilities)
    thresholds = workflows.load_conformal(fitted.json())
    expected = conformal.prediction_sets(probabilities, thresholds, rng=np.random.default_rng(11))
    np.testing.assert_array_equal(np.asarray(outputs["prediction_sets"]["data"]).reshape(8, 10), expected)
    binary = infer(proxy.url, "lookup-sets", {"index": index[:4]}, binary=True)
    assert binary.as_numpy("prediction_sets").shape == (4, 10)
