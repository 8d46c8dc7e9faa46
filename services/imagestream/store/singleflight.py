"""Fetches under way, by chunk: the first caller claims a chunk and settles it, later callers wait on it.

Shared by the zonal cache's CoalescingStore (N nodes missing one chunk make one
regional fetch) and the node's NodeFetcher (foreground reads of one chunk, and
reads of a chunk its startup-profile batch is bringing).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from imagestream.digests import Digest
from imagestream.errors import Unavailable


class FetchAbandoned(Unavailable):
    """The caller that started a shared fetch went away before it finished; a waiter fetches for itself."""


class Flights:
    """Claimed chunks and the futures their waiters await."""

    def __init__(self) -> None:
        self._futures: dict[Digest, asyncio.Future[bytes]] = {}

    def __contains__(self, digest: Digest) -> bool:
        return digest in self._futures

    def __len__(self) -> int:
        return len(self._futures)

    def pending(self, digest: Digest) -> asyncio.Future[bytes] | None:
        """The future of a fetch of `digest` under way, if any."""
        return self._futures.get(digest)

    async def lead(self, digest: Digest, fetch: Callable[[], Awaitable[bytes]]) -> bytes:
        """Fetch `digest` for everyone who asks meanwhile; if this caller is cancelled, they get FetchAbandoned."""
        fut = self.claim(digest)
        try:
            data = await fetch()
        except BaseException as e:
            self.abandon(digest, fut, e if isinstance(e, Exception) else FetchAbandoned(f"fetch of {digest.short} abandoned"))
            raise
        self.land(digest, fut, data)
        return data

    @staticmethod
    async def follow(pending: asyncio.Future[bytes]) -> bytes | None:
        """The leader's chunk (or its error); None if the leader went away: then fetch for yourself."""
        try:
            return await asyncio.shield(pending)
        except FetchAbandoned:
            return None

    def claim(self, digest: Digest) -> asyncio.Future[bytes]:
        """Start a flight: the caller must `land` or `abandon` the future it gets."""
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._futures[digest] = fut
        return fut

    def land(self, digest: Digest, fut: asyncio.Future[bytes], data: bytes) -> None:
        """The fetch succeeded: waiters get `data`, and the next caller starts afresh."""
        if not fut.done():
            fut.set_result(data)
        self._forget(digest, fut)

    def abandon(self, digest: Digest, fut: asyncio.Future[bytes], error: Exception) -> None:
        """The fetch failed or its caller went away: waiters get `error` (a no-op once landed)."""
        if not fut.done():
            fut.set_exception(error)
            fut.exception()  # mark retrieved: nobody else may be waiting
        self._forget(digest, fut)

    def _forget(self, digest: Digest, fut: asyncio.Future[bytes]) -> None:
        if self._futures.get(digest) is fut:  # a later claim of the same chunk stays
            del self._futures[digest]
