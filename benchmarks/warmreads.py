"""Warm reads: 4 KiB reads, sequential and random, through the mount against the same files on local disk.

The files are the large image's /opt/filler/large/* (incompressible data the
start-up command never reads), up to a byte budget; the same files sit on local
disk in the debootstrap tree the image was built from. "Warm" means every chunk is
on the node's disk: the image is mounted once with `imagestream mount --wait`
(the background download completes) and unmounted before measuring.

* page cache dropped: `echo 3 > /proc/sys/vm/drop_caches` before each pass, and a
  new mount each pass (a FUSE mount starts with an empty page cache), so the mount
  reads chunk files from the node's disk and the local read comes from the disk;
* page cache hot: the same files read again on the same mount / local tree.
Sequential: every file, 4 KiB at a time, in order. Random: the same number of
random 4 KiB-aligned 4 KiB reads over the files (the same offsets on both sides).
"""

from __future__ import annotations

import os
import pathlib
import random
import statistics
import tempfile
import time

from benchmarks.harness import CACHE, drop_page_cache
from benchmarks.link import OPEN
from benchmarks.setup import Image, Setup, log

BLOCK = 4096


def local_tree(image: Image) -> pathlib.Path:
    from imagestream_dev import imagebuild

    rootfs = imagebuild.build_rootfs(CACHE / "rootfs")
    return rootfs.parent / f"{rootfs.name}-filler{image.filler_mb}m-s0"


def pick_files(root: pathlib.Path, budget_bytes: int) -> list[str]:
    files, total = [], 0
    for p in sorted((root / "opt" / "filler" / "large").rglob("*.bin")):
        if total >= budget_bytes:
            break
        files.append(str(p.relative_to(root)))
        total += p.stat().st_size
    return files


def sequential(root: pathlib.Path, files: list[str]) -> float:
    """MB/s reading every file 4 KiB at a time."""
    n = 0
    started = time.perf_counter()
    for rel in files:
        fd = os.open(root / rel, os.O_RDONLY)
        try:
            while chunk := os.read(fd, BLOCK):
                n += len(chunk)
        finally:
            os.close(fd)
    return n / 1e6 / (time.perf_counter() - started)


def random_reads(root: pathlib.Path, plan: list[tuple[str, int]]) -> float:
    """MB/s of 4 KiB reads at the planned (file, offset) places."""
    fds = {rel: os.open(root / rel, os.O_RDONLY) for rel in dict.fromkeys(r for r, _ in plan)}
    try:
        n = 0
        started = time.perf_counter()
        for rel, off in plan:
            n += len(os.pread(fds[rel], BLOCK, off))
        return n / 1e6 / (time.perf_counter() - started)
    finally:
        for fd in fds.values():
            os.close(fd)


def measure(setup: Setup, image: Image, runs: int, budget_mb: int = 256, random_reads_n: int = 4000) -> dict:
    from fuse_client import mounts

    local = local_tree(image)
    files = pick_files(local, budget_mb << 20)
    if not files:
        raise RuntimeError(f"no filler files under {local}")
    sizes = {rel: (local / rel).stat().st_size for rel in files}
    rng = random.Random(7)
    plan = []
    for _ in range(random_reads_n):
        rel = rng.choice(files)
        plan.append((rel, rng.randrange(0, max(1, sizes[rel] // BLOCK)) * BLOCK))
    mnt = pathlib.Path(tempfile.mkdtemp(prefix="bench-warm-"))
    setup.shape(OPEN)  # the background download that makes the image warm is set-up, not measured
    setup.cli("mount", image.name, str(mnt), "--wait")
    setup.cli("umount", str(mnt))
    r: dict = {"image": image.label, "files": len(files), "bytes": sum(sizes.values()), "block_bytes": BLOCK,
               "random_reads": random_reads_n, "page_cache_droppable": drop_page_cache()}
    keys = [f"{side}_{kind}_{cache}" for side in ("fuse", "disk") for kind in ("seq", "rand")
            for cache in ("dropped", "hot")]
    samples: dict[str, list[float]] = {k: [] for k in keys}
    try:
        for _ in range(runs):
            for kind, fn, arg in (("seq", sequential, files), ("rand", random_reads, plan)):
                drop_page_cache()
                mounts.mount(image.name, mnt)
                try:
                    samples[f"fuse_{kind}_dropped"].append(fn(mnt, arg))
                    samples[f"fuse_{kind}_hot"].append(fn(mnt, arg))
                finally:
                    mounts.unmount(mnt)
                drop_page_cache()
                samples[f"disk_{kind}_dropped"].append(fn(local, arg))
                samples[f"disk_{kind}_hot"].append(fn(local, arg))
    finally:
        if mounts.is_mountpoint(mnt):
            mounts.unmount(mnt)
        os.rmdir(mnt)
    for k in keys:
        r[k] = {"median_mb_s": statistics.median(samples[k]), "samples_mb_s": samples[k]}
    for kind in ("seq", "rand"):
        for cache in ("dropped", "hot"):
            r[f"ratio_{kind}_{cache}"] = (r[f"fuse_{kind}_{cache}"]["median_mb_s"]
                                          / r[f"disk_{kind}_{cache}"]["median_mb_s"])
            log(f"  4 KiB {kind:4} page cache {cache:7}: FUSE {r[f'fuse_{kind}_{cache}']['median_mb_s']:8.1f} MB/s, "
                f"disk {r[f'disk_{kind}_{cache}']['median_mb_s']:8.1f} MB/s, ratio {r[f'ratio_{kind}_{cache}']:.2f}")
    return r
