"""Bytes of a file, from its extents: decompressed chunks kept in a small LRU, fetched on demand.

A read is cut along chunk boundaries; holes are zeros; every chunk is asked of
the node cache (or whichever store is given), checked against its digest as it
is decompressed (this client's one check of it), and retried with a deadline,
so one lost upstream call never hangs a read. Sequential reads trigger readahead
of the next chunks.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from imagestream import telemetry
from imagestream.digests import Digest, decompress_verified
from imagestream.errors import CorruptChunk, ImagestreamError, NotFound, Unavailable
from imagestream.index import Index
from imagestream.store.base import ChunkStore
from imagestream.v1 import index_pb2

log = logging.getLogger(__name__)


class ChunkFetchFailed(ImagestreamError):
    """A chunk could not be had after every retry (becomes EIO at the FUSE edge)."""


class ChunkCache:
    """Decompressed chunks, least recently used out first, bounded in bytes. One per FUSE client, shared by
    every attached image: chunks are content-addressed, so images that share a base share its chunks here,
    and the node's memory for them is one bound, not one per image."""

    def __init__(self, bound_bytes: int) -> None:
        self.bound_bytes = bound_bytes
        self._chunks: OrderedDict[Digest, bytes] = OrderedDict()
        self.held_bytes = 0
        self.peak_bytes = 0

    def __contains__(self, digest: Digest) -> bool:
        return digest in self._chunks

    def get(self, digest: Digest) -> bytes | None:
        data = self._chunks.get(digest)
        if data is not None:
            self._chunks.move_to_end(digest)
        return data

    def keep(self, digest: Digest, data: bytes) -> None:
        if digest in self._chunks or len(data) > self.bound_bytes:
            return
        while self._chunks and self.held_bytes + len(data) > self.bound_bytes:
            _, old = self._chunks.popitem(last=False)
            self.held_bytes -= len(old)
        self._chunks[digest] = data
        self.held_bytes += len(data)
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)


class ChunkReader:
    def __init__(
        self,
        store: ChunkStore,
        index: Index,
        cache: ChunkCache | None = None,
        readahead_chunks: int = 8,
        timeout_s: float = 10.0,
        retries: int = 3,
    ) -> None:
        self.store = store
        self.index = index
        self.cache = cache if cache is not None else ChunkCache(64 << 20)
        self.readahead_chunks = readahead_chunks
        self.timeout_s = timeout_s
        self.retries = retries
        self._inflight: dict[Digest, asyncio.Task[bytes]] = {}
        self._last_chunk: dict[int, int] = {}  # inode -> chunk number its last read ended in
        self.touched: list[Digest] | None = None  # when recording a profile: chunks in first-read order
        self._touched_set: set[Digest] = set()
        self.fetches = 0  # chunks fetched from the node (not served from this LRU)
        self.fetched_bytes = 0
        self.readaheads = 0

    # -- chunks ----------------------------------------------------------
    async def chunk(self, digest: Digest) -> bytes:
        data = self.cache.get(digest)
        if data is not None:
            return data
        task = self._inflight.get(digest)
        if task is None:
            task = self._inflight[digest] = asyncio.ensure_future(self._fetch(digest))
            task.add_done_callback(lambda _t, d=digest: self._inflight.pop(d, None))
        return await asyncio.shield(task)

    async def _fetch(self, digest: Digest) -> bytes:
        last: Exception | None = None
        for attempt in range(self.retries):
            try:
                with telemetry.tracer.start_as_current_span("fetch chunk") as span:
                    if span.is_recording():
                        span.set_attributes({"imagestream.chunk": str(digest), "imagestream.attempt": attempt + 1})
                    compressed = await asyncio.wait_for(self.store.get(digest), self.timeout_s)
                data = await asyncio.to_thread(decompress_verified, digest, compressed)
            except (TimeoutError, Unavailable, NotFound, CorruptChunk) as e:
                last = e
                if isinstance(e, CorruptChunk):
                    await self.store.delete(digest)  # the next attempt must not get the same bad copy
                log.warning("chunk %s: attempt %d/%d failed: %s", digest, attempt + 1, self.retries, e or "timeout")
                await asyncio.sleep(0.1 * 2**attempt)
                continue
            return self._fetched(digest, data, len(compressed))
        log.error("chunk %s: giving up after %d attempts: %s", digest, self.retries, last)
        raise ChunkFetchFailed(f"chunk {digest}: {last}")

    def _fetched(self, digest: Digest, data: bytes, compressed_size: int) -> bytes:
        self.fetches += 1
        self.fetched_bytes += compressed_size
        self.cache.keep(digest, data)
        return data

    # -- files -----------------------------------------------------------
    async def read(self, ino: int, offset: int, size: int) -> bytes | memoryview:
        inode = self.index.inode(ino)
        end = min(offset + size, inode.size)
        if offset >= end:
            return b""
        chunk_size = self.index.chunk_size
        first, last = offset // chunk_size, (end - 1) // chunk_size
        extents = inode.extents
        if self.touched is not None:
            self._record(extents, first, last)
        parts = await asyncio.gather(*(self._extent(extents[i]) for i in range(first, last + 1)))
        # Sequential by chunk, not by byte: the kernel's own readahead sends several reads at once and
        # they may arrive out of order, yet they still walk forward through the file.
        previous = self._last_chunk.get(ino)
        self._last_chunk[ino] = last
        if first == 0 or (previous is not None and previous <= first <= previous + 1):
            self._readahead(extents, last + 1)
        # Slices are views: pyfuse3 replies from any buffer, so a read within one chunk copies nothing here.
        start = offset - first * chunk_size
        views = [memoryview(p) for p in parts]
        if len(views) == 1:
            return views[0][start : start + (end - offset)]
        views[0] = views[0][start:]
        views[-1] = views[-1][: end - last * chunk_size]
        return b"".join(views)

    def _record(self, extents, first: int, last: int) -> None:  # type: ignore[no-untyped-def]
        assert self.touched is not None
        for i in range(first, last + 1):
            if extents[i].HasField("chunk"):
                d = Digest(extents[i].chunk.hash, extents[i].chunk.size_bytes)
                if d not in self._touched_set:
                    self._touched_set.add(d)
                    self.touched.append(d)

    async def _extent(self, extent: index_pb2.Extent) -> bytes | memoryview:
        if not extent.HasField("chunk"):
            return bytes(extent.length)
        data = await self.chunk(Digest(extent.chunk.hash, extent.chunk.size_bytes))
        if extent.chunk_offset or extent.length != len(data):  # a small file's slice of a pack
            return memoryview(data)[extent.chunk_offset : extent.chunk_offset + extent.length]
        return data

    def _readahead(self, extents, start: int) -> None:  # type: ignore[no-untyped-def]
        for i in range(start, min(start + self.readahead_chunks, len(extents))):
            ext = extents[i]
            if not ext.HasField("chunk"):
                continue
            digest = Digest(ext.chunk.hash, ext.chunk.size_bytes)
            if digest not in self.cache and digest not in self._inflight:
                self.readaheads += 1
                task = asyncio.ensure_future(self.chunk(digest))
                task.add_done_callback(lambda t: t.cancelled() or t.exception())  # failures surface on the real read

    def forget(self, ino: int) -> None:
        self._last_chunk.pop(ino, None)
