"""Push and read throughput of the regional store before and after a garbage collection of half its chunks.

    python -m benchmarks.storage [--images 10] [--chunks 1000] [--chunk-kib 16] [--port-base 24100] [--out docs/benchmarks]

On a private stack, pushes `images` images of `chunks` files each, every file
`chunk-kib` of random bytes pushed with that chunk size, so each file is one
distinct chunk (10 x 1,000 = 10,000 chunks by default). Push throughput is each
push's MB/s (`imagestream push`, convert and upload); read throughput is reading
every chunk of an image straight from the regional store (GetChunks, no cache in
between), in MB/s. Then half the images are removed and `imagestream gc --grace 1`
collects their chunks (deletes, and so Cassandra tombstones, of half the
partitions); then as many new images are pushed and every image left is read
again. Reports medians before and after and their ratios. Writes
OUT/storage.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import re
import statistics
import tempfile
import time

from tqdm import tqdm

from benchmarks.harness import ROOT, cli, private_stack, write_report


def make_layout(i: int, chunks: int, chunk_bytes: int, work: pathlib.Path) -> pathlib.Path:
    from imagestream_dev import imagebuild

    files = {f"data/{n:05d}": os.urandom(chunk_bytes) for n in range(chunks)}
    return imagebuild.layout_of_files(files, work / f"image-{i}", work / "tmp")


def push(layout: pathlib.Path, name: str, chunk_bytes: int, total_bytes: int) -> float:
    """MB/s of one push (convert and upload) of fresh content."""
    started = time.perf_counter()
    cli("push", "-q", "--chunk-size", str(chunk_bytes), str(layout), name)
    return total_bytes / 1e6 / (time.perf_counter() - started)


async def _read(name: str) -> tuple[int, float]:
    from imagestream import config
    from imagestream.digests import Digest
    from imagestream.index import load_index
    from imagestream.rpc.client import GrpcChunkStore, GrpcImageNames

    names, store = GrpcImageNames(config.get("region")), GrpcChunkStore(config.get("region"))
    try:
        image = await names.resolve(name)
        chunks = (await load_index(store, Digest.from_proto(image.index))).chunks()
        started = time.perf_counter()
        size = 0
        async for _, data in store.get_many(chunks):
            size += len(data)
        return size, time.perf_counter() - started
    finally:
        await names.close()
        await store.close()


def read(name: str) -> float:
    """MB/s reading every chunk of NAME from the regional store (compressed bytes as stored)."""
    size, seconds = asyncio.run(_read(name))
    return size / 1e6 / seconds


def summary(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--chunks", type=int, default=1000, help="chunks (files) per image")
    parser.add_argument("--chunk-kib", type=int, default=16)
    parser.add_argument("--port-base", type=int, default=24100)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args()
    chunk_bytes = args.chunk_kib << 10
    image_bytes = args.chunks * chunk_bytes
    half = args.images // 2
    results: dict = {"images": args.images, "chunks_per_image": args.chunks, "chunk_bytes": chunk_bytes}
    with tempfile.TemporaryDirectory(prefix="imagestream-bench-storage-") as work, private_stack(args.port_base):
        work_dir = pathlib.Path(work)
        before_push, before_read = [], []
        for i in tqdm(range(args.images), desc="push (before gc)", unit="image"):
            layout = make_layout(i, args.chunks, chunk_bytes, work_dir)
            before_push.append(push(layout, f"bench/storage-{i}", chunk_bytes, image_bytes))
        for i in tqdm(range(args.images), desc="read (before gc)", unit="image"):
            before_read.append(read(f"bench/storage-{i}"))
        for i in range(half):
            cli("rm", f"bench/storage-{i}")
        started = time.perf_counter()
        time.sleep(2)
        gc_out = cli("gc", "--grace", "1").stdout.strip()  # (0 would mean the store's default, an hour)
        gc_seconds = time.perf_counter() - started
        collected = int(re.search(r"collected (\d+) chunks", gc_out).group(1))  # type: ignore[union-attr]
        if collected < half * args.chunks:
            raise SystemExit(f"gc collected {collected} chunks, not the {half * args.chunks} of the removed images: "
                             f"{gc_out}")
        after_push, after_read = [], []
        for i in tqdm(range(args.images, args.images + half), desc="push (after gc)", unit="image"):
            layout = make_layout(i, args.chunks, chunk_bytes, work_dir)
            after_push.append(push(layout, f"bench/storage-{i}", chunk_bytes, image_bytes))
        for i in tqdm(range(half, args.images + half), desc="read (after gc)", unit="image"):
            after_read.append(read(f"bench/storage-{i}"))
    results |= {
        "chunks_written": args.images * args.chunks + half * args.chunks,
        "gc": {"collected_chunks": collected, "seconds": gc_seconds, "output": gc_out},
        "push_mb_s": {"before": summary(before_push), "after": summary(after_push)},
        "read_mb_s": {"before": summary(before_read), "after": summary(after_read)},
    }
    push_ratio = statistics.median(after_push) / statistics.median(before_push)
    read_ratio = statistics.median(after_read) / statistics.median(before_read)
    results["ratios_after_over_before"] = {"push": push_ratio, "read": read_ratio}
    table = [("measure", "before gc (median)", "after gc (median)", "after / before", "runs"),
             ("push, MB/s (convert + upload of fresh chunks)", f"{statistics.median(before_push):.1f}",
              f"{statistics.median(after_push):.1f}", f"{push_ratio:.2f}", f"{len(before_push)} / {len(after_push)}"),
             ("read from the regional store, MB/s (every chunk of an image)", f"{statistics.median(before_read):.1f}",
              f"{statistics.median(after_read):.1f}", f"{read_ratio:.2f}", f"{len(before_read)} / {len(after_read)}"),
             ("gc", f"{collected} chunks collected", f"in {gc_seconds:.1f} s", "", "1")]
    write_report("storage", results, table, args.out)
    print(json.dumps(results["ratios_after_over_before"]))


if __name__ == "__main__":
    main()
