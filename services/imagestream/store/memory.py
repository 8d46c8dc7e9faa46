"""A bounded in-memory LRU of compressed chunks (the node's memory reservation)."""

from __future__ import annotations

from collections import OrderedDict

from imagestream.digests import Digest
from imagestream.errors import NotFound
from imagestream.store.base import ChunkStore


class MemoryStore(ChunkStore):
    """LRU bounded by the bytes it holds; `capacity_bytes=None` is unbounded (tests, dev)."""

    name = "memory"

    def __init__(self, capacity_bytes: int | None = None) -> None:
        super().__init__()
        self.capacity_bytes = capacity_bytes
        self._chunks: OrderedDict[Digest, bytes] = OrderedDict()
        self.size_bytes = 0
        self.peak_bytes = 0

    async def get(self, digest: Digest) -> bytes:
        try:
            data = self._chunks[digest]
        except KeyError:
            self.stats.misses += 1
            raise NotFound(f"chunk {digest.short} not in memory") from None
        self._chunks.move_to_end(digest)
        self.stats.hits += 1
        self.stats.bytes_served += len(data)
        return data

    async def put(self, digest: Digest, compressed: bytes) -> bool:
        if digest in self._chunks:
            self._chunks.move_to_end(digest)
            return False
        if self.capacity_bytes is not None and len(compressed) > self.capacity_bytes:
            return False  # larger than the whole budget: never cached here
        self._evict(room_for=len(compressed))  # first make room: the budget is never exceeded
        self._chunks[digest] = compressed
        self.size_bytes += len(compressed)
        self.peak_bytes = max(self.peak_bytes, self.size_bytes)
        return True

    def _evict(self, room_for: int) -> None:
        if self.capacity_bytes is None:
            return
        while self._chunks and self.size_bytes + room_for > self.capacity_bytes:
            _, data = self._chunks.popitem(last=False)
            self.size_bytes -= len(data)
            self.stats.evictions += 1

    async def contains(self, digest: Digest) -> bool:
        return digest in self._chunks

    async def delete(self, digest: Digest) -> None:
        data = self._chunks.pop(digest, None)
        if data is not None:
            self.size_bytes -= len(data)

    def __len__(self) -> int:
        return len(self._chunks)
