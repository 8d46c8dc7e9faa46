"""Composition of stores: read-through, verification, failover, coalescing, bounds."""

from __future__ import annotations

import asyncio
import random

import pytest

from imagestream.digests import Digest, compress
from imagestream.errors import CorruptChunk, InvalidArgument, NotFound, Unavailable
from imagestream.store import CoalescingStore, FailoverStore, MemoryStore, ReadThroughStore, VerifiedStore
from imagestream.store.disk import DiskStore
from imagestream import digests


def chunk(seed: int, size: int = 2000) -> tuple[Digest, bytes]:
    data = (f"{seed}-".encode() * size)[:size]
    return Digest.of(data), compress(data)


class CountingStore(MemoryStore):
    """A MemoryStore that counts gets and can be made slow or down."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.gets = 0
        self.delay = delay
        self.down = False

    async def get(self, digest):  # type: ignore[no-untyped-def]
        self.gets += 1
        if self.down:
            raise Unavailable("down")
        await asyncio.sleep(self.delay)
        return await super().get(digest)


def test_digest_parsing_names_what_is_wrong() -> None:
    with pytest.raises(InvalidArgument, match="malformed digest hash 'xyz'"):
        digests.parse("xyz", 1)
    with pytest.raises(InvalidArgument, match="size -1"):
        digests.parse("a" * 64, -1)
    with pytest.raises(InvalidArgument, match="malformed"):
        digests.parse("A" * 64, 1)  # upper case is refused: one spelling per digest


def test_decompress_verified_rejects_mismatch_and_garbage() -> None:
    d, data = chunk(1)
    assert digests.decompress_verified(d, data) == (b"1-" * 2000)[:2000]
    with pytest.raises(CorruptChunk, match="does not match"):
        digests.decompress_verified(d, chunk(2)[1])
    with pytest.raises(CorruptChunk, match="not a valid zstd frame"):
        digests.decompress_verified(d, b"garbage")


async def test_memory_store_never_exceeds_its_budget() -> None:
    store = MemoryStore(capacity_bytes=10_000)
    sizes = []
    for i in range(200):
        raw = random.Random(i).randbytes(300 + i * 7)  # incompressible, so sizes vary as they would
        await store.put(Digest.of(raw), compress(raw))
        sizes.append(store.size_bytes)
    assert max(sizes) <= 10_000 and store.peak_bytes <= 10_000
    assert store.stats.evictions > 0
    assert store.size_bytes == sum(len(v) for v in store._chunks.values())


async def test_memory_store_evicts_least_recently_used() -> None:
    a, b, c = chunk(1), chunk(2), chunk(3)
    store = MemoryStore(capacity_bytes=len(a[1]) + len(b[1]) + 10)
    await store.put(*a)
    await store.put(*b)
    await store.get(a[0])  # a is now more recent than b
    await store.put(*c)
    assert await store.contains(a[0]) and not await store.contains(b[0]) and await store.contains(c[0])


async def test_disk_store_bounded_and_survives_restart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    chunks = [chunk(i, size=5000) for i in range(10)]
    one = len(chunks[0][1])
    store = DiskStore(tmp_path, capacity_bytes=one * 4)
    for d, data in chunks:
        await store.put(d, data)
    assert store.size_bytes <= one * 4 and len(store) == 4
    reopened = DiskStore(tmp_path, capacity_bytes=one * 4)
    assert len(reopened) == 4 and await reopened.get(chunks[-1][0]) == chunks[-1][1]


async def test_read_through_fills_the_cache_and_drops_corrupt_copies(tmp_path) -> None:  # type: ignore[no-untyped-def]
    d, data = chunk(7)
    upstream = CountingStore()
    await upstream.put(d, data)
    disk = DiskStore(tmp_path)
    store = ReadThroughStore(VerifiedStore(disk), upstream)
    assert await store.get(d) == data and upstream.gets == 1
    assert await store.get(d) == data and upstream.gets == 1  # served from the cache
    # corrupt the cached file: it must be dropped and fetched again, never served
    path = disk._path(d)
    path.write_bytes(chunk(8)[1])
    assert await store.get(d) == data
    assert upstream.gets == 2 and disk.stats.corrupt_dropped == 1
    assert disk._path(d).read_bytes() == data


async def test_a_read_through_keeps_writes_in_its_cache() -> None:
    d, data = chunk(15)
    cache, upstream = MemoryStore(), CountingStore()
    store = ReadThroughStore(cache, upstream)
    assert await store.put(d, data)
    assert await cache.contains(d) and not await upstream.contains(d)  # writes never travel up the chain


async def test_failover_skips_an_upstream_that_is_down() -> None:
    d, data = chunk(9)
    zonal, regional = CountingStore(), CountingStore()
    await regional.put(d, data)
    zonal.down = True
    store = FailoverStore([zonal, regional], cooldown_s=60)
    assert await store.get(d) == data
    assert await store.get(d) == data
    # the dead upstream is tried once, then moved to the back while it cools down
    assert zonal.gets == 1 and regional.gets == 2


async def test_failover_asks_the_next_tier_for_a_corrupt_chunk() -> None:
    d, data = chunk(10)
    bad, good = MemoryStore(), MemoryStore()
    await bad.put(d, chunk(11)[1])
    await good.put(d, data)
    store = FailoverStore([VerifiedStore(bad), VerifiedStore(good)])
    assert await store.get(d) == data


async def test_failover_all_down_is_unavailable_and_all_missing_is_not_found() -> None:
    d, _ = chunk(12)
    a, b = CountingStore(), CountingStore()
    with pytest.raises(NotFound):
        await FailoverStore([a, b]).get(d)
    a.down = b.down = True
    with pytest.raises(Unavailable):
        await FailoverStore([a, b]).get(d)


async def test_concurrent_misses_are_coalesced_into_one_upstream_fetch() -> None:
    d, data = chunk(13)
    regional = CountingStore(delay=0.05)
    await regional.put(d, data)
    zonal = ReadThroughStore(MemoryStore(), CoalescingStore(regional))
    results = await asyncio.gather(*(zonal.get(d) for _ in range(16)))
    assert all(r == data for r in results)
    assert regional.gets == 1


async def test_coalesced_failure_reaches_every_waiter_and_is_not_cached() -> None:
    d, data = chunk(14)
    regional = CountingStore(delay=0.02)
    store = CoalescingStore(regional)
    results = await asyncio.gather(*(store.get(d) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, NotFound) for r in results) and regional.gets == 1
    await regional.put(d, data)
    assert await store.get(d) == data


class SlowPutStore(MemoryStore):
    """A cache whose writes take a while (Redis across a zone, say)."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def put(self, digest, compressed):  # type: ignore[no-untyped-def]
        await asyncio.sleep(self.delay)
        return await super().put(digest, compressed)


