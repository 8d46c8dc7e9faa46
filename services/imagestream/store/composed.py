"""Stores made of other stores: the tier chain is composed from these, not coded per service."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from imagestream import telemetry
from imagestream.digests import Digest, verify
from imagestream.errors import CorruptChunk, NotFound, Unavailable
from imagestream.store.failover import Failover
from imagestream.store.base import ChunkStore, DelegatingStore, Stats
from imagestream.store.singleflight import FetchAbandoned, Flights

log = logging.getLogger(__name__)


def _attrs(tier: str, digest: Digest, hit: bool, nbytes: int) -> dict:
    return {"imagestream.tier": tier, "imagestream.hit": hit, "imagestream.chunk": str(digest),
            "imagestream.bytes": nbytes, "imagestream.image": telemetry.current_image()}


class VerifiedStore(DelegatingStore):
    """Checks every chunk against its digest on the way in and out.

    A corrupt chunk read from `inner` is deleted from it and reported as
    CorruptChunk, so that a read-through or failover asks the next tier; it is
    never served. `put_verified` (a chunk another checked store just gave) is
    not checked again, nor is a file named by `local_path` (whoever reads it checks it).
    """

    checked = True  # type: ignore[assignment]

    async def _check(self, digest: Digest, data: bytes) -> None:
        # large chunks are checked off the event loop (zstd and hashlib release the GIL)
        await asyncio.to_thread(verify, digest, data) if len(data) > 64 * 1024 else verify(digest, data)

    async def _check_read(self, digest: Digest, data: bytes) -> None:
        """CorruptChunk (after deleting the inner copy) if `data` does not match `digest`."""
        try:
            await self._check(digest, data)
        except CorruptChunk as e:
            self.stats.corrupt_dropped += 1
            log.warning("%s: dropping corrupt chunk %s: %s", self.name, digest, e)
            await self.inner.delete(digest)
            raise

    async def get(self, digest: Digest) -> bytes:
        data = await self.inner.get(digest)
        await self._check_read(digest, data)
        return data

    async def get_many(self, digests, concurrency: int = 16):  # type: ignore[no-untyped-def]
        """The inner store's batch, checked chunk by chunk; a corrupt one is dropped and not yielded."""
        async for digest, data in self.inner.get_many(digests, concurrency):
            try:
                await self._check_read(digest, data)
            except CorruptChunk:
                continue
            yield digest, data

    async def put(self, digest: Digest, compressed: bytes) -> bool:
        await self._check(digest, compressed)
        return await self.inner.put_verified(digest, compressed)


class ReadThroughStore(DelegatingStore):
    """Serve from `cache`; on a miss fetch from `upstream` and keep a copy in `cache`.

    A cache that fails (down, full, corrupt entry) never fails the read: the
    upstream is asked instead. Writes (`put`, `delete`) are the cache's only:
    they never travel up to the upstream tiers. A chunk from an upstream that
    checks what it returns is kept with `put_verified`, so it is not checked twice.
    """

    def __init__(self, cache: ChunkStore, upstream: ChunkStore, name: str | None = None) -> None:
        super().__init__(cache, name or f"{cache.name}>{upstream.name}")
        self.stats = Stats()
        self.cache = cache
        self.upstream = upstream
        self.fetch_seconds = None  # a Prometheus histogram child, set by services that export metrics

    @property
    def checked(self) -> bool:  # type: ignore[override]
        return self.cache.checked and self.upstream.checked

    async def _keep(self, digest: Digest, data: bytes) -> None:
        try:
            if self.upstream.checked:
                await self.cache.put_verified(digest, data)
            else:
                await self.cache.put(digest, data)
        except Unavailable as e:
            log.warning("%s: could not keep chunk %s: %s", self.name, digest.short, e)

    async def get(self, digest: Digest) -> bytes:
        with telemetry.tracer.start_as_current_span(f"{self.name} get") as span:
            try:
                data = await self.cache.get(digest)
            except (NotFound, CorruptChunk):
                pass
            except Unavailable as e:
                log.warning("%s: cache unavailable, reading upstream: %s", self.name, e)
            else:
                self.stats.hits += 1
                self.stats.bytes_served += len(data)
                if span.is_recording():
                    span.set_attributes(_attrs(self.name, digest, True, len(data)))
                return data
            self.stats.misses += 1
            self.stats.upstream_fetches += 1
            timer = telemetry.Timer()
            data = await self.upstream.get(digest)
            if self.fetch_seconds is not None:
                self.fetch_seconds.observe(timer.seconds)
            await self._keep(digest, data)
            self.stats.bytes_served += len(data)
            if span.is_recording():
                span.set_attributes(_attrs(self.name, digest, False, len(data)))
            return data

    async def get_many(self, digests, concurrency: int = 16):  # type: ignore[no-untyped-def]
        """Hits from the cache; all misses upstream in one batch, kept on the way."""
        missing: list[Digest] = []
        for digest in dict.fromkeys(digests):
            try:
                data = await self.cache.get(digest)
            except (NotFound, CorruptChunk, Unavailable):
                missing.append(digest)
                continue
            self.stats.hits += 1
            yield digest, data
        if not missing:
            return
        self.stats.misses += len(missing)
        self.stats.upstream_fetches += 1
        async for digest, data in self.upstream.get_many(missing, concurrency):
            await self._keep(digest, data)
            yield digest, data

    async def local_path(self, digest: Digest) -> str | None:
        return await self.cache.local_path(digest) or await self.upstream.local_path(digest)

    async def contains(self, digest: Digest) -> bool:
        return await self.cache.contains(digest) or await self.upstream.contains(digest)

    async def find_missing(self, digests):  # type: ignore[no-untyped-def]
        missing_here = await self.cache.find_missing(digests)
        return await self.upstream.find_missing(missing_here) if missing_here else []

    async def close(self) -> None:
        await self.cache.close()
        await self.upstream.close()


