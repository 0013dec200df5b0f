"""The Triton harness (tests/helpers/triton.py, tests/triton/serve.py) against the real server: each test model
answers what serve.py's docstring promises, through the real client, and a stopped server leaves nothing behind.

The model checks share the session's ``triton`` server; the lifecycle checks start a small one of their own
(``linear`` only: a few seconds) so that stopping it does not disturb the session's.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient  # a dev dependency: the real client
from tritonclient.utils import InferenceServerException

from tests.helpers.numerics import EPS64, assert_float32_close
from tests.helpers.requirements import REQUIRE_ALL, require_or_skip
from tests.helpers.triton import (
    MAX_BATCH,
    MODELS,
    TRITON_PYTHON_ENV,
    TritonServer,
    TritonStartError,
    binary_logits,
    linear_logits,
    start_triton,
    triton_unavailable_reason,
    weights,
)
from tests.helpers.waiting import wait_until

# float32 x @ W + b sums 5 terms: a few ulps of the largest term's magnitude; a wrong row or model is far off
ULPS = 8
X = np.random.default_rng(7).normal(scale=3.0, size=(6, 4)).astype(np.float32)


def client_for(server: TritonServer) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}", network_timeout=30.0)


def infer(
    server: TritonServer, model: str, binary: bool = True, **inputs: np.ndarray
) -> dict[str, np.ndarray]:
    """One request through tritonclient.http: every output, decoded."""
    tensors = []
    for name, array in inputs.items():
        datatype = {"float32": "FP32", "float64": "FP64", "int64": "INT64"}[array.dtype.name]
        tensor = httpclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        tensors.append(tensor)
    client = client_for(server)
    try:
        result = client.infer(model, tensors)
    finally:
        client.close()
    return {output["name"]: result.as_numpy(output["name"]) for output in result.get_response()["outputs"]}


def term_scale(x: np.ndarray) -> np.ndarray:
    """The magnitude the terms of x @ W + b were summed at, per element."""
    return np.abs(x.astype(np.float64)) @ np.abs(weights()["W"]) + np.abs(weights()["b"])


# ------------------------------------------------------------------------------------------------- the models


def test_every_model_is_served_with_its_batch_limit(triton):
    assert triton.models == (*MODELS, "lookup")
    client = client_for(triton)
    try:
        for model in triton.models:
            assert client.is_model_ready(model), model
            assert client.get_model_config(model)["max_batch_size"] == MAX_BATCH[model], model
    finally:
        client.close()
    assert triton.url == f"http://127.0.0.1:{triton.http_port}"
    assert len({triton.http_port, triton.grpc_port, triton.metrics_port}) == 3


def test_linear_is_x_W_plus_b_with_its_row_sums(triton):
    np.testing.assert_array_equal(triton.W, (np.arange(12).reshape(4, 3) - 5.5) / 4)
    np.testing.assert_array_equal(triton.b, [0.1, -0.2, 0.3])
    for binary in (True, False):
        out = infer(triton, "linear", binary=binary, x=X)
        assert out["logits"].dtype == np.float32 and out["logits"].shape == (6, 3)
        assert_float32_close(out["logits"], linear_logits(X), ulps=ULPS, scale=term_scale(X))
        assert out["norm"].dtype == np.float32 and out["norm"].shape == (6, 1)
        assert_float32_close(
            out["norm"], X.sum(axis=1, keepdims=True), ulps=ULPS, scale=np.abs(X).sum(1)[:, None]
        )


def test_linear16_and_linear64_return_their_dtypes(triton):
    half = infer(triton, "linear16", x=X)["logits"]
    assert half.dtype == np.float16 and half.shape == (6, 3)
    np.testing.assert_allclose(half, linear_logits(X), rtol=2 * float(np.finfo(np.float16).eps), atol=1e-3)
    x64 = X.astype(np.float64)
    double = infer(triton, "linear64", x=x64)["logits"]
    assert double.dtype == np.float64
    assert (np.abs(double - linear_logits(x64)) <= 16 * EPS64 * term_scale(x64)).all()


def test_binary_has_one_logit_column(triton):
    for binary in (True, False):
        out = infer(triton, "binary", binary=binary, x=X)
        assert out["logits"].shape == (6, 1)
        scale = np.abs(X.astype(np.float64)) @ np.abs(triton.w)
        assert_float32_close(out["logits"], binary_logits(X), ulps=ULPS, scale=scale[:, None])


def test_lookup_returns_the_stored_rows(triton, cifar10):
    np.testing.assert_array_equal(triton.lookup, cifar10["logits_test"])
    rows = np.array([0, 17, len(triton.lookup) - 1, 17], dtype=np.int64)
    out = infer(triton, "lookup", index=rows[:, None])
    np.testing.assert_array_equal(out["logits"], triton.lookup[rows])
    full = infer(triton, "lookup", index=np.arange(MAX_BATCH["lookup"], dtype=np.int64)[:, None])
    np.testing.assert_array_equal(full["logits"], triton.lookup[: MAX_BATCH["lookup"]])


def test_multi_concatenates_its_two_inputs(triton):
    out = infer(triton, "multi", a=X[:, :2].copy(), b=X[:, 2:].copy())
    assert_float32_close(out["logits"], linear_logits(X), ulps=ULPS, scale=term_scale(X))
    assert out["extra"].dtype == np.int32
    np.testing.assert_array_equal(out["extra"][:, 0], out["logits"].argmax(axis=1))


def test_wrong_returns_five_columns_and_says_so(triton):
    out = infer(triton, "wrong", x=X)
    assert out["logits"].shape == (6, 5)
    assert_float32_close(out["logits"][:, :3], linear_logits(X), ulps=ULPS, scale=term_scale(X))
    np.testing.assert_array_equal(out["logits"][:, 3:], X[:, :2])
    client = client_for(triton)
    try:
        assert client.get_model_metadata("wrong")["outputs"][0]["shape"] == [-1, -1]
    finally:
        client.close()


def test_nan_returns_nan_in_one_logit_column(triton):
    logits = infer(triton, "nan", x=X)["logits"]
    assert np.isnan(logits[:, 1]).all()
    assert_float32_close(
        logits[:, [0, 2]], linear_logits(X)[:, [0, 2]], ulps=ULPS, scale=term_scale(X)[:, [0, 2]]
    )


def test_more_rows_than_the_batch_limit_are_refused(triton):
    with pytest.raises(InferenceServerException, match="batch"):
        infer(triton, "linear", x=np.zeros((MAX_BATCH["linear"] + 1, 4), np.float32))


def test_slow_sleeps_then_answers(triton):
    began = time.monotonic()
    out = infer(triton, "slow", x=X[:2])
    assert time.monotonic() - began >= triton.slow_seconds
    assert_float32_close(out["logits"], linear_logits(X[:2]), ulps=ULPS, scale=term_scale(X[:2]))


# ---------------------------------------------------------------------------------------------- the lifecycle


def tritonserver_pids() -> set[int]:
    """Live tritonserver processes (a killed one that its parent has not reaped yet is not one)."""
    listed = subprocess.run(["pgrep", "-x", "tritonserver"], capture_output=True, text=True)
    return {int(pid) for pid in listed.stdout.split() if _alive(int(pid))}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def small():
    """A server of its own with ``linear`` only, to stop and start."""
    reason = triton_unavailable_reason()
    if reason is not None:
        require_or_skip(reason)
    try:
        server = start_triton(models=("linear",))
    except TritonStartError as error:
        require_or_skip(str(error))
    with server:
        yield server


def test_stop_leaves_nothing_and_start_comes_back_on_the_same_port(small):
    assert small.models == ("linear",) and small.lookup is None
    before = tritonserver_pids()
    ours = before & set(_group(small))
    assert len(ours) == 1, "one tritonserver in the server's process group"
    port = small.http_port

    small.stop()  # graceful: unload, stop Triton, then the group is killed
    assert small.last_stop_seconds < 10
    assert small.leftovers() == []
    # SIGKILL is delivered at once but a loaded machine may take a moment to tear the process down
    wait_until(lambda: not ours & tritonserver_pids(), "the stopped tritonserver is gone", timeout=30)
    with pytest.raises(ConnectionRefusedError):
        infer(small, "linear", x=X)  # the upstream is gone

    small.start()  # back at the same address
    assert small.http_port == port and small.is_ready()
    assert_float32_close(
        infer(small, "linear", x=X)["logits"], linear_logits(X), ulps=ULPS, scale=term_scale(X)
    )

    small.kill()  # a crash: no unloading, nothing left behind either
    assert small.last_stop_seconds < 5
    assert small.leftovers() == []
    small.start()
    assert small.is_ready()


def _group(server: TritonServer) -> list[int]:
    listed = subprocess.run(["pgrep", "-g", str(server.process.pid)], capture_output=True, text=True)
    return [int(pid) for pid in listed.stdout.split()]


def test_a_failed_start_raises_with_the_log():
    if triton_unavailable_reason() is not None:
        require_or_skip(triton_unavailable_reason())
    server = TritonServer(models=("no-such-model",))
    try:
        with pytest.raises(TritonStartError, match="unknown"):
            server.start(timeout=60)
        assert server.leftovers() == []
    finally:
        server.close()


def test_a_missing_interpreter_is_a_reason(monkeypatch, tmp_path):
    monkeypatch.setenv(TRITON_PYTHON_ENV, str(tmp_path / "python"))
    assert str(tmp_path / "python") in triton_unavailable_reason()


# ------------------------------------------------------------------------------------------------ skip policy


def test_require_or_skip_skips_by_default(monkeypatch):
    monkeypatch.delenv(REQUIRE_ALL, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no widget"):
        require_or_skip("no widget")
    monkeypatch.setenv(REQUIRE_ALL, "0")
    with pytest.raises(pytest.skip.Exception):
        require_or_skip("no widget")


def test_require_or_skip_fails_when_everything_is_required(monkeypatch):
    monkeypatch.setenv(REQUIRE_ALL, "1")
    with pytest.raises(pytest.fail.Exception, match="no widget"):
        require_or_skip("no widget")
