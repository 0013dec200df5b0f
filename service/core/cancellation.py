"""Cooperative cancellation of long numerical work: a deadline and a stop flag that loops check.

A thread cannot be stopped from outside, so the core's long loops (bootstrap resamples, per-class fits,
optimiser iterations) call :func:`check` between steps; the caller runs the work under :func:`scope` with a
:class:`Budget` that it may :meth:`~Budget.cancel` (the client went away) and that expires at its deadline.
Outside any scope :func:`check` costs one context-variable lookup and does nothing.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from service.errors import WorkCancelled, WorkTimeout

__all__ = ["Budget", "check", "scope"]


class Budget:
    """The time a piece of work may take (``seconds``; None: unbounded), and a flag to stop it early."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.deadline = None if seconds is None else time.monotonic() + seconds
        self._cancelled = threading.Event()
        self.reason = ""

    def cancel(self, reason: str) -> None:
        self.reason = reason
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check(self) -> None:
        if self._cancelled.is_set():
            raise WorkCancelled(f"the work was stopped: {self.reason}")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise WorkTimeout(
                f"the work took longer than its limit of {self.seconds:g} s (CALIBSERVE_MAX_WORK_SECONDS); "
                "send fewer rows, fewer bootstrap resamples or a cheaper method"
            )


_current: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("calibserve_budget", default=None)


def check() -> None:
    """Raise WorkTimeout / WorkCancelled when the work running in this context must stop."""
    budget = _current.get()
    if budget is not None:
        budget.check()


@contextmanager
def scope(budget: Budget | None) -> Iterator[None]:
    """Run the ``with`` body under ``budget`` (in the thread that does the work)."""
    token = _current.set(budget)
    try:
        yield
    finally:
        _current.reset(token)
