"""Background tasks of an API worker: started in ``before_server_start``, stopped in
``after_server_stop``, one way for all of them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)


def every(
    period_s: float, step: Callable[[], Awaitable[object]], *, name: str
) -> asyncio.Task[None]:
    """Runs ``step`` every ``period_s`` on the running loop. A failing step is logged and the loop
    goes on: a dependency that is down is reported by the request path and ``/health/ready``."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                await step()
            except Exception as exc:
                log.debug("background step failed", extra={"task": name, "error": repr(exc)[:300]})

    return asyncio.get_running_loop().create_task(loop(), name=name)


async def cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancels a task and waits until it has ended."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
