"""Try an ordered list of upstreams, skipping one that is down for a while."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from imagestream.errors import CorruptChunk, NotFound, Unavailable

log = logging.getLogger(__name__)

U = TypeVar("U")
R = TypeVar("R")


class Failover(Generic[U]):
    """Calls go to the first upstream that answers.

    An upstream that is Unavailable is moved to the back for `cooldown_s`
    (still tried, last), so a dead zonal cache costs one failed call, not one
    per read. NotFound/CorruptChunk from one upstream also moves on to the
    next: another tier may still hold a good copy.
    """

    def __init__(self, upstreams: Sequence[U], cooldown_s: float = 5.0) -> None:
        if not upstreams:
            raise ValueError("Failover needs at least one upstream")
        self.upstreams = list(upstreams)
        self.cooldown_s = cooldown_s
        self._down_until: dict[int, float] = {}

    def _ordered(self) -> list[tuple[int, U]]:
        now = time.monotonic()
        up = [(i, u) for i, u in enumerate(self.upstreams) if self._down_until.get(i, 0.0) <= now]
        down = [(i, u) for i, u in enumerate(self.upstreams) if self._down_until.get(i, 0.0) > now]
        return up + down

    def ordered(self) -> list[U]:
        """The upstreams in the order to try them now."""
        return [u for _, u in self._ordered()]

    def mark_down(self, upstream: U) -> None:
        self._down_until[self.upstreams.index(upstream)] = time.monotonic() + self.cooldown_s

    async def call(self, what: str, fn: Callable[[U], Awaitable[R]]) -> R:
        errors: list[Exception] = []
        for i, upstream in self._ordered():
            try:
                result = await fn(upstream)
            except Unavailable as e:
                self._down_until[i] = time.monotonic() + self.cooldown_s
                log.warning("%s: upstream %s unavailable, trying the next: %s", what, getattr(upstream, "name", i), e)
                errors.append(e)
            except (NotFound, CorruptChunk) as e:
                errors.append(e)
            else:
                self._down_until.pop(i, None)
                return result
        if all(isinstance(e, NotFound) for e in errors):
            # Every tier says the same thing, each wrapping its own upstream's answer: the shortest is the one that
            # was found out first-hand (the region's "not published"), the others only repeat it.
            raise NotFound(f"{what}: {min((str(e) for e in errors), key=len)}")
        detail = "; ".join(str(e) for e in errors)
        if any(isinstance(e, (NotFound, CorruptChunk)) for e in errors):
            raise NotFound(f"{what}: {detail}")
        raise Unavailable(f"{what}: every upstream is unavailable: {detail}")
