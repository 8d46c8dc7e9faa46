"""The ChunkReader as plain coroutines, no mount: slicing, holes, offsets past 4 GiB, retries."""

from __future__ import annotations

import asyncio

import pytest

from fuse_client.reader import ChunkFetchFailed, ChunkReader
from imagestream.errors import Unavailable
from imagestream.index import Index
from imagestream.store import MemoryStore

from tests.fuse.indexes import CHUNK, GIB, sample


async def reader_for(store=None, **kw):  # type: ignore[no-untyped-def]
    message, chunks, expected = sample()
    store = MemoryStore() if store is None else store
    for d, data in chunks.items():
        await MemoryStore.put(store, d, data)
    index = Index(message)
    return ChunkReader(store, index, **kw), index, expected


def ino(index: Index, path: str) -> int:
    node = 1
    for part in path.split("/"):
        node = index.lookup(node, part.encode())
    return node


async def test_reads_across_chunk_boundaries_match_the_file() -> None:
    reader, index, expected = await reader_for()
    data = expected["etc/multi"]
    f = ino(index, "etc/multi")
    for offset, size in [(0, 10), (CHUNK - 5, 10), (CHUNK * 2 - 1, CHUNK + 2), (len(data) - 3, 100), (0, len(data) + 99)]:
        assert await reader.read(f, offset, size) == data[offset:offset + size]
    assert await reader.read(f, len(data), 10) == b""


async def test_sparse_file_over_4gib_reads_zeros_and_data_past_4gib() -> None:
    reader, index, expected = await reader_for()
    f = ino(index, "sparse-5g")
    assert await reader.read(f, 0, 4096) == bytes(4096)
    at = 4 * GIB + CHUNK
    assert await reader.read(f, at, CHUNK) == expected["sparse-5g@4GiB+64KiB"]
    assert await reader.read(f, at - 10, 20) == bytes(10) + expected["sparse-5g@4GiB+64KiB"][:10]
    assert reader.fetches == 1  # holes never cause a fetch


async def test_sequential_reads_prefetch_the_next_chunks() -> None:
    reader, index, expected = await reader_for(readahead_chunks=2)
    f = ino(index, "etc/multi")
    await reader.read(f, 0, 4096)
    await asyncio.sleep(0.05)
    assert reader.readaheads == 2
    assert reader.fetches == 3  # the chunk read plus two ahead
    before = reader.fetches
    await reader.read(f, CHUNK, 4096)  # already local
    assert reader.fetches - before <= 1


class FlakyStore(MemoryStore):
    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.calls = 0

    async def get(self, digest):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls <= self.failures:
            raise Unavailable("lost")
        return await super().get(digest)


class HangingStore(MemoryStore):
    async def get(self, digest):  # type: ignore[no-untyped-def]
        await asyncio.sleep(3600)


async def test_a_lost_upstream_call_is_retried() -> None:
    store = FlakyStore(failures=2)
    reader, index, expected = await reader_for(store, retries=3, readahead_chunks=0)
    assert await reader.read(ino(index, "etc/multi"), 0, 10) == expected["etc/multi"][:10]
    assert store.calls == 3


async def test_a_hanging_upstream_fails_the_read_after_the_deadline_instead_of_hanging() -> None:
    reader, index, _ = await reader_for(HangingStore(), timeout_s=0.1, retries=2)
    with pytest.raises(ChunkFetchFailed, match="chunk sha256:"):
        await asyncio.wait_for(reader.read(ino(index, "etc/multi"), 0, 10), 5)


async def test_any_unexpected_error_in_a_handler_is_answered_with_eio() -> None:
    """An exception a handler did not mean must still answer the kernel (else the reading process hangs)."""
    import errno

    import pyfuse3

    from fuse_client.filesystem import NodeFilesystem

    reader, index, _ = await reader_for()

    async def broken(*args):  # type: ignore[no-untyped-def]
        raise IndexError("list index out of range")

    reader.read = broken
    node = NodeFilesystem()
    fs = node.add(index, reader, "img")
    with pytest.raises(pyfuse3.FUSEError) as failed:
        await node.read(fs.base + ino(index, "etc/multi"), 0, 10)
    assert failed.value.errno == errno.EIO
    index.inodes[0].type = 99  # a type the attribute table does not know
    with pytest.raises(pyfuse3.FUSEError) as failed:
        await node.getattr(fs.root)
    assert failed.value.errno == errno.EIO
    with pytest.raises(pyfuse3.FUSEError) as missing:  # meant errors keep their errno
        await node.getattr(fs.base + 10**9)
    assert missing.value.errno == errno.ENOENT


async def test_every_image_shares_one_bounded_chunk_cache() -> None:
    """The node's FUSE client keeps decompressed chunks in one cache for every image: a chunk two images
    share is fetched once, and what the cache holds stays within its bound however many images read."""
    from fuse_client.reader import ChunkCache

    cache = ChunkCache(2 * CHUNK)
    first, index, expected = await reader_for(cache=cache, readahead_chunks=0)
    second = ChunkReader(first.store, index, cache=cache, readahead_chunks=0)  # another image, same base
    f = ino(index, "etc/multi")
    assert await first.read(f, 0, 100) == expected["etc/multi"][:100]
    assert await second.read(f, 0, 100) == expected["etc/multi"][:100]
    assert (first.fetches, second.fetches) == (1, 0)
    data = expected["etc/multi"]
    for reader in (first, second, ChunkReader(first.store, index, cache=cache, readahead_chunks=0)):
        assert await reader.read(f, 0, len(data)) == data
        assert cache.held_bytes <= 2 * CHUNK
    assert cache.peak_bytes <= 2 * CHUNK and len(data) > 2 * CHUNK  # it had to evict to stay in bound


def test_the_fuse_cache_is_a_share_of_the_nodes_reservation_and_a_bad_split_is_one_clear_error() -> None:
    from imagestream import config
    from imagestream.errors import InvalidArgument

    assert config.node_memory_split("256MiB", "32MiB") == (224 << 20, 32 << 20)
    assert config.node_memory_split("256MiB", "") == (224 << 20, 32 << 20)  # by default an eighth
    assert config.node_memory_split("4MiB", "") == (7 << 19, 1 << 19)  # a small reservation stays valid
    with pytest.raises(InvalidArgument, match="IMAGESTREAM_FUSE_CACHE_BYTES='64MiB' leaves nothing of "
                                               "IMAGESTREAM_NODE_MEMORY_BYTES='64MiB'"):
        config.node_memory_split("64MiB", "64MiB")
    with pytest.raises(InvalidArgument, match="not a size: 'lots'"):
        config.node_memory_split("lots", "32MiB")
