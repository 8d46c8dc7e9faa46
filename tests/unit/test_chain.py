"""The three tiers and the FUSE client's reader wired as the services wire them, in one process, over gRPC
on Unix sockets (Redis and Cassandra stood in for by memory): how often a chunk is checked on its way, and
the doors a read-only tier keeps shut."""

from __future__ import annotations

import argparse
import collections
import hashlib
import types

import pytest

from fuse_client.reader import ChunkReader
from imagestream import digests
from imagestream.digests import Digest, compress
from imagestream.errors import FailedPrecondition
from imagestream.index import Index
from imagestream.names import MemoryNames
from imagestream.rpc.client import FailoverImageNames, GrpcChunkStore, GrpcImageNames
from imagestream.rpc.server import start_server
from imagestream.store import MemoryStore, VerifiedStore
from imagestream.v1 import images_pb2

from tests.fuse.indexes import CHUNK, sample


class Checks(collections.Counter):
    """Decompressions and SHA-256 hashes of chunk bytes: what checking a chunk against its digest costs."""


@pytest.fixture
def checks(monkeypatch) -> Checks:  # type: ignore[no-untyped-def]
    counts = Checks()
    real_decompressor, real_sha256 = digests._decompressor, hashlib.sha256

    class CountingDecompressor:
        def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
            self.inner = inner

        def decompress(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            counts["decompress"] += 1
            return self.inner.decompress(*args, **kwargs)

    def sha256(data: bytes = b""):  # type: ignore[no-untyped-def]
        counts["sha256"] += 1
        return real_sha256(data)

    # every check goes through digests.decompress_verified, wherever it is called from
    monkeypatch.setattr(digests, "_decompressor", lambda: CountingDecompressor(real_decompressor()))
    monkeypatch.setattr(digests, "hashlib", types.SimpleNamespace(sha256=sha256))
    return counts


@pytest.fixture
async def chain(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    from node_cache.__main__ import build as build_node
    from zonal_cache.__main__ import build as build_zonal

    message, chunks, expected = sample()
    cassandra = MemoryStore()  # the regional store's backend
    for d, data in chunks.items():
        await cassandra.put(d, data)
    sockets = {tier: f"unix:{tmp_path}/{tier}.sock" for tier in ("regional", "zonal", "node")}
    monkeypatch.setenv("IMAGESTREAM_NODE_DISK_DIR", str(tmp_path / "node-disk"))
    node = build_node(argparse.Namespace(
        node_upstreams=sockets["zonal"], node_background_bandwidth="0", node_background_quiet="0",
        node_disk_bytes="1GiB", node_memory_bytes="64MiB", fuse_cache_bytes="32MiB"))
    servers = [
        await start_server("chunk_store", [sockets["regional"]], VerifiedStore(cassandra), MemoryNames()),
        await start_server("zonal_cache", [sockets["zonal"]], build_zonal(MemoryStore(), [sockets["regional"]]),
                           FailoverImageNames([GrpcImageNames(sockets["regional"])]), region=sockets["regional"]),
        await start_server("node_cache", [sockets["node"]], node.store,
                           FailoverImageNames([GrpcImageNames(sockets["zonal"])]), region=sockets["regional"]),
    ]
    yield types.SimpleNamespace(sockets=sockets, node=node, index=Index(message), chunks=chunks, expected=expected)
    for server, _ in servers:
        await server.stop(None)


def multi(index: Index) -> int:
    return index.lookup(index.lookup(1, b"etc"), b"multi")


async def read_multi(chain, **store_options) -> bytes:  # type: ignore[no-untyped-def]
    """What the FUSE client does for an application reading etc/multi: chunks asked of the node, checked."""
    store = GrpcChunkStore(chain.sockets["node"], **store_options)
    try:
        reader = ChunkReader(store, chain.index, readahead_chunks=0)
        return bytes(await reader.read(multi(chain.index), 0, 1 << 20))
    finally:
        await store.close()


async def test_a_chunk_is_checked_once_per_tier(chain, checks) -> None:  # type: ignore[no-untyped-def]
    chunks_read = 4  # etc/multi: three whole chunks and a tail
    assert len(chain.expected["etc/multi"]) == 3 * CHUNK + 1234

    # cold: the regional store checks what Cassandra returns, the zonal cache what the region sent, the node
    # what the zone sent, the FUSE client what the node handed over; nothing is hashed again on its way in
    assert await read_multi(chain, accept_local_path=True) == chain.expected["etc/multi"]
    assert checks == {"decompress": 4 * chunks_read, "sha256": 4 * chunks_read}

    # warm on the node, handed over as the node's own file: the FUSE client's check only
    checks.clear()
    assert await read_multi(chain, accept_local_path=True) == chain.expected["etc/multi"]
    assert checks == {"decompress": chunks_read, "sha256": chunks_read}

    # warm in the node's memory, as bytes (checked on their way in): the client's check only
    checks.clear()
    assert await read_multi(chain) == chain.expected["etc/multi"]
    assert checks == {"decompress": chunks_read, "sha256": chunks_read}

    # read back from the node's disk: the disk copy is checked once, then the client's check
    checks.clear()
    chain.node.memory._chunks.clear()
    chain.node.memory.size_bytes = 0
    assert await read_multi(chain) == chain.expected["etc/multi"]
    assert checks == {"decompress": 2 * chunks_read, "sha256": 2 * chunks_read}


async def test_the_node_sees_reads_it_hands_over_as_files(chain) -> None:  # type: ignore[no-untyped-def]
    await read_multi(chain, accept_local_path=True)  # cold: fetched, kept on the node's disk
    disk = chain.node.disk
    hits = disk.stats.hits
    store = GrpcChunkStore(chain.sockets["node"], accept_local_path=True)
    try:
        oldest = next(iter(disk._lru))
        assert await ChunkReader(store, chain.index).chunk(oldest)
        assert store.local_reads == 1 and disk.stats.hits == hits + 1
        assert next(reversed(disk._lru)) == oldest  # the node's LRU saw the read: evicted last now
    finally:
        await store.close()


async def test_a_corrupt_file_on_the_node_is_not_served_and_is_replaced(chain) -> None:  # type: ignore[no-untyped-def]
    await read_multi(chain, accept_local_path=True)
    digest = next(iter(chain.node.disk._lru))
    good = chain.node.disk._path(digest).read_bytes()
    chain.node.disk._path(digest).write_bytes(compress(b"not the chunk"))
    chain.node.memory._chunks.clear()
    chain.node.memory.size_bytes = 0
    assert await read_multi(chain, accept_local_path=True) == chain.expected["etc/multi"]
    assert chain.node.disk._path(digest).read_bytes() == good  # the node dropped its bad copy and fetched again


@pytest.mark.parametrize("tier", ["zonal", "node"])
async def test_read_only_tiers_refuse_writes_and_name_the_regional_store(chain, tier) -> None:  # type: ignore[no-untyped-def]
    names = GrpcImageNames(chain.sockets[tier])
    index = Digest.of(b"index")
    try:
        for write in (lambda: names.publish(images_pb2.Image(name="x", index=index.to_proto())),
                      lambda: names.delete("x"), lambda: names.set_profile("x", index, index)):
            with pytest.raises(FailedPrecondition, match=f"reads only.*{chain.sockets['regional']}"):
                await write()
    finally:
        await names.close()


async def test_a_chunk_put_into_a_cache_tier_stays_there(chain) -> None:  # type: ignore[no-untyped-def]
    raw = b"kept on the node only" * 100
    digest, data = Digest.of(raw), compress(raw)
    node, regional = GrpcChunkStore(chain.sockets["node"]), GrpcChunkStore(chain.sockets["regional"])
    try:
        assert await node.put(digest, data)
        assert await chain.node.disk.contains(digest) or await chain.node.memory.contains(digest)
        assert await regional.find_missing([digest]) == [digest]
    finally:
        await node.close()
        await regional.close()
