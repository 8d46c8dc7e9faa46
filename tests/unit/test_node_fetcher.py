"""The node's way upstream: the background download keeps out of a starting application's way."""

from __future__ import annotations

import asyncio
import time

from imagestream.digests import Digest, compress
from imagestream.store import MemoryStore

from node_cache.downloads import Downloads
from node_cache.fetcher import NodeFetcher


def chunk(seed: int, size: int = 3000) -> tuple[Digest, bytes]:
    data = (f"{seed}:".encode() * size)[:size]
    return Digest.of(data), compress(data)


async def _upstream(n: int) -> tuple[MemoryStore, dict[Digest, bytes]]:
    store = MemoryStore()
    chunks = dict(chunk(i) for i in range(n))
    for d, data in chunks.items():
        await store.put(d, data)
    return store, chunks


async def test_background_waits_for_a_quiet_foreground_and_predicted_chunks_do_not() -> None:
    upstream, chunks = await _upstream(4)
    fetcher = NodeFetcher(upstream, upstream, quiet_s=0.3, patience_s=5.0)
    digests = list(chunks)
    fetcher.gate.touch()  # a mount starts
    started = time.monotonic()
    assert await fetcher.fetch_background(digests[:2], predicted=True) == {d: chunks[d] for d in digests[:2]}
    assert time.monotonic() - started < 0.2

    last_read = 0.0

    async def reads() -> None:  # an import storm: short misses with gaps between them
        nonlocal last_read
        for _ in range(4):
            await fetcher.get(digests[0])
            last_read = time.monotonic()
            await asyncio.sleep(0.15)

    storm = asyncio.ensure_future(reads())
    got = await fetcher.fetch_background(digests[2:])
    assert got == {d: chunks[d] for d in digests[2:]}
    assert fetcher.blocking_fetches == 4, "the background batch went while the application was still reading"
    assert time.monotonic() - last_read >= 0.3 - 0.01
    await storm


async def test_a_busy_foreground_does_not_starve_the_background_forever() -> None:
    upstream, chunks = await _upstream(2)
    fetcher = NodeFetcher(upstream, upstream, quiet_s=10.0, patience_s=0.3)
    fetcher.gate.touch()
    started = time.monotonic()
    got = await fetcher.fetch_background(list(chunks))
    assert len(got) == 2 and 0.25 <= time.monotonic() - started < 2.0


def test_batches_are_bounded_by_chunks_and_bytes() -> None:
    downloads = Downloads(MemoryStore(), None, None, batch_chunks=4, batch_bytes=10_000)  # type: ignore[arg-type]
    digests = [chunk(i, size=3000)[0] for i in range(10)]
    by_bytes = downloads._batches(digests, max_bytes=10_000)
    assert [len(b) for b in by_bytes] == [3, 3, 3, 1] and sum(by_bytes, []) == digests
    assert [len(b) for b in downloads._batches(digests, max_bytes=None)] == [4, 4, 2]
    big = [chunk(i, size=20_000)[0] for i in range(2)]
    assert [len(b) for b in downloads._batches(big, max_bytes=10_000)] == [1, 1]  # one chunk at least


class SlowStore(MemoryStore):
    """Counts gets (single and in batches); each takes `delay`; can be made to fail."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.gets = 0
        self.fail = False

    async def get(self, digest):  # type: ignore[no-untyped-def]
        self.gets += 1
        await asyncio.sleep(self.delay)
        if self.fail:
            from imagestream.errors import Unavailable

            raise Unavailable("upstream down")
        return await super().get(digest)


async def test_a_read_of_a_chunk_its_profile_batch_is_bringing_waits_for_it() -> None:
    foreground, background = SlowStore(0.05), SlowStore(0.2)
    for d, data in [chunk(i) for i in range(3)]:
        await foreground.put(d, data)
        await background.put(d, data)
    digests = [chunk(i)[0] for i in range(3)]
    fetcher = NodeFetcher(foreground, background, quiet_s=1.0)
    batch = asyncio.ensure_future(fetcher.fetch_background(digests, predicted=True))
    await asyncio.sleep(0.01)
    assert await fetcher.get(digests[1]) == chunk(1)[1]
    assert (foreground.gets, fetcher.joined_fetches, fetcher.blocking_fetches) == (0, 1, 0)
    assert len(await batch) == 3


async def test_a_read_whose_profile_batch_fails_fetches_the_chunk_itself() -> None:
    foreground, background = SlowStore(0.01), SlowStore(0.1)
    d, data = chunk(7)
    await foreground.put(d, data)
    await background.put(d, data)
    background.fail = True
    fetcher = NodeFetcher(foreground, background)
    batch = asyncio.ensure_future(fetcher.fetch_background([d], predicted=True))
    await asyncio.sleep(0.01)
    assert await fetcher.get(d) == data
    assert (foreground.gets, fetcher.joined_fetches, fetcher.blocking_fetches) == (1, 0, 1)
    try:
        await batch
    except Exception:  # noqa: BLE001 - the batch's own failure is the download's business
        pass
    assert len(fetcher.profile_flights) == 0


async def test_a_read_never_waits_for_a_batch_that_is_not_the_profile() -> None:
    foreground, background = SlowStore(0.01), SlowStore(0.3)
    d, data = chunk(8)
    await foreground.put(d, data)
    await background.put(d, data)
    fetcher = NodeFetcher(foreground, background, quiet_s=0)
    batch = asyncio.ensure_future(fetcher.fetch_background([d]))
    await asyncio.sleep(0.01)
    started = time.monotonic()
    assert await fetcher.get(d) == data
    assert time.monotonic() - started < 0.2 and fetcher.blocking_fetches == 1
    await batch


async def test_a_read_whose_leader_is_cancelled_fetches_the_chunk_itself() -> None:
    foreground, background = SlowStore(0.1), SlowStore(0.1)
    d, data = chunk(9)
    await foreground.put(d, data)
    fetcher = NodeFetcher(foreground, background)
    leader = asyncio.ensure_future(fetcher.get(d))
    await asyncio.sleep(0.01)
    follower = asyncio.ensure_future(fetcher.get(d))
    await asyncio.sleep(0.01)
    leader.cancel()  # e.g. the FUSE client gave up on that read
    assert await follower == data
    assert foreground.gets == 2 and fetcher.gate.active == 0 and len(fetcher.foreground_flights) == 0
