"""Small pieces shared by the v1 routers."""

from __future__ import annotations

import numpy as np
from starlette.concurrency import run_in_threadpool

from service.api.bodies import array
from service.api.state import AppState
from service.errors import InvalidInput

# Below this many numbers a calibration is cheaper than handing it to a thread.
INLINE_WORK_LIMIT = 65_536


def one_of(body, names: tuple[str, ...]) -> tuple[str, np.ndarray]:
    """Exactly one of the named array fields, as (name, array)."""
    given = [name for name in names if getattr(body, name, None) is not None]
    if len(given) != 1:
        raise InvalidInput(
            f"send exactly one of {', '.join(names)}; got {len(given) or 'none'}", field="body"
        )
    return given[0], array(getattr(body, given[0]), given[0])


async def model_logits(state: AppState, name: str, kind: str, values: np.ndarray) -> tuple[np.ndarray, bool]:
    """Scores for a fit or evaluation: logits/probabilities as sent, or inputs run through the model."""
    if kind != "inputs":
        return values, kind == "logits"
    state.sync_uploaded_model(name)
    logits = await run_in_threadpool(state.registry.predict, name, values)
    return logits, True


async def compute(function, *args, size: int, **kwargs):
    if size <= INLINE_WORK_LIMIT:
        return function(*args, **kwargs)
    return await run_in_threadpool(function, *args, **kwargs)
