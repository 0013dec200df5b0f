"""calibserve in front of a real Triton (pytriton, the ``triton`` fixture) reached over gRPC: an upstream model
declared with ``"url": "grpc://host:port"`` fits, evaluates and infers through Triton's gRPC port, for HTTP and
gRPC clients alike, and gets the answers of the same model reached over HTTP."""

from __future__ import annotations

import subprocess
import sys

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from scipy.special import softmax

from tests.helpers.data import REPO
from tests.helpers.servers import Server, free_port
from tests.helpers.triton import linear_logits
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def proxy(triton, tmp_path_factory):
    root = tmp_path_factory.mktemp("upstream-grpc")
    with Server(root / "store", models=root / "models", grpc=True) as server:
        http = server.client()
        for name, url in (("over-grpc", f"grpc://127.0.0.1:{triton.grpc_port}"), ("over-http", triton.url)):
            record = {"num_classes": 3, "upstream": {"url": url, "model": "linear", "output": "logits"}}
            assert http.put(f"/v1/models/{name}", json=record).status_code in (200, 201)
        yield server


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)


def http_infer(url: str, model: str, x: np.ndarray, outputs: list[str]) -> triton_http.InferResult:
    tensor = triton_http.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    requested = [triton_http.InferRequestedOutput(name, binary_data=True) for name in outputs]
    with triton_http.InferenceServerClient(url.removeprefix("http://")) as client:
        return client.infer(model, [tensor], outputs=requested)


def test_fit_and_infer_through_a_grpc_upstream(triton, proxy):
    x = rows(300)
    logits = linear_logits(x)
    rng = np.random.default_rng(1)
    probabilities = softmax(logits / 2.5, axis=1)
    labels = np.array([rng.choice(3, p=row) for row in probabilities])
    with httpx.Client(base_url=proxy.url, timeout=120) as http:
        temperatures = {}
        for name in ("over-grpc", "over-http"):  # the inputs go through Triton, batched to its max_batch_size
            fitted = http.post(
                f"/v1/models/{name}/fit", json={"inputs": x.tolist(), "labels": labels.tolist()}
            )
            assert fitted.status_code == 201, fitted.text
            temperatures[name] = fitted.json()["temperature"]
        assert temperatures["over-grpc"] == pytest.approx(temperatures["over-http"], rel=1e-9)

        metadata = http.get("/v2/models/over-grpc").json()
        assert [item["name"] for item in metadata["inputs"]] == ["x"]
        assert http.get("/v2/models/over-grpc/ready").json()["ready"] is True

    sample = rows(7, seed=5)
    outputs = ["probabilities", "predicted_class", "norm"]
    over_grpc = http_infer(proxy.url, "over-grpc", sample, outputs)
    over_http = http_infer(proxy.url, "over-http", sample, outputs)
    expected = softmax(linear_logits(sample) / temperatures["over-grpc"], axis=1)
    np.testing.assert_allclose(over_grpc.as_numpy("probabilities"), expected, rtol=0, atol=1e-6)
    for name in outputs:
        np.testing.assert_allclose(over_grpc.as_numpy(name), over_http.as_numpy(name), rtol=0, atol=1e-6)

    # a gRPC client of calibserve, whose upstream is Triton over gRPC: gRPC end to end
    client = triton_grpc.InferenceServerClient(proxy.grpc_target)
    tensor = triton_grpc.InferInput("x", list(sample.shape), "FP32")
    tensor.set_data_from_numpy(sample)
    answer = client.infer("over-grpc", [tensor])
    names = [output.name for output in answer.get_response().outputs]
    assert names == ["probabilities", "norm"]  # as Triton answers, the logits replaced by probabilities
    np.testing.assert_allclose(answer.as_numpy("probabilities"), expected, rtol=0, atol=1e-6)
    assert client.get_model_metadata("over-grpc", as_json=True)["platform"] == "calibserve_upstream"
    assert client.is_model_ready("over-grpc")


