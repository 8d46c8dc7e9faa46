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
