"""What tracing costs: cold chunk fetches and warm FUSE reads with tracing on (100% sampled) and off.

    python -m benchmarks.tracing [--rounds 3]

One private stack; the tier services are restarted between the two settings,
alternating on/off for --rounds rounds, so both see the same machine.
"On" is the stack's Zipkin with every span kept (OTEL_TRACES_SAMPLER=always_on);
"off" is OTEL_TRACES_EXPORTER=none (the SDK is not even loaded).
Writes docs/benchmarks/tracing.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import statistics
import tempfile
import time

from benchmarks.harness import CACHE, ROOT, drop_page_cache, private_stack, write_report

SERVICES = ("chunk_store", "zonal_cache", "node_cache")


def set_tracing(on: bool) -> None:
    from imagestream_dev.stack import local

    if on:
        os.environ.pop("OTEL_TRACES_EXPORTER", None)
        os.environ["OTEL_TRACES_SAMPLER"] = "always_on"
    else:
        os.environ["OTEL_TRACES_EXPORTER"] = "none"
    for name in reversed(SERVICES):
        local.down(lambda _: None, only=name)
    for name in SERVICES:
        local.up(lambda _: None, only=name)


def cold_fetch_ms(name: str, count: int = 150) -> float:
    """Mean latency of fetching chunks one after another through node -> zonal -> regional, caches empty."""
    from imagestream import config
    from imagestream.digests import Digest
    from imagestream.rpc.client import GrpcChunkStore, GrpcImageNames
    from imagestream.index import load_index
    from imagestream_dev.stack import local

    local.empty_caches()

    async def run() -> float:
        target = "unix:" + config.node_cache_socket()
        store, registry = GrpcChunkStore(target), GrpcImageNames(target)
        try:
            image = await registry.resolve(name)
            chunks = (await load_index(store, Digest.from_proto(image.index))).chunks()[:count]
            started = time.perf_counter()
            for d in chunks:
                await store.get(d)
            return (time.perf_counter() - started) / len(chunks) * 1000
        finally:
            await store.close()
            await registry.close()

    return asyncio.run(run())


def warm_read_mb_s(name: str) -> float:
    """Read every file of the image through a fresh mount, every chunk already on the node, page cache dropped."""
    from fuse_client import mounts
    from imagestream.rpc.client import node_status

    mnt = pathlib.Path(tempfile.mkdtemp())
    m = mounts.mount(name, mnt)
    deadline = time.monotonic() + 300
    while not any(d.done for d in node_status().downloads if d.mount_id == m.download_id):
        if time.monotonic() > deadline:
            raise RuntimeError("background download did not finish")
        time.sleep(0.2)
    mounts.unmount(mnt)
    drop_page_cache()
    mounts.mount(name, mnt)
    started = time.perf_counter()
    total = 0
    for dirpath, _, files in os.walk(mnt):
        for f in files:
            p = pathlib.Path(dirpath) / f
            if p.is_file() and not p.is_symlink():
                total += len(p.read_bytes())
    seconds = time.perf_counter() - started
    mounts.unmount(mnt)
    os.rmdir(mnt)
    return total / 1e6 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from imagestream_dev import imagebuild
    from imagestream_cli.push import push

    image = imagebuild.build_debian_python(CACHE, CACHE / "images", fmt="oci")
    samples: dict[str, dict[str, list[float]]] = {"on": {"cold_fetch_ms": [], "warm_read_mb_s": []},
                                                  "off": {"cold_fetch_ms": [], "warm_read_mb_s": []}}
    with private_stack(port_base=20900):
        push(image, "bench/tracing", progress=False)
        for _ in range(args.rounds):
            for setting in ("on", "off"):
                set_tracing(setting == "on")
                samples[setting]["cold_fetch_ms"].append(cold_fetch_ms("bench/tracing"))
                samples[setting]["warm_read_mb_s"].append(warm_read_mb_s("bench/tracing"))
        os.environ.pop("OTEL_TRACES_EXPORTER", None)
    med = {s: {k: statistics.median(v) for k, v in samples[s].items()} for s in samples}
    table = [
        ("measure", "tracing off", "tracing on (100% sampled, Zipkin)", "on / off"),
        ("cold chunk fetch, node -> zonal -> regional (ms, mean of 150, sequential)",
         f"{med['off']['cold_fetch_ms']:.2f}", f"{med['on']['cold_fetch_ms']:.2f}",
         f"{med['on']['cold_fetch_ms'] / med['off']['cold_fetch_ms']:.2f}"),
        ("warm read of every file through FUSE, chunks on the node (MB/s)",
         f"{med['off']['warm_read_mb_s']:.0f}", f"{med['on']['warm_read_mb_s']:.0f}",
         f"{med['on']['warm_read_mb_s'] / med['off']['warm_read_mb_s']:.2f}"),
    ]
    write_report("tracing", {"rounds": args.rounds, "samples": samples, "medians": med}, table,
                 ROOT / "docs" / "benchmarks")


if __name__ == "__main__":
    main()
