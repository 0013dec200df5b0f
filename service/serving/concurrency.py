"""Running blocking work off the event loop, the same way under every protocol."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import anyio.to_thread

T = TypeVar("T")

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