async def _drain(it) -> dict:  # type: ignore[no-untyped-def]
    return {d: data async for d, data in it}


async def test_batches_and_single_gets_of_the_same_chunks_share_one_regional_fetch_each() -> None:
    chunks = dict(chunk(100 + i) for i in range(8))
    regional = CountingStore(delay=0.05)
    for d, data in chunks.items():
        await regional.put(d, data)
    zonal = CoalescingStore(ReadThroughStore(MemoryStore(), regional))
    batches = await asyncio.gather(*(_drain(zonal.get_many(list(chunks))) for _ in range(4)),
                                   *(zonal.get(d) for d in chunks))
    assert all(b == chunks for b in batches[:4])
    assert batches[4:] == list(chunks.values())
    assert regional.gets == len(chunks)
    assert zonal.coalesced >= 3 * len(chunks)


async def test_a_chunk_stays_claimed_until_the_cache_holds_it() -> None:
    d, data = chunk(120)
    regional = CountingStore(delay=0.01)
    await regional.put(d, data)
    zonal = CoalescingStore(ReadThroughStore(SlowPutStore(delay=0.1), regional))
    first = asyncio.ensure_future(zonal.get(d))
    await asyncio.sleep(0.05)  # the regional fetch is done; the cache write is not
    assert regional.gets == 1
    assert await _drain(zonal.get_many([d])) == {d: data}
    assert await first == data
    assert await zonal.get(d) == data  # from the cache now
    assert regional.gets == 1


