"""Running blocking work off the event loop, the same way under every protocol."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from service.core import cancellation
from service.core.cancellation import Budget
from service.errors import WorkCancelled, WorkTimeout
from service.serving.telemetry import WORK_STOPPED

T = TypeVar("T")

# How long past its deadline a computation that does not check its budget is waited for before the
# caller gets its answer (the thread itself runs to its end: a thread cannot be stopped from outside).
GRACE_S = 1.0

# Below this many numbers a calibration is cheaper than handing it to a thread.
INLINE_WORK_LIMIT = 65_536


async def in_thread(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``function(*args, **kwargs)`` in the worker's thread pool."""
    return await anyio.to_thread.run_sync(functools.partial(function, *args, **kwargs))


async def compute(function: Callable[..., T], *args: Any, size: int, **kwargs: Any) -> T:
    """Small work inline (a thread hop costs more than it), larger work in the thread pool."""
    if size <= INLINE_WORK_LIMIT:
        return function(*args, **kwargs)
    return await in_thread(function, *args, **kwargs)


async def bounded(budget: Budget, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``function(*args, **kwargs)`` in the thread pool under ``budget``: its loops stop at the deadline or on
    :meth:`Budget.cancel` (WorkTimeout / WorkCancelled), and the caller is answered by the deadline
    (plus :data:`GRACE_S`) even if the function does not check its budget."""

    def run() -> T:
        with cancellation.scope(budget):
            try:
                return function(*args, **kwargs)
            except WorkTimeout:
                WORK_STOPPED.labels("timeout").inc()
                raise
            except WorkCancelled:
                WORK_STOPPED.labels("cancelled").inc()
                raise

    if budget.seconds is None:
        return await anyio.to_thread.run_sync(run)
    try:
        with anyio.fail_after(budget.seconds + GRACE_S):
            return await anyio.to_thread.run_sync(run, abandon_on_cancel=True)
    except TimeoutError:
        budget.cancel("its time limit passed")
        raise WorkTimeout(
            f"the work took longer than its limit of {budget.seconds:g} s (CALIBSERVE_MAX_WORK_SECONDS)"
        ) from None


async def wait_for(future: Future, timeout: float) -> Any:
    """The result of a ``concurrent.futures`` future computed elsewhere (a model's own threads), awaited
    on the event loop, so that no thread of the pool waits with it; TimeoutError after ``timeout``
    seconds, or when its owner cancelled it (the future is left to its owner, which says what a late or
    dropped answer means)."""
    try:
        return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout)
    except asyncio.CancelledError:
        if future.cancelled():  # dropped by its owner; this task itself was not cancelled
            raise TimeoutError from None
        raise
