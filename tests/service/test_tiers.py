"""The three tier services on real Redis and Cassandra: verification, failover, bad requests, publishing."""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest

from imagestream import config, tls
from imagestream.digests import Digest, compress
from imagestream.errors import FailedPrecondition
from imagestream.rpc.client import GrpcChunkStore, GrpcImageNames
from imagestream_dev.stack import local
from imagestream.v1 import chunk_store_pb2, chunk_store_pb2_grpc, images_pb2

pytestmark = pytest.mark.services


def targets(env: dict) -> dict[str, str]:
    return {
        "chunk_store": env["IMAGESTREAM_CHUNK_STORE_LISTEN"],
        "zonal_cache": env["IMAGESTREAM_ZONAL_CACHE_LISTEN"],
        "node_cache": "unix:" + config.node_cache_socket(),
    }


def fresh_chunk(tag: str) -> tuple[Digest, bytes, bytes]:
    raw = f"{tag} {os.urandom(8).hex()} ".encode() * 5000
    return Digest.of(raw), compress(raw), raw


@pytest.mark.parametrize("service", ["chunk_store", "zonal_cache", "node_cache"])
async def test_malformed_digests_get_invalid_argument(stack, service) -> None:  # type: ignore[no-untyped-def]
    async with tls.grpc_channel(targets(stack)[service]) as channel:
        stub = chunk_store_pb2_grpc.ChunkStoreStub(channel)
        for bad in [chunk_store_pb2.GetChunkRequest(), chunk_store_pb2.GetChunkRequest(digest={"hash": "zz", "size_bytes": 1}),
                    chunk_store_pb2.GetChunkRequest(digest={"hash": "a" * 64, "size_bytes": -5})]:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.GetChunk(bad, timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # a chunk whose bytes do not match its digest is refused on put, naming the digest
        digest, _, _ = fresh_chunk("x")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.PutChunks(iter([chunk_store_pb2.PutChunksRequest(chunks=[
                chunk_store_pb2.Chunk(digest=digest.to_proto(), compressed=compress(b"other"))])]), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and digest.hash[:12] in e.value.details()
        # the service is still up afterwards
        missing = await stub.FindMissingChunks(chunk_store_pb2.FindMissingChunksRequest(digests=[digest.to_proto()]), timeout=10)
        assert len(missing.missing) == 1


async def test_a_read_goes_node_zonal_regional_and_fills_each_tier(stack) -> None:  # type: ignore[no-untyped-def]
    t = targets(stack)
    digest, data, _ = fresh_chunk("chain")
    regional, zonal, node = GrpcChunkStore(t["chunk_store"]), GrpcChunkStore(t["zonal_cache"]), GrpcChunkStore(t["node_cache"])
    try:
        await regional.put(digest, data)
        from imagestream_dev.stack import credentials

        r = credentials.redis_admin()
        key = f"chunk:{digest.hash}:{digest.size}"
        assert r.exists(key) == 0
        assert await node.get(digest) == data
        assert r.exists(key) == 1  # the zonal cache kept a copy on the way
        disk = config.node_disk_dir() / digest.hash[:2] / f"{digest.hash}-{digest.size}"
        assert disk.exists()  # so did the node's disk
        r.close()
    finally:
        for s in (regional, zonal, node):
            await s.close()


async def test_a_chunk_corrupted_in_redis_is_never_served(stack) -> None:  # type: ignore[no-untyped-def]
    from imagestream_dev.stack import credentials

    t = targets(stack)
    digest, data, _ = fresh_chunk("redis-corrupt")
    regional, zonal = GrpcChunkStore(t["chunk_store"]), GrpcChunkStore(t["zonal_cache"])
    r = credentials.redis_admin()
    try:
        await regional.put(digest, data)
        r.set(f"chunk:{digest.hash}:{digest.size}", compress(b"not the chunk"))
        assert await zonal.get(digest) == data  # dropped, fetched again from the regional store
        assert r.get(f"chunk:{digest.hash}:{digest.size}") == data  # and the good copy replaced it
    finally:
        r.close()
        await regional.close()
        await zonal.close()


async def test_a_chunk_corrupted_on_the_node_disk_is_never_served(stack) -> None:  # type: ignore[no-untyped-def]
    t = targets(stack)
    digest, data, _ = fresh_chunk("disk-corrupt")
    regional = GrpcChunkStore(t["chunk_store"])
    await regional.put(digest, data)
    await regional.close()
    node = GrpcChunkStore(t["node_cache"])
    assert await node.get(digest) == data
    await node.close()
    # restart the node cache so its memory tier is empty and the disk copy is what it would serve
    await asyncio.to_thread(local.down, print, "node_cache")
    disk = config.node_disk_dir() / digest.hash[:2] / f"{digest.hash}-{digest.size}"
    disk.write_bytes(compress(b"corrupted on disk"))
    await asyncio.to_thread(local.up, print, "node_cache")
    node = GrpcChunkStore(t["node_cache"])
    try:
        assert await node.get(digest) == data
        assert disk.read_bytes() == data
    finally:
        await node.close()


async def test_a_node_falls_back_to_the_regional_store_when_its_zonal_cache_is_gone(stack) -> None:  # type: ignore[no-untyped-def]
    t = targets(stack)
    digest, data, _ = fresh_chunk("failover")
    regional = GrpcChunkStore(t["chunk_store"])
    await regional.put(digest, data)
    await regional.close()
    await asyncio.to_thread(local.down, print, "zonal_cache")
    node = GrpcChunkStore(t["node_cache"])
    try:
        assert await asyncio.wait_for(node.get(digest), 30) == data
    finally:
        await node.close()
        await asyncio.to_thread(local.up, print, "zonal_cache")


async def test_publish_refuses_an_image_whose_chunks_are_not_stored(stack) -> None:  # type: ignore[no-untyped-def]
    t = targets(stack)
    registry, regional = GrpcImageNames(t["chunk_store"]), GrpcChunkStore(t["chunk_store"])
    try:
        digest, _, _ = fresh_chunk("never-stored-index")
        with pytest.raises(FailedPrecondition, match="index .* is not stored"):
            await registry.publish(images_pb2.Image(name="half/published", index=digest.to_proto()))
        assert "half/published" not in [i.name for i in await registry.list()]
    finally:
        await registry.close()
        await regional.close()
