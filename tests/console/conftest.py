"""One real `calibserve serve` (auth on: an admin and a read key) and one headless Chromium for the console's
tests, both for the whole module: starting them is most of the time these tests take."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from tests.helpers import browser
from tests.helpers.console import ADMIN_KEY, HOSTILE, READ_KEY, Console
from tests.helpers.data import REPO
from tests.helpers.requirements import require_or_skip
from tests.helpers.servers import Server
from tests.helpers.waiting import wait_until


@pytest.fixture(scope="module")
def console(tmp_path_factory) -> Iterator[Console]:
    """The server, with a 10-class model ``cifar`` holding two versions (v1 temperature, v2 isotonic: active)
    and logged outcomes, and a model ``hostile`` whose class names and description are markup."""
    reason = browser.missing()
    if reason:
        require_or_skip(reason)
    tmp = tmp_path_factory.mktemp("console")
    arrays = np.load(REPO / "tests" / "data" / "netcal_lenet5_c10.npz")
    fit_logits, fit_labels = arrays["logits_val"][:2000], arrays["labels_val"][:2000]
    logits, labels = arrays["logits_test"][:1000], arrays["labels_test"][:1000]
    data = tmp / "lenet-test.npz"
    np.savez(data, logits=logits, labels=labels)
    logits_npy, labels_csv = tmp / "lenet-test-logits.npy", tmp / "lenet-test-labels.csv"
    np.save(logits_npy, logits.astype(np.float32))
    labels_csv.write_text("label\n" + "\n".join(str(int(label)) for label in labels) + "\n")
    bad = tmp / "bad-calibrator.json"
    bad.write_text('{"method": "no-such-method", "num_classes": 10}')
    env = {
        "CALIBSERVE_API_KEYS": f"{ADMIN_KEY}:admin,{READ_KEY}:read",
        "CALIBSERVE_PREDICTION_LOG_MODELS": "cifar",
    }
    with Server(tmp / "store", env=env) as server:
        setup = Console(server, data, bad, logits_npy, labels_csv, logits, labels, fit_logits, fit_labels)
        with setup.api() as api:
            names = [f"class {i}" for i in range(10)]
            assert (
                api.put("/v1/models/cifar", json={"num_classes": 10, "class_names": names}).status_code == 201
            )
            for method in ("temperature", "isotonic"):
                body = {"logits": fit_logits.tolist(), "labels": fit_labels.tolist(), "method": method}
                assert api.post("/v1/models/cifar/fit", json=body).status_code == 201
            outcomes = {
                "logits": arrays["logits_val"][2000:2600].tolist(),
                "labels": arrays["labels_val"][2000:2600].tolist(),
            }
            assert api.post("/v1/models/cifar/outcomes", json=outcomes).status_code == 200
            served = {"logits": arrays["logits_val"][2600:2800].tolist()}  # 200 logged predictions
            assert api.post("/v1/models/cifar/calibrate", json=served).status_code == 200
            wait_until(  # the prediction log is written in the background
                lambda: (
                    api.get("/v1/models/cifar/monitoring?window=1h").json()["label_free"]["predictions"]
                    == 200
                ),
                "the 200 logged predictions",
            )
            hostile = {
                "num_classes": 2,
                "class_names": [HOSTILE, "<script>alert(2)</script>"],
                "description": f"<b>bold</b>{HOSTILE}",
            }
            assert api.put("/v1/models/hostile", json=hostile).status_code == 201
        yield setup


@pytest.fixture(scope="module")
def chromium(console, tmp_path_factory) -> Iterator[object]:
    driver = browser.start_chromium(tmp_path_factory.mktemp("downloads"))
    try:
        yield driver
    finally:
        driver.quit()
