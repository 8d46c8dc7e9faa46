"""Node memory under load: resident memory of the node's processes against the memory reservation.

    python -m benchmarks.memory [--budget 64MiB] [--readers 32]

On a private stack with the node's memory reservation set to --budget, mounts
the Debian image cold and has many concurrent readers read every file of it,
while sampling the resident memory (VmRSS) of the node cache and the FUSE
client. Writes docs/benchmarks/memory.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import threading
import time

from benchmarks.harness import CACHE, ROOT, private_stack, write_report


def rss_bytes(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="64MiB")
    parser.add_argument("--readers", type=int, default=32)
    args = parser.parse_args()

    from fuse_client import mounts
    from imagestream import config
    from imagestream_dev import imagebuild
    from imagestream_dev.stack import local

    budget = config.parse_size(args.budget)
    image = imagebuild.build_debian_python(CACHE, CACHE / "images", fmt="oci")
    os.environ["IMAGESTREAM_NODE_MEMORY_BYTES"] = str(budget)
    with private_stack(port_base=20700):
        from imagestream_cli.push import push

        push(image, "bench/memory", progress=False)
        local.empty_caches()
        node_pid = local.running_pid("node_cache")
        mnt = pathlib.Path(tempfile.mkdtemp())
        m = mounts.mount("bench/memory", mnt)
        files = [pathlib.Path(dp) / f for dp, _, fs in os.walk(mnt) for f in fs]
        files = [f for f in files if f.is_file() and not f.is_symlink()]
        samples: list[tuple[float, int, int]] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                samples.append((time.monotonic(), rss_bytes(node_pid), rss_bytes(m.pid)))
                time.sleep(0.1)

        def reader(i: int) -> None:
            for f in files[i :: args.readers]:
                f.read_bytes()

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.monotonic()
        threads = [threading.Thread(target=reader, args=(i,)) for i in range(args.readers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        done.set()
        sampler.join()
        from imagestream.rpc.client import node_status

        status = node_status()
        mounts.unmount(mnt)
        os.rmdir(mnt)
    memory_tier = next(t for t in status.tiers if t.tier == "node memory")
    peak_node = max(s[1] for s in samples)
    peak_fuse = max(s[2] for s in samples)
    baseline_node, baseline_fuse = samples[0][1], samples[0][2]
    growth = peak_node - baseline_node
    node_memory_tier, fuse_cache = config.node_memory_split(config.get("node_memory_bytes"), config.get("fuse_cache_bytes"))
    r = {"budget_bytes": budget, "readers": args.readers, "files": len(files), "seconds": elapsed,
         "node_cache_rss_peak": peak_node, "node_cache_rss_at_start": baseline_node,
         "node_cache_growth": growth, "node_cache_growth_beyond_memory_tier": growth - memory_tier.peak_bytes,
         "fuse_client_rss_at_start": baseline_fuse, "fuse_client_rss_peak": peak_fuse,
         "fuse_client_chunk_cache_bound": fuse_cache, "node_memory_tier_bound": node_memory_tier,
         "memory_tier_peak_bytes": memory_tier.peak_bytes, "memory_tier_evictions": memory_tier.evictions,
         "samples": samples}
    mb = lambda n: f"{n / 2**20:.0f} MiB"  # noqa: E731
    table = [
        ("what", "value"),
        ("memory reservation (IMAGESTREAM_NODE_MEMORY_BYTES): node cache's memory tier + FUSE client's chunk cache",
         f"{mb(budget)} = {mb(node_memory_tier)} + {mb(fuse_cache)}"),
        ("concurrent readers / files read", f"{args.readers} / {len(files)} in {elapsed:.1f} s"),
        ("memory tier: peak held (accounted) bytes", f"{mb(memory_tier.peak_bytes)} ({memory_tier.evictions} evictions)"),
        ("node_cache RSS: at start / peak / growth", f"{mb(baseline_node)} / {mb(peak_node)} / {mb(growth)}"),
        ("  growth beyond what the memory tier held (process overhead under load)",
         mb(growth - memory_tier.peak_bytes)),
        ("fuse_client RSS (one per node, every image): at start / peak", f"{mb(baseline_fuse)} / {mb(peak_fuse)}"),
        ("  of which its chunk cache can hold, for every image (IMAGESTREAM_FUSE_CACHE_BYTES, within the reservation)",
         mb(fuse_cache)),
    ]
    write_report("memory", r, table, ROOT / "docs" / "benchmarks")


if __name__ == "__main__":
    main()
