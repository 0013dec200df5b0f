"""Concurrent inference requests for one upstream model share one upstream call.

Behind the proxy every request costs an HTTP exchange more than calling the inference server directly, and on
the server an exchange costs far more than a row: a Triton model of 10 logits spent 0.40 ms of CPU per
request behind the proxy at concurrency 64, nearly all of it per exchange, not per row. So while a call for a
model is in flight, the requests that arrive for it wait in a queue; when the call returns, everything queued
goes up as one call of at most ``max_rows`` rows (the model's ``max_batch_size``), and each request gets its
own rows of the answer. A lone caller never waits: with nothing in flight, its request goes at once (unlike
:mod:`service.serving.batching`, which holds the first request for a delay; an upstream server with a dynamic
batcher of its own, as Triton has, gathers what arrives together anyway). Nor does a full batch: once the
queued requests hold ``max_rows`` rows, they go at once, beside the call in flight (64 requests of 64 rows
each, at most 64 a call, would otherwise go up one at a time).

Requests are grouped by a key that says one call can serve them all (the caller builds it: the upstream, the
model, the inputs' names, datatypes and shapes past the batch dimension, the outputs asked for). A merged call
the upstream rejects (4xx), or whose outputs are not batches of the merged rows, is made again request by
request, so that one request the model cannot take fails alone, with the upstream's own message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.errors import UpstreamFailed, UpstreamRejected
from service.serving.telemetry import UPSTREAM_BATCH_REQUESTS, UPSTREAM_BATCH_ROWS

Named = list[tuple[str, np.ndarray]]
"""Tensors by name, in order; the first dimension of each is the batch."""

Answer = tuple[Any, dict[str, np.ndarray]]
"""What an upstream call answers: something every request of the call shares (the model version), and the
outputs by name, a row per input row."""

Send = Callable[[Named], Awaitable[Answer]]
"""One upstream call: the inputs of a batch to its :data:`Answer`."""


class NotABatch(UpstreamFailed):
    """A merged call's answer has an output whose first dimension is not the merged rows."""


@dataclass(slots=True)
class _Queued:
    inputs: Named
    rows: int
    answer: asyncio.Future


@dataclass(slots=True)
class _Group:
    queue: list[_Queued] = field(default_factory=list)
    queued_rows: int = 0
    in_flight: int = 0


class UpstreamBatcher:
    """Merges :meth:`infer` calls of the same key that arrive while one of theirs is in flight.

    Parameters
    ----------
    max_in_flight : int
        Calls of one key that may be in flight at once; a request that arrives while fewer are goes at once.
    """

    def __init__(self, *, max_in_flight: int = 1) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.max_in_flight = max_in_flight
        self._groups: dict[Hashable, _Group] = {}

    async def infer(self, key: Hashable, inputs: Named, *, max_rows: int, send: Send) -> Answer:
        """The outputs of ``send`` for ``inputs`` alone, computed in one call with the other requests of
        ``key`` that queued meanwhile (``send`` of the first request of a call is the one used)."""
        rows = inputs[0][1].shape[0]
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group()
        if group.in_flight < self.max_in_flight and not group.queue:
            # nothing to share a call with: this request's call is made here, without a task of its own
            group.in_flight += 1
            UPSTREAM_BATCH_REQUESTS.observe(1)
            UPSTREAM_BATCH_ROWS.observe(rows)
            try:
                return await send(inputs)
            finally:
                group.in_flight -= 1
                self._start(key, group, max_rows, send)
        queued = _Queued(inputs, rows, asyncio.get_running_loop().create_future())
        group.queue.append(queued)
        group.queued_rows += rows
        # a full batch goes at once: waiting for the call in flight would only add its latency
        if group.in_flight < self.max_in_flight or group.queued_rows >= max_rows:
            self._start(key, group, max_rows, send)
        return await queued.answer

    def _start(self, key: Hashable, group: _Group, max_rows: int, send: Send) -> None:
        batch, rows = [], 0
        while group.queue and (not batch or rows + group.queue[0].rows <= max_rows):
            item = group.queue.pop(0)
            group.queued_rows -= item.rows
            if item.answer.done():  # its client went away while it queued
                continue
            batch.append(item)
            rows += item.rows
        if not batch:
            if group.in_flight == 0 and not group.queue:
                self._groups.pop(key, None)
            return
        group.in_flight += 1
        task = asyncio.get_running_loop().create_task(self._run(key, group, batch, max_rows, send))
        _running.add(task)  # the event loop holds tasks only weakly
        task.add_done_callback(_running.discard)

    async def _run(
        self, key: Hashable, group: _Group, batch: list[_Queued], max_rows: int, send: Send
    ) -> None:
        UPSTREAM_BATCH_REQUESTS.observe(len(batch))
        UPSTREAM_BATCH_ROWS.observe(sum(item.rows for item in batch))
        try:
            if len(batch) == 1:
                answers = [await _settle(send, batch[0].inputs)]
            else:
                answers = await _together(send, batch)
        except BaseException as exc:  # cancelled at shutdown: nobody may wait forever
            answers = [exc] * len(batch)
        for item, answer in zip(batch, answers, strict=True):
            if item.answer.done():
                continue
            if isinstance(answer, BaseException):
                item.answer.set_exception(answer)
            else:
                item.answer.set_result(answer)
        group.in_flight -= 1
        self._start(key, group, max_rows, send)


_running: set[asyncio.Task] = set()


async def _settle(send: Send, inputs: Named) -> Answer | BaseException:
    try:
        return await send(inputs)
    except Exception as exc:
        return exc


async def _together(send: Send, batch: Sequence[_Queued]) -> list[Answer | BaseException]:
    """One call for the whole batch, split back by rows; each request alone where the merged call was
    rejected (4xx) or its answer is not a batch."""
    names = [name for name, _ in batch[0].inputs]
    merged = [
        (name, np.concatenate([item.inputs[index][1] for item in batch])) for index, name in enumerate(names)
    ]
    rows = [item.rows for item in batch]
    try:
        shared, outputs = await send(merged)
        return [(shared, part) for part in _split(outputs, rows)]
    except (UpstreamRejected, NotABatch):
        return list(await asyncio.gather(*(_settle(send, item.inputs) for item in batch)))
    except Exception as exc:
        return [exc] * len(batch)


def _split(outputs: dict[str, np.ndarray], rows: list[int]) -> list[dict[str, np.ndarray]]:
    total = sum(rows)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise NotABatch(
                f"output {name!r} of shape {list(array.shape)} is not a batch of the {total} rows sent"
            )
    bounds = np.cumsum(rows)[:-1]
    pieces = {name: np.split(array, bounds) for name, array in outputs.items()}
    return [{name: pieces[name][index] for name in outputs} for index in range(len(rows))]
