"""The regional store at scale: push and read throughput with 10,000 MiB-sized chunks written and half of
them collected.

    python -m benchmarks.storage [--chunks 10000] [--chunk-kib 1024] [--batch 1000]

On a private stack (Cassandra, as deployed: one partition per chunk, uncompressed table), it:
1. writes --chunks chunks of random bytes (incompressible: each stored value is a full chunk), in
   batches of --batch through the regional gRPC API as `push` does, timing each batch;
2. publishes an image whose index names every other batch's chunks, so half of the store is live;
3. reads random live chunks through the same API (GetChunk, 8 at a time), timing each round;
4. collects garbage (grace 1 s): the unnamed half is deleted, each chunk leaving a partition tombstone;
5. writes and reads again, over the tombstones.

Throughput "holds" when the medians after collection are at least 0.8x of those before. Writes
docs/benchmarks/storage.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import random
import statistics
import time

from benchmarks.harness import ROOT, private_stack, write_report

HOLDS = 0.8  # after/before of the medians
READ_CONCURRENCY = 8
READS_PER_ROUND = 200


def _chunks(count: int, size: int):  # type: ignore[no-untyped-def]
    """(digest, zstd frame) of `count` chunks of random bytes, made as they are sent."""
    from imagestream.digests import Digest, compress

    for _ in range(count):
        data = os.urandom(size)
        yield Digest.of(data), compress(data)


def _index_naming(digests: list, chunk_size: int):  # type: ignore[no-untyped-def]
    """An image index with one file per chunk, in one directory: an image that keeps those chunks live."""
    from imagestream.v1 import index_pb2

    T = index_pb2.Inode
    index = index_pb2.ImageIndex(chunk_size=chunk_size)
    root = index.inodes.add(type=T.DIRECTORY, mode=0o755, nlink=2, size=4096)
    for n, digest in enumerate(digests):
        inode = index.inodes.add(type=T.REGULAR, mode=0o644, nlink=1, size=digest.size)
        inode.extents.add(chunk=digest.to_proto(), length=digest.size)
        root.entries.add(name=f"c{n:05d}".encode(), inode=n + 2)
    return index


async def _write(store, count: int, size: int) -> tuple[list, float]:  # type: ignore[no-untyped-def]
    """Chunks written in one PutChunks stream: their digests and MB/s (of chunk bytes)."""
    sent: list = []

    def tracked():  # type: ignore[no-untyped-def]
        for digest, frame in _chunks(count, size):
            sent.append(digest)
            yield digest, frame

    started = time.monotonic()
    stored = await store.put_many(tracked())
    elapsed = time.monotonic() - started
    assert stored == count, f"{stored} of {count} chunks stored"
    return sent, count * size / elapsed / 1e6


async def _read(store, live: list, size: int, rng: random.Random) -> float:  # type: ignore[no-untyped-def]
    """MB/s reading READS_PER_ROUND random live chunks, READ_CONCURRENCY at a time, each checked."""
    from imagestream.digests import decompress_verified

    picks = rng.sample(live, min(READS_PER_ROUND, len(live)))
    gate = asyncio.Semaphore(READ_CONCURRENCY)

    async def one(digest) -> None:  # type: ignore[no-untyped-def]
        async with gate:
            decompress_verified(digest, await store.get(digest))

    started = time.monotonic()
    await asyncio.gather(*(one(d) for d in picks))
    return len(picks) * size / (time.monotonic() - started) / 1e6


async def measure(chunks: int, chunk_kib: int, batch: int, progress) -> dict:  # type: ignore[no-untyped-def]
    from imagestream import config
    from imagestream.digests import Digest, compress
    from imagestream.rpc.client import GrpcChunkStore, GrpcImageNames, GrpcRegionalAdmin
    from imagestream.v1 import images_pb2

    size = chunk_kib * 1024
    rng = random.Random(7)
    region = config.get("region")
    store, names, admin = (GrpcChunkStore(region, timeout_s=120), GrpcImageNames(region),
                           GrpcRegionalAdmin(region, timeout_s=3600))
    r: dict = {"chunks": chunks, "chunk_bytes": size, "batch": batch, "write_mbps_before": [], "read_mbps_before": [],
               "write_mbps_after": [], "read_mbps_after": []}
    try:
        live: list = []
        for n in range(chunks // batch):
            written, mbps = await _write(store, batch, size)
            r["write_mbps_before"].append(mbps)
            if n % 2 == 0:
                live += written
            progress(f"batch {n + 1}/{chunks // batch}: {batch} chunks at {mbps:.1f} MB/s")
        index = _index_naming(live, size)
        raw = index.SerializeToString()
        index_digest = Digest.of(raw)
        await store.put(index_digest, compress(raw))
        await names.publish(images_pb2.Image(name="bench/storage-live", index=index_digest.to_proto(),
                                             content_bytes=len(live) * size, chunk_count=len(live)))
        for _ in range(3):
            r["read_mbps_before"].append(await _read(store, live, size, rng))
        progress(f"reads before gc: {statistics.median(r['read_mbps_before']):.1f} MB/s")
        await asyncio.sleep(1.5)  # past the shortest grace (1 s; 0 would mean the store's default)
        started = time.monotonic()
        report = await admin.collect_garbage(grace_s=1)
        r["gc_seconds"] = time.monotonic() - started
        r["gc_chunks_collected"], r["gc_bytes_collected"] = report.chunks_collected, report.bytes_collected
        r["gc_live_chunks"] = report.live_chunks
        progress(f"gc: {report.chunks_collected} chunks, {report.bytes_collected / 1e6:.0f} MB in {r['gc_seconds']:.1f} s")
        started = time.monotonic()
        await admin.collect_garbage(grace_s=1, dry_run=True)  # the key listing again, over the tombstones
        r["listing_after_gc_seconds"] = time.monotonic() - started
        assert not await store.find_missing(live), "gc deleted a live chunk"
        for n in range(3):
            written, mbps = await _write(store, batch, size)
            r["write_mbps_after"].append(mbps)
            progress(f"batch after gc {n + 1}/3: {batch} chunks at {mbps:.1f} MB/s")
        for _ in range(3):
            r["read_mbps_after"].append(await _read(store, live, size, rng))
        await names.delete("bench/storage-live")
    finally:
        for client in (store, names, admin):
            await client.close()
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--chunk-kib", type=int, default=1024, help="bytes per chunk (default 1024 KiB, the chunk size)")
    parser.add_argument("--batch", type=int, default=1000, help="chunks per write (one PutChunks stream)")
    parser.add_argument("--port-base", type=int, default=20500)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "docs" / "benchmarks",
                        help="folder for storage.json and storage.md (default docs/benchmarks)")
    args = parser.parse_args()
    if args.chunks < 2 * args.batch or args.chunks % args.batch:
        parser.error("--chunks must be a multiple of --batch, at least two batches")

    from tqdm import tqdm

    with private_stack(port_base=args.port_base), tqdm(total=args.chunks // args.batch + 6, unit="step") as bar:
        def progress(line: str) -> None:
            bar.update(1)
            bar.write(line)

        r = asyncio.run(measure(args.chunks, args.chunk_kib, args.batch, progress))
    med = {k: statistics.median(r[k]) for k in ("write_mbps_before", "write_mbps_after", "read_mbps_before",
                                                 "read_mbps_after")}
    write_ratio = med["write_mbps_after"] / med["write_mbps_before"]
    read_ratio = med["read_mbps_after"] / med["read_mbps_before"]
    r["medians"] = med
    r["targets"] = [{"name": "push throughput after gc / before", "measured": round(write_ratio, 2), "limit": HOLDS,
                     "met": write_ratio >= HOLDS},
                    {"name": "read throughput after gc / before", "measured": round(read_ratio, 2), "limit": HOLDS,
                     "met": read_ratio >= HOLDS}]
    mb = args.chunk_kib / 1024
    table = [
        ("measure", "before gc", "after gc", "after / before"),
        (f"push, MB/s (median of batches of {args.batch} chunks of {mb:g} MiB)", f"{med['write_mbps_before']:.1f}",
         f"{med['write_mbps_after']:.1f}", f"{write_ratio:.2f}x {'(holds)' if write_ratio >= HOLDS else '(MISSED: < 0.8x)'}"),
        (f"read, MB/s (median of 3 rounds of {READS_PER_ROUND} random live chunks, {READ_CONCURRENCY} at a time)",
         f"{med['read_mbps_before']:.1f}", f"{med['read_mbps_after']:.1f}",
         f"{read_ratio:.2f}x {'(holds)' if read_ratio >= HOLDS else '(MISSED: < 0.8x)'}"),
        (f"gc: {r['gc_chunks_collected']} chunks ({r['gc_bytes_collected'] / 2**30:.1f} GiB) collected, "
         f"{r['gc_live_chunks']} live kept", f"{r['gc_seconds']:.1f} s",
         f"key listing over the tombstones: {r['listing_after_gc_seconds']:.1f} s", ""),
    ]
    write_report("storage", r, table, args.out)


if __name__ == "__main__":
    main()
