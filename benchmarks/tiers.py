"""Chunk fetch latency (p50, p99) and throughput of each tier, asked directly over gRPC.

* node memory hit: GetChunk on the node cache's Unix socket, chunk in its memory LRU;
* node disk hit: the same after the node cache restarted (memory empty, disk kept),
  page cache dropped first (and once more with it hot);
* zonal hit: GetChunk on the zonal cache, chunk in Redis;
* regional hit: GetChunk on the regional store (Cassandra behind it), on its own
  address (no link), and through the emulated link with the default profile.
Latency: one request at a time over the sample of chunks. Throughput: the same
sample with 16 requests in flight (compressed bytes per second; chunk sizes as
in the image: mostly 1 MiB, packed small files, a few smaller tails).
"""

from __future__ import annotations

import asyncio
import time

from benchmarks.harness import drop_page_cache
from benchmarks.link import DEFAULT, OPEN
from benchmarks.setup import Image, Setup, log


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def _latencies(target: str, digests) -> tuple[list[float], int]:  # type: ignore[no-untyped-def]
    from imagestream.rpc.client import GrpcChunkStore

    store = GrpcChunkStore(target)
    try:
        await store.get(digests[0])  # channel set up before timing
        out, total = [], 0
        for d in digests:
            started = time.perf_counter()
            data = await store.get(d)
            out.append(time.perf_counter() - started)
            total += len(data)
        return out, total
    finally:
        await store.close()


async def _throughput(target: str, digests, concurrency: int = 16) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    from imagestream.rpc.client import GrpcChunkStore

    store = GrpcChunkStore(target)
    try:
        await store.get(digests[0])
        limit = asyncio.Semaphore(concurrency)
        total = 0

        async def one(d) -> None:  # type: ignore[no-untyped-def]
            nonlocal total
            async with limit:
                data = await store.get(d)
            total += len(data)

        started = time.perf_counter()
        await asyncio.gather(*(one(d) for d in digests))
        return time.perf_counter() - started, total
    finally:
        await store.close()


def _summary(latencies: list[float], nbytes: int, tput: tuple[float, int]) -> dict:
    seconds, tbytes = tput
    return {"samples": len(latencies), "p50_ms": _percentile(latencies, 0.5) * 1000,
            "p99_ms": _percentile(latencies, 0.99) * 1000, "mean_chunk_bytes": nbytes / len(latencies),
            "throughput_mb_s": tbytes / 1e6 / seconds, "throughput_chunks_s": len(latencies) / seconds}


def measure(setup: Setup, image: Image, sample_chunks: int = 200) -> dict:
    from imagestream import config
    from imagestream_dev.stack import local

    _, index = setup.image_chunks(image)
    chunks = index.chunks()
    step = max(1, len(chunks) // sample_chunks)
    sample = chunks[::step][:sample_chunks]
    node = "unix:" + config.node_cache_socket()
    r: dict = {"sample_chunks": len(sample), "image": image.label}

    def run(label: str, target: str, prepare=None) -> None:  # type: ignore[no-untyped-def]
        # each pass needs the state `prepare` sets up (a pass of latencies itself warms the next tier)
        if prepare:
            prepare()
        lat, nbytes = asyncio.run(_latencies(target, sample))
        if prepare:
            prepare()
        tput = asyncio.run(_throughput(target, sample))
        r[label] = _summary(lat, nbytes, tput)
        log(f"  {label:28} p50 {r[label]['p50_ms']:7.2f} ms  p99 {r[label]['p99_ms']:7.2f} ms  "
            f"{r[label]['throughput_mb_s']:7.1f} MB/s")

    # regional, on its own address (no link), then through the emulated default link
    setup.shape(OPEN)
    run("regional_direct", setup.regional)
    setup.shape(DEFAULT)
    run("regional_via_default_link", setup.link.address)
    setup.shape(OPEN)
    # zonal hits: fill Redis through the zonal cache, then ask again
    setup.empty_caches()
    asyncio.run(_latencies(setup.zonal, sample))
    run("zonal_hit", setup.zonal)
    # node: fetch once (misses), then memory hits; disk hits after a restart of the node cache
    asyncio.run(_latencies(node, sample))
    run("node_memory_hit", node)

    def restart_node(drop: bool) -> None:
        local.down(lambda _: None, only="node_cache")
        if drop:
            drop_page_cache()
        local.up(lambda _: None, only="node_cache")

    run("node_disk_hit_page_cache_dropped", node, prepare=lambda: restart_node(True))
    run("node_disk_hit_page_cache_hot", node, prepare=lambda: restart_node(False))
    return r