def test_faults_of_a_grpc_upstream(triton, proxy):
    with httpx.Client(base_url=proxy.url, timeout=60) as http:
        record = {
            "num_classes": 3,
            "upstream": {"url": f"grpc://127.0.0.1:{triton.grpc_port}", "model": "absent"},
        }
        assert http.put("/v1/models/absent-upstream", json=record).status_code in (200, 201)
        x = rows(2)
        tensor = {"name": "x", "datatype": "FP32", "shape": [2, 4], "data": x.reshape(-1).tolist()}
        answer = http.post("/v2/models/absent-upstream/infer", json={"inputs": [tensor]})
        assert answer.status_code in (400, 404, 502), answer.text  # Triton's refusal, named
        assert "absent" in answer.json()["error"]
        # logits that are not finite: never a probability
        record = {
            "num_classes": 3,
            "upstream": {"url": f"grpc://127.0.0.1:{triton.grpc_port}", "model": "nan"},
        }
        assert http.put("/v1/models/nan-upstream", json=record).status_code in (200, 201)
        answer = http.post("/v2/models/nan-upstream/infer", json={"inputs": [tensor]})
        assert answer.status_code == 502 and "nan-upstream" in answer.json()["error"], answer.text
        # nothing listens there: unavailable, and the other models keep being served
        record = {"num_classes": 3, "upstream": {"url": f"grpc://127.0.0.1:{free_port()}", "model": "linear"}}
        assert http.put("/v1/models/nowhere", json=record).status_code in (200, 201)
        answer = http.post("/v2/models/nowhere/infer", json={"inputs": [tensor]})
        assert answer.status_code == 503, answer.text
        over_grpc = http.post("/v2/models/over-grpc/infer", json={"inputs": [tensor]})
        assert over_grpc.status_code == 200, over_grpc.text
        bad = {"num_classes": 3, "upstream": {"url": "grpc://127.0.0.1:1/path", "model": "linear"}}
        refused = http.put("/v1/models/bad-upstream", json=bad)
        assert refused.status_code in (400, 422) and "path" in refused.text
        assert http.get("/v2/health/live").status_code == 200


def test_a_grpc_default_upstream_passes_unknown_names_through(triton, tmp_path):
    """``--upstream grpc://...``: a name only Triton knows goes through unchanged until it has a calibrator."""
    env = {"CALIBSERVE_UPSTREAM": f"grpc://127.0.0.1:{triton.grpc_port}"}
    with Server(tmp_path / "store", models=tmp_path / "models", env=env, grpc=True) as server:
        x = rows(5).astype(np.float64)
        for binary in (False, True):
            tensor = triton_http.InferInput("x", list(x.shape), "FP64")
            tensor.set_data_from_numpy(x, binary_data=binary)
            with triton_http.InferenceServerClient(server.url.removeprefix("http://")) as client:
                through = client.infer("linear64", [tensor], request_id="r1")
            with triton_http.InferenceServerClient(triton.url.removeprefix("http://")) as client:
                direct = client.infer("linear64", [tensor])
            assert [output["name"] for output in through.get_response()["outputs"]] == ["logits"]
            # not bit-equal: Triton's own x @ W + b may differ in the last bit between two calls (batching)
            np.testing.assert_allclose(through.as_numpy("logits"), direct.as_numpy("logits"), rtol=1e-12)
            assert through.get_response()["id"] == "r1"
        assert httpx.get(server.url + "/v2/health/ready").status_code == 200
        # and a gRPC client of calibserve, for a name only Triton knows: Triton's answer, as gRPC
        tensor = triton_grpc.InferInput("x", list(x.shape), "FP64")
        tensor.set_data_from_numpy(x)
        through = triton_grpc.InferenceServerClient(server.grpc_target).infer("linear64", [tensor])
        assert [output.name for output in through.get_response().outputs] == ["logits"]
        np.testing.assert_allclose(through.as_numpy("logits"), linear_logits(x), rtol=1e-6)


def test_kserve_grpc_v2_reaches_the_predictor_over_grpc(triton, tmp_path):
    """KServe's transformer arguments with ``--protocol grpc-v2``: the predictor host is a gRPC server."""
    port = free_port()
    command = [sys.executable, "-m", "service", "serve", "--protocol", "grpc-v2"]
    command += ["--predictor_host", f"127.0.0.1:{triton.grpc_port}", "--http_port", str(port)]
    command += ["--store-dir", str(tmp_path / "store"), "--models-dir", str(tmp_path / "none")]
    process = subprocess.Popen(command, cwd=REPO, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return httpx.get(url + "/v2/health/ready").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, "the transformer is ready")
        x = rows(3)
        answer = http_infer(url, "linear", x, ["logits"])
        np.testing.assert_allclose(answer.as_numpy("logits"), linear_logits(x), rtol=1e-5)
    finally:
        process.terminate()
        process.wait(30)
