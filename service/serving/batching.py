"""Dynamic batching: concurrent ``/predict`` requests for one model share one forward pass.

On a GPU a forward pass of 64 rows costs about what one of a single row does, so a worker that gathers
the requests arriving within a short delay and runs them together serves many more of them (Triton's and
TorchServe's "dynamic batching"). Off by default (``CALIBSERVE_BATCH_MAX_SIZE=0``): on a CPU, and for a
lone caller, waiting only adds latency.

A batch is run when its rows reach ``max_size`` or its first request has waited ``max_delay`` seconds,
whichever comes first. Requests are grouped by a key (the model object and what runs after it), so only
batches that one call can serve are concatenated. When a batch of several requests fails, each request is
run again on its own, so that one request the model cannot take fails alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.serving.concurrency import in_thread
from service.serving.telemetry import BATCH_REQUESTS, BATCH_ROWS

Run = Callable[[np.ndarray], tuple[np.ndarray, ...]]
"""A synchronous function from a batch to arrays with one row per batch row (``None`` entries pass)."""


@dataclass
class _Queue:
    run: Run
    parts: list[np.ndarray] = field(default_factory=list)
    waiters: list[asyncio.Future] = field(default_factory=list)
    rows: int = 0
    timer: asyncio.TimerHandle | None = None


class DynamicBatcher:
    """Gathers :meth:`submit` calls per key into batches of at most ``max_size`` rows.

    Parameters
    ----------
    max_size : int
        Rows at which a batch runs at once. A request of this many rows or more runs alone, unbatched.
    max_delay : float
        Seconds the first request of a batch waits for others.
    """

    def __init__(self, *, max_size: int, max_delay: float) -> None:
        if max_size < 1 or max_delay < 0:
            raise ValueError(f"max_size must be >= 1 and max_delay >= 0, got {max_size} and {max_delay}")
        self.max_size = max_size
        self.max_delay = max_delay
        self._queues: dict[Hashable, _Queue] = {}

    async def submit(self, key: Hashable, batch: np.ndarray, run: Run) -> tuple[Any, ...]:
        """``run``'s answer for ``batch`` alone, computed together with other requests of the same key."""
        if batch.shape[0] >= self.max_size:
            return await in_thread(run, batch)
        queue = self._queues.get(key)
        if queue is not None and queue.rows + batch.shape[0] > self.max_size:
            self._flush(key)
            queue = None
        if queue is None:
            queue = self._queues[key] = _Queue(run)
            queue.timer = asyncio.get_running_loop().call_later(self.max_delay, self._flush, key)
        waiter: asyncio.Future = asyncio.get_running_loop().create_future()
        queue.parts.append(batch)
        queue.waiters.append(waiter)
        queue.rows += batch.shape[0]
        if queue.rows >= self.max_size:
            self._flush(key)
        return await waiter

    def _flush(self, key: Hashable) -> None:
        queue = self._queues.pop(key, None)
        if queue is None:
            return
        if queue.timer is not None:
            queue.timer.cancel()
        # Keep a reference: the event loop holds tasks only weakly.
        task = asyncio.get_running_loop().create_task(self._run(queue))
        _running.add(task)
        task.add_done_callback(_running.discard)

    async def _run(self, queue: _Queue) -> None:
        BATCH_REQUESTS.observe(len(queue.parts))
        BATCH_ROWS.observe(queue.rows)
        try:
            if len(queue.parts) == 1:
                answers = [await _settle(queue.run, queue.parts[0])]
            else:
                answers = await in_thread(_run_together, queue.run, queue.parts)
        except BaseException as exc:  # cancelled at shutdown: nobody may wait forever
            answers = [exc] * len(queue.waiters)
        for waiter, answer in zip(queue.waiters, answers, strict=True):
            if waiter.done():  # the client went away
                continue
            if isinstance(answer, BaseException):
                waiter.set_exception(answer)
            else:
                waiter.set_result(answer)


_running: set[asyncio.Task] = set()


async def _settle(run: Run, batch: np.ndarray) -> tuple[Any, ...] | BaseException:
    return await in_thread(_run_alone, run, batch)


def _run_together(run: Run, parts: list[np.ndarray]) -> list[tuple[Any, ...] | BaseException]:
    """``run`` on the concatenated parts, split back; on failure each part alone."""
    try:
        outputs = run(np.concatenate(parts))
    except Exception:
        return [_run_alone(run, part) for part in parts]
    bounds = np.cumsum([part.shape[0] for part in parts])[:-1]
    pieces = [np.split(output, bounds) if output is not None else [None] * len(parts) for output in outputs]
    return [tuple(column) for column in zip(*pieces, strict=True)]


def _run_alone(run: Run, part: np.ndarray) -> tuple[Any, ...] | BaseException:
    try:
        return run(part)
    except Exception as exc:
        return exc
