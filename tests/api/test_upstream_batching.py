"""Requests for one upstream model share a call while another is in flight (service/serving/upstream_batching.py).

The upstream here is a coroutine that records each call it gets and answers ``2 x`` (and ``x`` summed per row)
after yielding to the event loop, as an HTTP call would; the proxy's path with a real Triton is in
tests/api/test_upstream_proxy.py."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.errors import UpstreamRejected, UpstreamTimeout
from service.serving.upstream_batching import UpstreamBatcher


class Upstream:
    """Answers ``{"double": 2 x, "total": x summed per row}`` with a version; fails as told."""

    def __init__(self, *, reject_rows_over: int | None = None, fail: Exception | None = None, flat=False):
        self.calls: list[int] = []
        self.reject_rows_over = reject_rows_over
        self.fail = fail
        self.flat = flat

    async def send(self, inputs):
        ((_name, x),) = inputs
        self.calls.append(x.shape[0])
        await asyncio.sleep(0.01)
        if self.fail is not None:
            raise self.fail
        if (x < 0).any():
            raise UpstreamRejected(f"negative input in {x.shape[0]} rows", upstream_status=400)
        if self.reject_rows_over is not None and x.shape[0] > self.reject_rows_over:
            raise UpstreamRejected("batch too large", upstream_status=400)
        total = x.sum(axis=1)
        return "v7", {"double": 2 * x, "total": total.reshape(1, -1) if self.flat else total}


def run_all(batcher, upstream, parts, *, max_rows=64, key="m"):
    async def main():
        return await asyncio.gather(
            *(batcher.infer(key, [("x", part)], max_rows=max_rows, send=upstream.send) for part in parts),
            return_exceptions=True,
        )

    return asyncio.run(main())


def parts_of(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.uniform(0, 1, size=(size, 3)) for size in sizes]


def test_a_lone_request_goes_at_once_and_gets_its_own_answer():
    upstream = Upstream()
    (part,) = parts_of([4])
    ((version, outputs),) = run_all(UpstreamBatcher(), upstream, [part])
    assert upstream.calls == [4]
    assert version == "v7"
    np.testing.assert_array_equal(outputs["double"], 2 * part)


def test_requests_that_arrive_while_one_is_in_flight_share_the_next_call():
    upstream = Upstream()
    parts = parts_of([1, 2, 3, 4, 5])
    answers = run_all(UpstreamBatcher(), upstream, parts)
    # the first goes alone; the four that queued meanwhile go together
    assert upstream.calls == [1, 14]
    for part, (version, outputs) in zip(parts, answers, strict=True):
        assert version == "v7"
        np.testing.assert_array_equal(outputs["double"], 2 * part)
        np.testing.assert_array_equal(outputs["total"], part.sum(axis=1))


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 20), min_size=1, max_size=30),
    max_rows=st.integers(1, 40),
    in_flight=st.integers(1, 3),
)
def test_every_request_gets_exactly_its_rows_and_no_call_exceeds_max_rows(sizes, max_rows, in_flight):
    upstream = Upstream()
    parts = parts_of(sizes)
    answers = run_all(UpstreamBatcher(max_in_flight=in_flight), upstream, parts, max_rows=max_rows)
    for part, (_, outputs) in zip(parts, answers, strict=True):
        np.testing.assert_array_equal(outputs["double"], 2 * part)
    assert sum(upstream.calls) == sum(sizes)
    # a call holds one request larger than max_rows alone, else at most max_rows rows
    assert all(rows <= max(max_rows, max(sizes)) for rows in upstream.calls)
    assert len(upstream.calls) <= len(sizes)


def test_a_merged_call_the_upstream_rejects_is_made_again_request_by_request():
    upstream = Upstream()
    parts = parts_of([1, 2, 2, 2])
    parts[2] = -parts[2]  # the upstream rejects this one
    answers = run_all(UpstreamBatcher(), upstream, parts)
    assert upstream.calls[:2] == [1, 6]  # alone, then the three queued together: rejected
    assert sorted(upstream.calls[2:]) == [2, 2, 2]  # each of the three again, alone
    assert isinstance(answers[2], UpstreamRejected) and "negative input in 2 rows" in str(answers[2])
    for index in (0, 1, 3):
        np.testing.assert_array_equal(answers[index][1]["double"], 2 * parts[index])


def test_an_answer_that_is_not_a_batch_of_the_rows_is_made_again_request_by_request():
    upstream = Upstream(flat=True)  # "total" comes back as one row: right for one request only
    parts = parts_of([1, 1, 1])
    answers = run_all(UpstreamBatcher(), upstream, parts)
    assert upstream.calls == [1, 2, 1, 1]
    for part, (_, outputs) in zip(parts, answers, strict=True):
        np.testing.assert_array_equal(outputs["total"], part.sum(axis=1).reshape(1, -1))


def test_a_fault_of_a_merged_call_reaches_every_request_of_it():
    upstream = Upstream(fail=UpstreamTimeout("upstream did not answer"))
    answers = run_all(UpstreamBatcher(), upstream, parts_of([1, 1, 1]))
    assert upstream.calls == [1, 2]  # not made again: a timeout is not one request's fault
    assert all(isinstance(answer, UpstreamTimeout) for answer in answers)


def test_requests_of_other_keys_never_share_a_call():
    upstream = Upstream()
    batcher = UpstreamBatcher()
    parts = parts_of([1, 1, 1, 1])

    async def main():
        return await asyncio.gather(
            *(
                batcher.infer(f"model-{index % 2}", [("x", part)], max_rows=64, send=upstream.send)
                for index, part in enumerate(parts)
            )
        )

    answers = asyncio.run(main())
    assert sorted(upstream.calls) == [1, 1, 1, 1]
    for part, (_, outputs) in zip(parts, answers, strict=True):
        np.testing.assert_array_equal(outputs["double"], 2 * part)


def test_a_request_whose_client_went_away_is_left_out_of_the_next_call():
    upstream = Upstream()
    batcher = UpstreamBatcher()
    parts = parts_of([1, 2, 3])

    async def main():
        tasks = [
            asyncio.ensure_future(batcher.infer("m", [("x", part)], max_rows=64, send=upstream.send))
            for part in parts
        ]
        await asyncio.sleep(0)
        tasks[1].cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    answers = asyncio.run(main())
    assert upstream.calls == [1, 3]
    assert isinstance(answers[1], asyncio.CancelledError)
    np.testing.assert_array_equal(answers[2][1]["double"], 2 * parts[2])


def test_a_full_batch_goes_at_once_beside_the_call_in_flight():
    """Requests as large as max_rows cannot share a call: none waits for another's."""
    upstream = Upstream()
    batcher = UpstreamBatcher()
    parts = parts_of([4, 4, 4, 2, 2])
    in_flight = []

    async def send(inputs):
        in_flight.append(1)
        peak = len(in_flight)
        try:
            return await upstream.send(inputs)
        finally:
            in_flight.pop()
            peaks.append(peak)

    peaks: list[int] = []

    async def main():
        return await asyncio.gather(*(batcher.infer("m", [("x", p)], max_rows=4, send=send) for p in parts))

    answers = asyncio.run(main())
    # the three full requests each went at once; the two halves queued behind them share a call
    assert upstream.calls == [4, 4, 4, 4]
    assert max(peaks) >= 3
    for part, (_, outputs) in zip(parts, answers, strict=True):
        np.testing.assert_array_equal(outputs["double"], 2 * part)


def test_max_in_flight_must_be_positive():
    with pytest.raises(ValueError, match="max_in_flight"):
        UpstreamBatcher(max_in_flight=0)
