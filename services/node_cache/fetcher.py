"""The node's way upstream, shared by what an application waits for and what is downloaded behind it.

Foreground gets (a FUSE read that missed the node) always go first:
* they never wait for a background batch: background transfers use channels of
  their own, and a new background batch starts only while no foreground fetch
  is under way (`ForegroundGate`);
* while an application is starting, the background stays out of the way
  altogether: batches beyond the startup profile wait until the foreground has
  been quiet for a moment (`wait_quiet`), because an import storm is a chain of
  short misses with gaps between them, and a batch started in a gap would sit
  on the regional link in front of the next miss; reads the node serves itself
  count as foreground too (the node cache's `ApplicationReads`): a start whose
  profile is already local would otherwise share the CPU with the download;
* a foreground get never joins a background batch, even one that holds the
  same chunk: the batch may be queued behind the bandwidth cap; the chunk is
  fetched again, at once (a duplicate transfer is the price of priority) --
  except a batch of the startup profile, which is the application's own
  reads fetched ahead, under no cap: a read of one of its chunks waits for
  it (for `join_timeout_s` at most) instead of fetching it a second time;
* concurrent foreground gets of one chunk are one upstream fetch.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Sequence

from imagestream.digests import Digest
from imagestream.errors import FailedPrecondition, ImagestreamError, Unavailable
from imagestream.store.base import ChunkStore
from imagestream.store.singleflight import Flights


class ForegroundGate:
    """Counts foreground fetches in flight; background work waits until there are none."""

    def __init__(self) -> None:
        self.active = 0
        self.last_busy = -float("inf")  # monotonic time a foreground fetch last started or ended
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.active += 1
        self.last_busy = time.monotonic()
        self._idle.clear()

    def leave(self) -> None:
        self.active -= 1
        self.last_busy = time.monotonic()
        if self.active == 0:
            self._idle.set()

    def touch(self) -> None:
        """Count as foreground activity now (a mount starting: its reads are about to come)."""
        self.last_busy = time.monotonic()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def wait_quiet(self, quiet_s: float, patience_s: float) -> None:
        """Until no foreground fetch has run for `quiet_s`; after `patience_s`, only until none runs.

        The patience bound keeps a node whose applications read all the time
        from never downloading in the background.
        """
        give_up = time.monotonic() + patience_s
        while True:
            await self._idle.wait()
            now = time.monotonic()
            wait = min(self.last_busy + quiet_s, give_up) - now
            if wait <= 0:
                return
            await asyncio.sleep(wait)


class TokenBucket:
    """A bandwidth cap for background transfers (bytes per second; None = no cap)."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._allowance = rate or 0.0
        self._last = time.monotonic()

    async def consume(self, n: int) -> None:
        if not self.rate:
            return
        now = time.monotonic()
        self._allowance = min(self.rate, self._allowance + (now - self._last) * self.rate)
        self._last = now
        self._allowance -= n
        if self._allowance < 0:
            await asyncio.sleep(-self._allowance / self.rate)


class NodeFetcher(ChunkStore):
    """Upstream of the node's disk tier: `get` is the foreground, `fetch_background` the background.

    Both upstream chains check what they return (VerifiedStore): chunks are not checked again here.
    It only reads: the node writes nothing upstream.
    """

    name = "upstream"

    def __init__(self, foreground: ChunkStore, background: ChunkStore, bandwidth_bytes_per_s: float | None = None,
                 quiet_s: float = 1.0, patience_s: float = 10.0, join_timeout_s: float = 5.0) -> None:
        super().__init__()
        self.join_timeout_s = join_timeout_s
        self.quiet_s = quiet_s  # see ForegroundGate.wait_quiet
        self.patience_s = patience_s
        self.foreground = foreground
        self.background = background
        self.checked = foreground.checked and background.checked
        self.gate = ForegroundGate()
        self.bucket = TokenBucket(bandwidth_bytes_per_s)
        self.foreground_flights = Flights()  # foreground fetches under way
        self._background: set[Digest] = set()  # chunks in background batches under way
        self.profile_flights = Flights()  # chunks of startup-profile batches under way
        self.blocking_fetches = 0  # foreground gets that started an upstream fetch of their own
        self.joined_fetches = 0  # foreground gets served by a startup-profile batch already under way
        self.background_fetches = 0
        self.recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=512)  # (time, bytes) fetched

    async def get(self, digest: Digest) -> bytes:
        pending = self.foreground_flights.pending(digest)
        if pending is not None:
            data = await self.foreground_flights.follow(pending)
            return data if data is not None else await self.get(digest)
        predicted = self.profile_flights.pending(digest)
        if predicted is not None:
            data = await self._join_predicted(predicted)
            if data is not None:
                return data
        return await self.foreground_flights.lead(digest, lambda: self._fetch_foreground(digest))

    async def _fetch_foreground(self, digest: Digest) -> bytes:
        self.gate.enter()
        self.blocking_fetches += 1
        try:
            data = await self.foreground.get(digest)
        finally:
            self.gate.leave()
        self.recent.append((time.monotonic(), digest.size))
        return data

    async def _join_predicted(self, predicted: asyncio.Future[bytes]) -> bytes | None:
        """The chunk from the profile batch bringing it; None if that batch fails or is late."""
        self.gate.enter()  # the application is waiting: no new background batch meanwhile
        try:
            data = await asyncio.wait_for(asyncio.shield(predicted), self.join_timeout_s)
        except (TimeoutError, ImagestreamError):
            return None
        finally:
            self.gate.leave()
        self.joined_fetches += 1
        return data

    async def fetch_background(self, digests: Sequence[Digest], predicted: bool = False) -> dict[Digest, bytes]:
        """Fetch a batch in one upstream call, after any foreground fetch; the chunks it brought, by digest.

        `predicted` batches (the startup profile: what the application is about
        to read) go as soon as no foreground fetch is in flight; the rest wait
        for the foreground to be quiet.
        """
        if predicted or not self.quiet_s:
            await self.gate.wait_idle()
        else:
            await self.gate.wait_quiet(self.quiet_s, self.patience_s)
        wanted = [d for d in dict.fromkeys(digests) if d not in self.foreground_flights and d not in self._background]
        self._background.update(wanted)
        waiting = {d: self.profile_flights.claim(d) for d in wanted} if predicted else {}
        got: dict[Digest, bytes] = {}
        try:
            async for digest, data in self.background.get_many(wanted):
                if digest in got or digest not in self._background:
                    continue
                got[digest] = data
                self.background_fetches += 1
                self.recent.append((time.monotonic(), digest.size))
                if digest in waiting:
                    self.profile_flights.land(digest, waiting[digest], data)
                else:
                    await self.bucket.consume(len(data))  # the profile's chunks are the foreground's, uncapped
        finally:
            self._background.difference_update(wanted)
            for digest, fut in waiting.items():  # those the batch did not bring
                self.profile_flights.abandon(digest, fut,
                                             Unavailable(f"chunk {digest.short} did not come with its profile batch"))
        return got

    def rate(self, window_s: float = 5.0) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in self.recent if now - t <= window_s]
        return sum(n for _, n in recent) / window_s if recent else 0.0

    async def put(self, digest: Digest, compressed: bytes) -> bool:
        raise FailedPrecondition(f"chunk {digest.short}: the node cache writes nothing upstream")

    async def contains(self, digest: Digest) -> bool:
        return await self.foreground.contains(digest)

    async def find_missing(self, digests):  # type: ignore[no-untyped-def]
        return await self.foreground.find_missing(digests)

    async def close(self) -> None:
        await self.foreground.close()
        await self.background.close()
