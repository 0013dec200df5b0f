"""Uploaded TorchScript is untrusted (issue #11): refused operations, time-limited forward passes, start-up.

Every model here is a real TorchScript file made with ``torch.jit.script``; every server is the real app
(TestClient with its lifespan). The stalls are real too: TorchScript loops that run several times the
time limit (``CALIBSERVE_MODEL_TIMEOUT_S``, small here), then return by themselves, so that no test leaves a
thread spinning for long. No assertion is about how long anything took.
"""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from service.errors import InvalidInput
from service.registry import MODEL_THREADS, ModelRegistry, stalled_passes
from service.store import CalibratorStore
from tests.helpers.problems import assert_problem
from tests.helpers.waiting import wait_until

# Small, but not so small that a model's first forward pass (TorchScript profiles and optimises it then)
# could run past it on a loaded machine.
TIMEOUT_S = 1.0
# Iterations of `y = y + 1.0` in TorchScript: about 6 us each on these machines, so ~3.5 s, over three
# times TIMEOUT_S even on an idle machine (a loaded one only makes it longer).
STALL_ITERATIONS = 600_000
SHAPE = {"X-Model-Input-Shape": "4"}


# ------------------------------------------------------------------------------------------------ models


class Linear3(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class SavesToDisk(nn.Module):
    """Writes its input to a file at every forward pass (the issue's first model)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.save(x, self.path)
        return x[:, :3]


class ReadsHostFile(nn.Module):
    """Returns the bytes of a host file as logits (the issue's second model)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        data = torch.from_file(self.path, False, 3, dtype=torch.uint8)
        return data.float().reshape(1, 3).expand(x.shape[0], 3)


class WritesOnLoad(nn.Module):
    """A ``__setstate__``: TorchScript runs it while ``torch.jit.load`` unpickles the file."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :3]

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.path = state[0]
        self.training = state[1]
        torch.save(torch.zeros(1), state[0])


class Prints(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        print("forged log line")
        return x[:, :3]


class Forks(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        future = torch.jit.fork(torch.neg, x)
        return torch.jit.wait(future)[:, :3]


def _reseeds(x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(0)
    return x[:, :3]


class CallsAFunctionThatReseeds(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _reseeds(x)


@torch.jit.script
class _Context:
    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> None:
        torch.save(torch.zeros(1), self.path)

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        pass


class SavesInAContextManager(nn.Module):
    """The save hides in a class method the forward pass never calls by name (``with`` calls it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _Context("/nonexistent/x"):
            y = x * 2.0
        return y[:, :3]


class StallsOnInput(nn.Module):
    """Loops ``x[0, 0]`` times: instant on the smoke check's zeros, a stall on a large first input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x[:, :3]
        for _ in range(int(x[0, 0].item())):
            y = y + 1.0
        return y - y


class StallsAlways(nn.Module):
    """Loops STALL_ITERATIONS times on every input: its smoke check runs past the time limit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x[:, :3]
        for _ in range(600000):  # STALL_ITERATIONS
            y = y + 1.0
        return y - y


class Everyday(nn.Module):
    """What real models compile to: layers, no_grad, control flow, containers, a user class, a function."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 2, 3, padding=1)
        self.norm = nn.BatchNorm1d(2)
        self.rnn = nn.LSTM(4, 4, batch_first=True)
        self.attention = nn.TransformerEncoderLayer(4, 2, 8, batch_first=True)
        self.head = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Dropout(0.1), nn.Linear(8, 3))
        self.scale: dict[str, float] = {"a": 1.0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = self.norm(self.conv(x.unsqueeze(1))).mean(1)
        parts: list[torch.Tensor] = []
        for i in range(h.shape[0]):
            parts.append(h[i] * self.scale["a"])
        h = torch.stack(parts)
        h, _ = self.rnn(h.unsqueeze(1))
        h = self.attention(h).squeeze(1)
        if h.dim() != 2:
            raise RuntimeError("unexpected shape")
        return _Scaler(2.0).apply(self.head(h))


@torch.jit.script
class _Scaler:
    def __init__(self, factor: float) -> None:
        self.factor = factor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.factor


def scripted(module: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module.eval()), buffer)
    return buffer.getvalue()


def model_threads(name: str) -> int:
    return sum(thread.name == f"model-{name}" for thread in threading.enumerate())


def store_uploaded(store_dir: Path, name: str, data: bytes, input_shape: list[int] | None = None) -> Path:
    """An uploaded model written straight into a store on disk, as a previous server would have left it."""
    store = CalibratorStore(store_dir)
    record: dict[str, Any] = {"kind": "torchscript", "num_classes": 3}
    if input_shape is not None:
        record["input_shape"] = input_shape
    store.put_model(name, record)
    return store.put_torchscript(name, data)


@pytest.fixture(autouse=True)
def _no_stalled_pass_left_behind():
    """Each test waits for the stalls it caused to return: none spins on into the next test, and none is
    still in TorchScript when the interpreter exits."""
    yield
    wait_until(lambda: not stalled_passes(), "every stalled forward pass returned")


@pytest.fixture
def client(make_client):
    return make_client(model_timeout_s=TIMEOUT_S)


# ------------------------------------------------------------------------------------ refused operations


def test_a_model_that_saves_to_disk_is_refused_naming_aten_save_and_writes_nothing(client, tmp_path):
    target = tmp_path / "written-by-the-model"
    response = client.put(
        "/v1/models/saver/torchscript", content=scripted(SavesToDisk(str(target))), headers=SHAPE
    )
    assert_problem(response, 400, "aten::save", "saver")
    assert not target.exists()
    assert_problem(client.get("/v1/models/saver"), 404)
    assert not list((tmp_path / "store").glob("**/model.pt"))


def test_a_model_that_reads_a_host_file_is_refused_naming_aten_from_file(client, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"KEY")
    response = client.put("/v1/models/reader/torchscript", content=scripted(ReadsHostFile(str(secret))))
    assert_problem(response, 400, "aten::from_file")
    assert_problem(client.post("/v1/models/reader/predict", json={"inputs": [[0.0] * 4]}), 404)


def test_a_file_whose_loading_runs_code_is_refused_before_it_is_loaded(client, tmp_path):
    target = tmp_path / "written-on-load"
    data = scripted(WritesOnLoad(str(target)))
    assert not target.exists()
    assert_problem(client.put("/v1/models/onload/torchscript", content=data), 400, "__setstate__")
    assert not target.exists()


@pytest.mark.parametrize(
    ("module", "operation"),
    [
        (Prints(), "prim::Print"),
        (Forks(), "prim::fork"),
        (CallsAFunctionThatReseeds(), "aten::manual_seed"),
        (SavesInAContextManager(), "aten::save"),
    ],
    ids=["print", "fork", "function", "context-manager"],
)
def test_operations_outside_the_allow_list_are_named(module, operation):
    registry = ModelRegistry(None, device="cpu", timeout=TIMEOUT_S)
    with pytest.raises(InvalidInput, match=operation) as caught:
        registry.check_bytes("refused", scripted(module), {"input_shape": [4]})
    assert "pure tensor operations" in str(caught.value)
    assert registry.names() == []


def test_everyday_models_pass_the_vetting_and_serve(make_client):
    client = make_client(model_timeout_s=60.0)  # a first pass through an LSTM and attention is slow
    response = client.put("/v1/models/everyday/torchscript", content=scripted(Everyday()), headers=SHAPE)
    assert response.status_code == 200, response.text
    answer = client.post("/v1/models/everyday/predict", json={"inputs": [[0.1, 0.2, 0.3, 0.4]] * 2})
    assert answer.status_code == 200, answer.text
    traced = torch.jit.trace(Linear3().eval(), torch.zeros(1, 4))
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    assert client.put("/v1/models/traced/torchscript", content=buffer.getvalue()).status_code == 200


def test_shipped_models_are_trusted_and_not_vetted(make_client, models_dir):
    """The models directory is part of the image: a print in a shipped model is the operator's choice."""
    (models_dir / "chatty").mkdir()
    (models_dir / "chatty" / "model.pt").write_bytes(scripted(Prints()))
    client = make_client(model_timeout_s=TIMEOUT_S)
    assert "chatty" in client.get("/readyz").json()["models"]
    assert client.post("/v1/models/chatty/predict", json={"inputs": [[0.0] * 4]}).status_code == 200


def test_a_refused_file_already_in_the_store_is_not_run_at_start_up(make_client, tmp_path):
    """The issue's restart: a file stored before vetting existed is vetted when the server starts."""
    target = tmp_path / "written-at-start-up"
    store_uploaded(tmp_path / "store", "saver", scripted(SavesToDisk(str(target))), [4])
    client = make_client(model_timeout_s=TIMEOUT_S)
    ready = client.get("/readyz").json()
    assert "aten::save" in ready["failing_models"]["saver"]
    assert_problem(client.post("/v1/models/saver/predict", json={"inputs": [[0.0] * 4]}), 502, "aten::save")
    assert not target.exists()


# ----------------------------------------------------------------------------------------- time limits


def test_an_upload_whose_smoke_check_stalls_is_refused_naming_the_time_limit(client):
    response = client.put("/v1/models/slow/torchscript", content=scripted(StallsAlways()), headers=SHAPE)
    assert_problem(response, 400, "smoke check", f"within {TIMEOUT_S:g} s", "CALIBSERVE_MODEL_TIMEOUT_S")
    assert_problem(client.get("/v1/models/slow"), 404)
    assert client.post("/v1/models/digits-mlp/predict", json={"inputs": [[0.0] * 64]}).status_code == 200


def test_a_stalled_forward_pass_answers_504_marks_the_model_and_recovers_when_it_returns(client):
    assert (
        client.put(
            "/v1/models/stall/torchscript", content=scripted(StallsOnInput()), headers=SHAPE
        ).status_code
        == 200
    )
    stall = {"inputs": [[float(STALL_ITERATIONS), 0.0, 0.0, 0.0]]}
    quick = {"inputs": [[0.0, 0.0, 0.0, 0.0]]}
    assert_problem(
        client.post("/v1/models/stall/predict", json=stall), 504, "did not answer within", "stalled"
    )
    # while that pass runs on, the model takes no more work: answered at once, not queued behind it
    assert_problem(client.post("/v1/models/stall/predict", json=quick), 504, "stalled")
    assert "stalled" in client.get("/readyz").json()["failing_models"]["stall"]
    health = client.get("/healthz")
    assert health.status_code == 200
    assert health.json()["status"] == "degraded" and "stall" in health.json()["stalled_models"]
    # the other models serve meanwhile
    assert client.post("/v1/models/digits-mlp/predict", json={"inputs": [[0.0] * 64]}).status_code == 200
    assert model_threads("stall") <= MODEL_THREADS
    # the stalled pass returns by itself: the model serves again
    wait_until(lambda: client.get("/healthz").json() == {"status": "ok"}, "the stalled pass returned")
    assert client.post("/v1/models/stall/predict", json=quick).status_code == 200
    assert "stall" not in client.get("/readyz").json()["failing_models"]


def test_concurrent_predicts_on_a_stalling_model_use_its_threads_only(client):
    assert (
        client.put(
            "/v1/models/stall-45/torchscript", content=scripted(StallsOnInput()), headers=SHAPE
        ).status_code
        == 200
    )
    stall = {"inputs": [[float(STALL_ITERATIONS), 0.0, 0.0, 0.0]]}
    answers: list[int] = []

    def predict() -> None:
        answers.append(client.post("/v1/models/stall-45/predict", json=stall).status_code)

    threads = [threading.Thread(target=predict) for _ in range(45)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [504] * 45
    assert model_threads("stall-45") <= MODEL_THREADS
    # every other route answers, including those that need the worker's thread pool
    assert client.get("/readyz").status_code == 200
    assert client.get("/v1/models").status_code == 200
    fitted = client.post(
        "/v1/models/digits-mlp/fit", json={"logits": [[2.0, 0.0] + [0.0] * 8] * 4, "labels": [0, 1, 0, 0]}
    )
    assert fitted.status_code == 201, fitted.text
    wait_until(lambda: client.get("/healthz").json() == {"status": "ok"}, "the stalled passes returned")


# ------------------------------------------------------------------------------------------- start-up


def test_start_up_loads_uploaded_models_in_the_background(make_client, tmp_path):
    store_uploaded(tmp_path / "store", "a-slow", scripted(StallsAlways()), [4])
    store_uploaded(tmp_path / "store", "b-good", scripted(Linear3()), [4])
    client = make_client(model_timeout_s=TIMEOUT_S, wait_loaded=False)
    # the server is ready at once: shipped models serve while the uploads load
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert set(ready.json()["pending_models"]) == {"a-slow", "b-good"}
    assert client.post("/v1/models/digits-mlp/predict", json={"inputs": [[0.0] * 64]}).status_code == 200
    assert_problem(
        client.post("/v1/models/b-good/predict", json={"inputs": [[0.0] * 4]}), 503, "still loading"
    )
    # calibrating logits needs no forward pass: it serves while the model loads
    assert client.post("/v1/models/b-good/calibrate", json={"logits": [[1.0, 0.0, 0.0]]}).status_code == 200
    assert client.app.state.dataplane.state.wait_loaded(60)
    ready = client.get("/readyz").json()
    assert ready["pending_models"] == []
    assert "b-good" in ready["models"]
    assert f"within {TIMEOUT_S:g} s" in ready["failing_models"]["a-slow"]
    assert_problem(
        client.post("/v1/models/a-slow/predict", json={"inputs": [[0.0] * 4]}), 504, "failed to load"
    )
    assert client.post("/v1/models/b-good/predict", json={"inputs": [[0.0] * 4]}).status_code == 200


def test_a_stored_file_that_failed_to_load_is_not_tried_again_until_it_changes(make_client, tmp_path):
    path = store_uploaded(tmp_path / "store", "slow-stored", scripted(StallsAlways()), [4])
    client = make_client(model_timeout_s=TIMEOUT_S)
    assert "slow-stored" in client.get("/readyz").json()["failing_models"]
    for _ in range(3):  # each would otherwise run (and stall) the smoke check again, on a thread of its own
        assert_problem(client.post("/v1/models/slow-stored/predict", json={"inputs": [[0.0] * 4]}), 504)
    assert model_threads("slow-stored") <= 1
    # a new file (as another worker's upload leaves it) is loaded
    path.write_bytes(scripted(Linear3()))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    answer = client.post("/v1/models/slow-stored/predict", json={"inputs": [[0.0] * 4]})
    assert answer.status_code == 200, answer.text
    np.testing.assert_equal(len(answer.json()["probabilities"][0]), 3)