class FailoverStore(ChunkStore):
    """An ordered list of upstream stores (see `Failover`): each call goes to the first that answers.

    This is how a node falls back to the regional store when its zonal cache
    is gone.
    """

    def __init__(self, upstreams: Sequence[ChunkStore], cooldown_s: float = 5.0) -> None:
        super().__init__()
        self.failover: Failover[ChunkStore] = Failover(upstreams, cooldown_s)
        self.name = "|".join(u.name for u in upstreams)
        self.checked = all(u.checked for u in upstreams)

    async def get(self, digest: Digest) -> bytes:
        return await self.failover.call(f"get chunk {digest.short}", lambda u: u.get(digest))

    async def get_many(self, digests, concurrency: int = 16):  # type: ignore[no-untyped-def]
        """One batch to the first upstream that answers; what it lacks, from the next."""
        remaining = dict.fromkeys(digests)
        errors: list[Exception] = []
        for upstream in self.failover.ordered():
            if not remaining:
                return
            try:
                async for digest, data in upstream.get_many(list(remaining), concurrency):
                    if remaining.pop(digest, False) is None:
                        yield digest, data
            except Unavailable as e:
                self.failover.mark_down(upstream)
                errors.append(e)
            except (NotFound, CorruptChunk) as e:
                errors.append(e)
        if remaining:
            first = next(iter(remaining))
            detail = "; ".join(map(str, errors)) or "not found"
            if errors and all(isinstance(e, Unavailable) for e in errors):
                raise Unavailable(f"get {len(remaining)} chunks: every upstream is unavailable: {detail}")
            raise NotFound(f"get {len(remaining)} chunks (first {first.short}): {detail}")

    async def put(self, digest: Digest, compressed: bytes) -> bool:
        return await self.failover.call(f"put chunk {digest.short}", lambda u: u.put(digest, compressed))

    async def contains(self, digest: Digest) -> bool:
        return await self.failover.call(f"find chunk {digest.short}", lambda u: u.contains(digest))

    async def find_missing(self, digests):  # type: ignore[no-untyped-def]
        digests = list(digests)
        return await self.failover.call("find missing chunks", lambda u: u.find_missing(digests))

    async def close(self) -> None:
        for u in self.failover.upstreams:
            await u.close()


class CoalescingStore(DelegatingStore):
    """Concurrent gets of one chunk share one call to `inner`, single gets and batches alike.

    In the zonal cache it sits over the whole read-through (Redis, then the
    region), so that N nodes missing the same chunk at once make one regional
    fetch, and a chunk stays claimed until it is in Redis: a request that comes
    after the claim is released finds it there.
    """

    def __init__(self, inner: ChunkStore) -> None:
        super().__init__(inner)
        self.flights = Flights()
        self.coalesced = 0

    async def _join(self, digest: Digest, pending: asyncio.Future[bytes]) -> bytes:
        self.coalesced += 1
        data = await self.flights.follow(pending)
        return data if data is not None else await self.get(digest)

    async def get(self, digest: Digest) -> bytes:
        pending = self.flights.pending(digest)
        if pending is not None:
            return await self._join(digest, pending)
        return await self.flights.lead(digest, lambda: self.inner.get(digest))

    async def get_many(self, digests, concurrency: int = 16):  # type: ignore[no-untyped-def]
        """Chunks another caller is fetching are awaited; the rest go to `inner` as one batch."""
        mine: dict[Digest, asyncio.Future[bytes]] = {}
        theirs: dict[Digest, asyncio.Future[bytes]] = {}
        for digest in dict.fromkeys(digests):
            pending = self.flights.pending(digest)
            if pending is not None:
                theirs[digest] = pending
            else:
                mine[digest] = self.flights.claim(digest)
        try:
            if mine:
                async for digest, data in self.inner.get_many(list(mine), concurrency):
                    fut = mine.get(digest)
                    if fut is None or fut.done():
                        continue
                    self.flights.land(digest, fut, data)
                    yield digest, data
            for digest, pending in theirs.items():
                yield digest, await self._join(digest, pending)
        finally:
            for digest, fut in mine.items():  # those the batch did not bring
                self.flights.abandon(digest, fut, FetchAbandoned(f"fetch of {digest.short} abandoned"))
