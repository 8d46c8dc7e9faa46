"""Background jobs of a service (scrub, gc): run every so often, report failures, never stop the service."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


def every(interval_s: float, job: Callable[[], Awaitable[object]], what: str) -> asyncio.Task | None:
    """Run `job` every `interval_s` seconds in the background (None, and nothing runs, if interval_s <= 0)."""
    if interval_s <= 0:
        return None

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a background job reports, it does not stop the service
                log.warning("background %s failed: %s", what, e)

    return asyncio.ensure_future(loop())
