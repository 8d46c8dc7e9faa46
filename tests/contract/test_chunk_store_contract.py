"""One conformance suite, run against every implementation of the ChunkStore interface.

Memory, disk, Redis (real redis-server), Cassandra (real node from the session
stack) and the gRPC client (against a served MemoryStore) must all behave alike.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time

import pytest

from imagestream.digests import Digest, compress
from imagestream.errors import NotFound
from imagestream.store import MemoryStore, VerifiedStore
from imagestream.store.disk import DiskStore


def chunk(seed: int, size: int = 3000) -> tuple[Digest, bytes]:
    data = (f"chunk {seed} ".encode() * (size // 8 + 1))[:size]
    return Digest.of(data), compress(data)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url():  # type: ignore[no-untyped-def]
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
                             "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait()


@pytest.fixture(scope="module")
def cassandra_db(stack):  # type: ignore[no-untyped-def]
    import secrets

    from chunk_store import schema
    from chunk_store.cassandra_backend import CassandraConnection
    from imagestream_dev.stack import credentials

    # a keyspace and a role of its own, made by the schema step as for the regional store
    password = secrets.token_urlsafe(16)
    admin = credentials.cassandra_admin()
    schema.setup(admin.session, "contract_test", {"dc1": 1}, "contract_test", password)
    admin.shutdown()
    db = CassandraConnection(["127.0.0.1"], int(stack["IMAGESTREAM_CASSANDRA_PORT"]), "contract_test", "dc1",
                             "ONE", "ONE", username="contract_test", password=password)
    db.session.execute("TRUNCATE contract_test.chunks")
    yield db
    db.close()


IMPLEMENTATIONS = ["memory", "disk", "redis", "cassandra", "grpc"]


@pytest.fixture(params=IMPLEMENTATIONS)
async def store(request, tmp_path):  # type: ignore[no-untyped-def]
    kind = request.param
    cleanup = []
    if kind == "memory":
        s = MemoryStore()
    elif kind == "disk":
        s = DiskStore(tmp_path / "disk")
    elif kind == "redis":
        from zonal_cache.redis_backend import RedisChunkStore

        s = RedisChunkStore(request.getfixturevalue("redis_url"), prefix=f"t{os.getpid()}{time.monotonic_ns()}:")
    elif kind == "cassandra":
        from chunk_store.cassandra_backend import CassandraChunkStore

        s = CassandraChunkStore(request.getfixturevalue("cassandra_db"))
    else:
        from imagestream.rpc.client import GrpcChunkStore
        from imagestream.rpc.server import start_server
        from imagestream.names import MemoryNames

        target = f"unix:{tmp_path}/store.sock"
        server, _ = await start_server("test", [target], MemoryStore(), MemoryNames())
        cleanup.append(lambda: server.stop(None))
        s = GrpcChunkStore(target)
    yield s
    await s.close()
    for c in cleanup:
        await c()


async def test_missing_chunk_is_not_found(store):  # type: ignore[no-untyped-def]
    digest, _ = chunk(1)
    with pytest.raises(NotFound):
        await store.get(digest)
    assert not await store.contains(digest)


async def test_put_then_get_returns_the_same_bytes(store):  # type: ignore[no-untyped-def]
    digest, data = chunk(2)
    assert await store.put(digest, data) is True
    assert await store.get(digest) == data
    assert await store.contains(digest)


async def test_second_put_reports_already_present(store):  # type: ignore[no-untyped-def]
    if not store.knows_duplicates:
        pytest.skip("this store writes blindly and cannot tell")
    digest, data = chunk(3)
    assert await store.put(digest, data) is True
    assert await store.put(digest, data) is False
    assert await store.get(digest) == data


async def test_find_missing_returns_exactly_the_absent_ones(store):  # type: ignore[no-untyped-def]
    present = [chunk(10 + i) for i in range(3)]
    absent = [chunk(20 + i) for i in range(2)]
    for d, data in present:
        await store.put(d, data)
    asked = [d for d, _ in present + absent] + [absent[0][0]]  # a duplicate is reported once
    missing = await store.find_missing(asked)
    assert sorted(missing) == sorted(d for d, _ in absent)


async def test_get_many_yields_every_requested_chunk(store):  # type: ignore[no-untyped-def]
    chunks = [chunk(30 + i, size=1000 + i) for i in range(6)]
    for d, data in chunks:
        await store.put(d, data)
    got = {d: data async for d, data in store.get_many([d for d, _ in chunks])}
    assert got == dict(chunks)


async def test_empty_chunk_round_trips(store):  # type: ignore[no-untyped-def]
    digest, data = Digest.of(b""), compress(b"")
    await store.put(digest, data)
    assert await store.get(digest) == data


async def test_verified_store_never_serves_a_corrupt_chunk(store):  # type: ignore[no-untyped-def]
    """Corrupt bytes under a digest are dropped, not served; the next get is a clean miss."""
    from imagestream.errors import CorruptChunk

    digest, _ = chunk(40)
    _, other = chunk(41)
    if getattr(store, "target", None):
        pytest.skip("the gRPC server verifies on put, so corrupt bytes cannot be planted through it")
    await store.put(digest, other)  # plant bytes that do not match the digest
    verified = VerifiedStore(store)
    with pytest.raises(CorruptChunk):
        await verified.get(digest)
    assert not await store.contains(digest)


async def test_concurrent_gets_all_succeed(store):  # type: ignore[no-untyped-def]
    digest, data = chunk(50, size=200_000)
    await store.put(digest, data)
    results = await asyncio.gather(*(store.get(digest) for _ in range(20)))
    assert all(r == data for r in results)
