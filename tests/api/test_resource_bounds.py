"""Size-like options and shapes have limits (issue #11): the requests that took a server down are refused
with 400/422 naming the limit, quickly, and the server stays healthy after each.

The limits are the core's named constants (``service.core.metrics``, ``service.core.calibrators.*``), so the
library, HTTP and the CLI refuse alike; their docstrings state the memory or time each bounds.
"""

from __future__ import annotations

import numpy as np
import pytest

from service import cli
from service.core.calibrators.affine import MATRIX_MAX_CLASSES
from service.core.calibrators.binning import HISTOGRAM_MAX_BINS, ONE_VS_REST_MAX_CLASSES
from service.core.calibrators.temperature import TEMPERATURE_MAX_ITER
from service.core.metrics import MAX_BOOTSTRAP_RESAMPLES, MAX_BOOTSTRAP_WORK, MAX_N_BINS
from service.core.validation import MAX_NUM_CLASSES
from tests.helpers.arrays import npz
from tests.helpers.problems import assert_problem

NPZ = {"content-type": "application/x-npz"}


def healthy(client) -> None:
    assert client.get("/healthz").status_code == 200
    served = client.post("/v1/metrics", json={"logits": [[2.0, 0.0], [0.0, 1.0]], "labels": [0, 1]})
    assert served.status_code == 200, served.text


def model(client, name: str, num_classes: int) -> None:
    assert client.put(f"/v1/models/{name}", json={"num_classes": num_classes}).status_code == 201


def test_histogram_of_a_billion_bins_is_refused(client):
    model(client, "fz", 3)
    response = client.post(
        "/v1/models/fz/fit",
        json={
            "logits": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]],
            "labels": [0, 1, 2, 0],
            "method": "histogram",
            "options": {"n_bins": 1_000_000_000},
        },
    )
    assert_problem(response, 422, f"at most {HISTOGRAM_MAX_BINS:,}", "n_bins")
    assert client.get("/v1/models/fz/calibrators").json()["items"] == []  # nothing stored
    healthy(client)


def test_an_uploaded_histogram_document_beyond_the_bin_limit_is_refused(client):
    model(client, "hist", 2)
    n = 1_000_000
    document = {
        "method": "histogram",
        "num_classes": 2,
        "params": {"n_bins": n, "binning": "width", "bin_edges": [[0.0, 1.0]], "bin_values": [[0.5]]},
    }
    assert_problem(
        client.post("/v1/models/hist/calibrators", json=document), 400, f"at most {HISTOGRAM_MAX_BINS:,}"
    )
    healthy(client)


def test_matrix_scaling_on_twenty_thousand_classes_is_refused_before_allocating(client):
    model(client, "wide", 20_000)
    rng = np.random.default_rng(0)
    response = client.post(
        "/v1/models/wide/fit?method=matrix",
        content=npz(logits=rng.normal(size=(4, 20_000)).astype(np.float32), labels=np.array([0, 1, 2, 3])),
        headers=NPZ,
    )
    assert_problem(response, 400, f"limited to {MATRIX_MAX_CLASSES:,} classes")
    healthy(client)


def test_isotonic_on_a_hundred_thousand_classes_is_refused(client):
    model(client, "iso", 100_000)
    response = client.post(
        "/v1/models/iso/fit?method=isotonic",
        content=npz(logits=np.zeros((10, 100_000), dtype=np.float32), labels=np.arange(10)),
        headers=NPZ,
    )
    assert_problem(response, 400, f"limited to {ONE_VS_REST_MAX_CLASSES:,} classes")
    healthy(client)


def test_a_model_beyond_the_class_limit_is_refused(client):
    response = client.put("/v1/models/huge", json={"num_classes": MAX_NUM_CLASSES + 1})
    assert_problem(response, 422, "num_classes")
    healthy(client)


def test_max_iter_beyond_its_limit_is_refused(client):
    model(client, "it", 2)
    response = client.post(
        "/v1/models/it/fit",
        json={"logits": [[0.0, 1.0], [1.0, 0.0]], "labels": [1, 0], "options": {"max_iter": 10**9}},
    )
    assert_problem(response, 422, f"at most {TEMPERATURE_MAX_ITER:,}")
    healthy(client)


def test_bootstrap_work_beyond_its_limit_is_refused(client):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3_600, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=3_600)
    response = client.post(
        "/v1/metrics?bootstrap=10000", content=npz(logits=logits, labels=labels), headers=NPZ
    )
    assert_problem(response, 400, f"above the limit of {MAX_BOOTSTRAP_WORK:,}", "3,600 rows")
    beyond = client.post(
        "/v1/metrics",
        json={
            "logits": logits[:10].tolist(),
            "labels": labels[:10].tolist(),
            "bootstrap": MAX_BOOTSTRAP_RESAMPLES + 1,
        },
    )
    assert_problem(beyond, 422, "bootstrap")
    healthy(client)


@pytest.mark.parametrize("path", ["/v1/metrics", "/v1/models/ev/evaluate"])
def test_ece_bins_beyond_their_limit_are_refused(client, path):
    model(client, "ev", 2)
    response = client.post(
        path, json={"logits": [[0.0, 1.0], [1.0, 0.0]], "labels": [1, 0], "n_bins": 100_000_000}
    )
    assert_problem(response, 422, "n_bins", f"{MAX_N_BINS}")
    healthy(client)


def test_cli_evaluate_refuses_a_hundred_million_bins(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "logits.npy", rng.normal(size=(50, 3)))
    np.save(tmp_path / "labels.npy", rng.integers(0, 3, size=50))
    evaluate = [
        "evaluate",
        "--logits",
        str(tmp_path / "logits.npy"),
        "--labels",
        str(tmp_path / "labels.npy"),
    ]
    for flag, value, limit in (
        ("--bins", "100000000", MAX_N_BINS),
        ("--bootstrap", "1000000", MAX_BOOTSTRAP_RESAMPLES),
    ):
        assert cli.main([*evaluate, flag, value]) == cli.EXIT_FAILED
        assert f"at most {limit:,}" in capsys.readouterr().err
