"""Dynamic batching of /predict: the batcher itself, then a real server with it switched on."""

from __future__ import annotations

import asyncio
import re
import threading

import httpx
import numpy as np
import pytest
import torch

from service.core.probability import softmax
from service.errors import ModelFailed
from service.serving.batching import DynamicBatcher
from tests.helpers.data import DIGITS_LOGIT_ULPS, SHIPPED_MODELS
from tests.helpers.numerics import assert_softmax_close
from tests.helpers.servers import Server


class RecordingRun:
    """A row-wise function (2 x + row index within the call) that records the batch sizes it was given."""

    def __init__(self, fail_on: float | None = None) -> None:
        self.calls: list[int] = []
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, None]:
        with self.lock:
            self.calls.append(batch.shape[0])
        if self.fail_on is not None and (batch == self.fail_on).any():
            raise ModelFailed("model 'm' raised: cannot take this row")
        return batch * 2.0, None


def run_concurrently(batcher: DynamicBatcher, run: RecordingRun, parts: list[np.ndarray], key="m"):
    async def main():
        return await asyncio.gather(
            *(batcher.submit(key, part, run) for part in parts), return_exceptions=True
        )

    return asyncio.run(main())


def test_concurrent_requests_share_one_call_and_get_their_own_rows() -> None:
    batcher = DynamicBatcher(max_size=100, max_delay=0.05)
    run = RecordingRun()
    parts = [np.full((k + 1, 3), float(k)) for k in range(6)]  # 1 + 2 + ... + 6 = 21 rows

    answers = run_concurrently(batcher, run, parts)

    assert run.calls == [21]
    for part, (doubled, probabilities) in zip(parts, answers, strict=True):
        np.testing.assert_array_equal(doubled, part * 2.0)
        assert probabilities is None


def test_a_full_batch_runs_without_waiting_for_the_delay() -> None:
    batcher = DynamicBatcher(max_size=4, max_delay=30.0)  # the delay would time the test out
    run = RecordingRun()
    parts = [np.full((1, 2), float(k)) for k in range(8)]

    answers = run_concurrently(batcher, run, parts)

    assert run.calls == [4, 4]
    assert [a[0][0, 0] for a in answers] == [2.0 * k for k in range(8)]


def test_a_request_that_would_overflow_the_batch_starts_the_next_one() -> None:
    batcher = DynamicBatcher(max_size=5, max_delay=0.02)
    run = RecordingRun()
    parts = [np.zeros((3, 1)), np.ones((3, 1)), np.full((7, 1), 2.0)]

    answers = run_concurrently(batcher, run, parts)

    assert sorted(run.calls) == [3, 3, 7]  # 3 + 3 > 5; 7 >= max_size runs alone
    np.testing.assert_array_equal(answers[2][0], np.full((7, 1), 4.0))


def test_keys_are_never_mixed() -> None:
    batcher = DynamicBatcher(max_size=100, max_delay=0.02)
    run = RecordingRun()

    async def main():
        return await asyncio.gather(
            batcher.submit("a", np.zeros((2, 1)), run), batcher.submit("b", np.ones((3, 1)), run)
        )

    asyncio.run(main())
    assert sorted(run.calls) == [2, 3]


def test_one_bad_request_fails_alone() -> None:
    batcher = DynamicBatcher(max_size=100, max_delay=0.05)
    run = RecordingRun(fail_on=-1.0)
    parts = [np.zeros((2, 1)), np.full((1, 1), -1.0), np.ones((3, 1))]

    answers = run_concurrently(batcher, run, parts)

    assert run.calls[0] == 6 and sorted(run.calls[1:]) == [1, 2, 3]  # together, then each alone
    assert isinstance(answers[1], ModelFailed)
    np.testing.assert_array_equal(answers[0][0], np.zeros((2, 1)))
    np.testing.assert_array_equal(answers[2][0], np.full((3, 1), 2.0))


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_size"):
        DynamicBatcher(max_size=0, max_delay=0.01)


# -------------------------------------------------------------------------------------- real server


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


def test_server_batches_concurrent_predicts_and_answers_each_exactly(tmp_path, digits) -> None:
    inputs = digits["test"]["inputs"][:48].astype(np.float32)
    module = torch.jit.load(str(SHIPPED_MODELS / "digits-mlp" / "model.pt"), map_location="cpu")
    with torch.inference_mode():
        logits = module(torch.from_numpy(inputs)).numpy()
    expected = softmax(logits.astype(np.float64))

    server = Server(
        tmp_path / "store",
        # 48 rows = all 16 requests: a batch runs the moment the last one arrives; the longest delay allowed
        # (1 s) is only a fallback, so that a loaded machine that spreads the requests out still batches some
        # of them (with 100 ms, 16 requests more than 100 ms apart would each have run alone)
        env={
            "CALIBSERVE_BATCH_MAX_SIZE": "48",
            "CALIBSERVE_BATCH_MAX_DELAY_MS": "1000",
            "CALIBSERVE_DEVICE": "cpu",
        },
    )
    try:

        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as client:
                requests = [
                    client.post(
                        "/v1/models/digits-mlp/predict", json={"inputs": inputs[3 * i : 3 * i + 3].tolist()}
                    )
                    for i in range(16)
                ]
                return await asyncio.gather(*requests)

        responses = asyncio.run(main())
        for i, response in enumerate(responses):
            assert response.status_code == 200, response.text
            # each request's rows, whatever batch they ran in: a batch of another size may take another
            # float32 kernel, so the logits agree to float32 rounding (see DIGITS_LOGIT_ULPS), not bit for bit
            rows = slice(3 * i, 3 * i + 3)
            answer = response.json()["probabilities"]
            assert_softmax_close(answer, expected[rows], logits[rows], ulps=DIGITS_LOGIT_ULPS)
        metrics = httpx.get(server.url + "/metrics").text
    finally:
        server.stop()

    served = _metric(metrics, "calibserve_predict_batch_requests_sum")
    passes = _metric(metrics, "calibserve_predict_batch_requests_count")
    assert served == 16
    assert passes < 16  # some forward passes served several requests
    assert _metric(metrics, "calibserve_predict_batch_rows_sum") == 48
