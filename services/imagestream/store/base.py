"""The chunk-store contract every tier implements."""

from __future__ import annotations

import abc
import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterable, Sequence

from imagestream.digests import Digest


@dataclasses.dataclass
class Stats:
    """Counters a store keeps about itself (exported as metrics, shown by `status`)."""

    hits: int = 0
    misses: int = 0
    bytes_served: int = 0
    corrupt_dropped: int = 0
    evictions: int = 0
    upstream_fetches: int = 0


class ChunkStore(abc.ABC):
    """Content-addressed chunks, kept zstd-compressed.

    `get` returns the compressed frame of a chunk or raises NotFound.
    Stores that hold bytes they did not just receive (disk, Redis, Cassandra, a
    gRPC tier) do not check them themselves: wrap them in `VerifiedStore`, which
    drops a corrupt chunk and reports it as missing so the next tier is asked.
    A tier checks each chunk once: what comes out of a checked store is kept
    with `put_verified`, never hashed again on the way in.
    """

    name: str = "store"
    # False for stores that write blindly (no read before write) and so cannot
    # tell whether `put` stored something new.
    knows_duplicates: bool = True
    # True if `get` and `get_many` only return chunks checked against their digest.
    checked: bool = False

    def __init__(self) -> None:
        self.stats = Stats()

    @abc.abstractmethod
    async def get(self, digest: Digest) -> bytes: ...

    @abc.abstractmethod
    async def put(self, digest: Digest, compressed: bytes) -> bool:
        """Store a chunk; True if it was not there before."""

    async def put_verified(self, digest: Digest, compressed: bytes) -> bool:
        """`put` of a chunk already checked against its digest (a store that checks on `put` skips it)."""
        return await self.put(digest, compressed)

    @abc.abstractmethod
    async def contains(self, digest: Digest) -> bool: ...

    async def local_path(self, digest: Digest) -> str | None:
        """A file on this machine holding the chunk's compressed bytes, if this store keeps one."""
        return None

    async def delete(self, digest: Digest) -> None:
        """Drop a chunk (used to throw away one found corrupt). Default: nothing to drop."""

    async def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        digests = list(dict.fromkeys(digests))
        present = await asyncio.gather(*(self.contains(d) for d in digests))
        return [d for d, here in zip(digests, present) if not here]

    async def put_many(self, chunks: Iterable[tuple[Digest, bytes]]) -> int:
        """`put` of each (digest, compressed); the number of chunks written. A remote store batches them."""
        written = 0
        for digest, compressed in chunks:
            await self.put(digest, compressed)
            written += 1
        return written

    async def get_many(self, digests: Sequence[Digest], concurrency: int = 16) -> AsyncIterator[tuple[Digest, bytes]]:
        """Yield (digest, compressed) for each distinct digest, in completion order."""
        limit = asyncio.Semaphore(concurrency)

        async def one(d: Digest) -> tuple[Digest, bytes]:
            async with limit:
                return d, await self.get(d)

        tasks = [asyncio.ensure_future(one(d)) for d in dict.fromkeys(digests)]
        try:
            for next_done in asyncio.as_completed(tasks):
                yield await next_done
        finally:
            for t in tasks:
                t.cancel()

    async def close(self) -> None:
        pass


class DelegatingStore(ChunkStore):
    """A store that forwards every call to `inner`: a decorator overrides only what it adds.

    Counters are the inner store's (a decorator that counts for itself gives
    itself a `Stats()` of its own).
    """

    def __init__(self, inner: ChunkStore, name: str | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.name = name or inner.name
        self.stats = inner.stats
        self.knows_duplicates = inner.knows_duplicates

    @property
    def checked(self) -> bool:  # type: ignore[override]
        return self.inner.checked

    async def get(self, digest: Digest) -> bytes:
        return await self.inner.get(digest)

    def get_many(self, digests: Sequence[Digest], concurrency: int = 16) -> AsyncIterator[tuple[Digest, bytes]]:
        return self.inner.get_many(digests, concurrency)

    async def put(self, digest: Digest, compressed: bytes) -> bool:
        return await self.inner.put(digest, compressed)

    async def put_verified(self, digest: Digest, compressed: bytes) -> bool:
        return await self.inner.put_verified(digest, compressed)

    async def contains(self, digest: Digest) -> bool:
        return await self.inner.contains(digest)

    async def local_path(self, digest: Digest) -> str | None:
        return await self.inner.local_path(digest)

    async def delete(self, digest: Digest) -> None:
        await self.inner.delete(digest)

    async def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        return await self.inner.find_missing(digests)

    async def close(self) -> None:
        await self.inner.close()