async def test_a_batch_given_up_half_way_leaves_its_waiters_a_fetch_of_their_own() -> None:
    chunks = dict(chunk(130 + i) for i in range(4))
    regional = CountingStore(delay=0.05)
    for d, data in chunks.items():
        await regional.put(d, data)
    zonal = CoalescingStore(regional)
    batch = asyncio.ensure_future(_drain(zonal.get_many(list(chunks), concurrency=1)))
    await asyncio.sleep(0.01)
    waiters = asyncio.gather(*(zonal.get(d) for d in chunks))
    await asyncio.sleep(0.01)
    batch.cancel()  # the node that asked went away
    assert await waiters == list(chunks.values())
    assert len(zonal.flights) == 0


async def test_a_missing_chunk_in_a_batch_is_reported_and_released() -> None:
    (d, data), (absent, _) = chunk(140), chunk(141)
    regional = CountingStore()
    await regional.put(d, data)
    zonal = CoalescingStore(regional)
    with pytest.raises(NotFound):
        await _drain(zonal.get_many([d, absent]))
    assert len(zonal.flights) == 0
    assert await zonal.get(d) == data


async def test_a_flight_abandoned_late_does_not_drop_a_newer_claim_of_the_same_chunk() -> None:
    from imagestream.store.singleflight import Flights

    flights = Flights()
    digest, _ = chunk(90)
    first = flights.claim(digest)
    flights.abandon(digest, first, Unavailable("gone"))
    assert flights.pending(digest) is None
    with pytest.raises(Unavailable):
        first.result()
    second = flights.claim(digest)
    flights.abandon(digest, first, Unavailable("the old caller cleans up again"))
    assert flights.pending(digest) is second and not second.done()
    flights.land(digest, second, b"data")
    flights.abandon(digest, second, Unavailable("after it landed"))
    assert second.result() == b"data" and digest not in flights


async def test_a_large_upload_goes_in_several_streams_each_under_its_own_deadline(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """One PutChunks stream for a whole image outlasts its deadline (a 1.6 GB image at a few MB/s): the upload
    is cut into streams of about STREAM_BYTES, each with its own."""
    import os

    from imagestream.names import MemoryNames
    from imagestream.rpc.client import GrpcChunkStore
    from imagestream.rpc.server import start_server

    monkeypatch.setenv("IMAGESTREAM_TLS", "off")
    monkeypatch.setattr(GrpcChunkStore, "STREAM_BYTES", 3 * 100_000)
    address = f"127.0.0.1:{int(os.environ.get('IMAGESTREAM_TEST_PORT_BASE', '20100')) + 19}"
    backing = MemoryStore()
    server, _ = await start_server("test", [address], backing, MemoryNames())
    store = GrpcChunkStore(address, timeout_s=5)
    calls = []
    real_call = store._call

    async def counting(method, request, timeout_s=None):  # type: ignore[no-untyped-def]
        calls.append(timeout_s)
        return await real_call(method, request, timeout_s)

    monkeypatch.setattr(store, "_call", counting)
    chunks = [(Digest.of(raw), compress(raw)) for raw in (os.urandom(100_000) for _ in range(20))]
    try:
        assert await store.put_many(chunks, batch_bytes=100_000) == 20
        assert len(calls) >= 6 and all(t == 50 for t in calls)  # 20 chunks, 3 a stream; each 10x the timeout
        assert all([await backing.get(d) == c for d, c in chunks])
        assert await store.put_many(chunks, batch_bytes=100_000) == 0  # all there already
    finally:
        await store.close()
        await server.stop(None)


async def test_failover_says_a_finding_every_upstream_repeats_once() -> None:
    """A name no tier has: the caller reads the region's answer once, not once per tier that passed it on."""
    from imagestream.store.failover import Failover

    async def answer(upstream: str) -> None:
        raise NotFound(upstream)

    failover = Failover(["zonal: NOT_FOUND: resolve x: region: NOT_FOUND: image 'x' is not published",
                         "region: NOT_FOUND: image 'x' is not published"])
    with pytest.raises(NotFound) as e:
        await failover.call("resolve x", answer)
    assert str(e.value) == "resolve x: region: NOT_FOUND: image 'x' is not published"
