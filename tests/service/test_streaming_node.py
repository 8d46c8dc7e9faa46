"""The node while an image is mounted: background download, foreground priority, startup profiles, memory bound.

Real stack (Redis, Cassandra, tier services) and real FUSE mounts.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import pathlib
import random
import tarfile
import threading
import time

import pytest

from fuse_client import mounts
from imagestream import config
from imagestream.rpc.client import GrpcImageNames, node_status
from imagestream_dev.stack import local

from tests.conftest import needs_fuse, run_cli

pytestmark = [pytest.mark.services, needs_fuse]


def download_of(mountpoint: pathlib.Path):  # type: ignore[no-untyped-def]
    m = mounts.Mount.find(str(mountpoint))
    return next((d for d in node_status().downloads if d.mount_id == m.download_id), None)


def wait_until(predicate, timeout: float = 120.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def restart_node(**settings: str) -> None:
    """Restart the node cache with some settings changed (or back to normal with none)."""
    local.down(print, "node_cache")
    for name in ("IMAGESTREAM_NODE_BACKGROUND_BANDWIDTH", "IMAGESTREAM_NODE_MEMORY_BYTES"):
        os.environ.pop(name, None)
    os.environ.update(settings)
    local.up(print, "node_cache")


def big_image(tmp: pathlib.Path, megabytes: int) -> tuple[pathlib.Path, bytes]:
    from imagestream_dev import imagebuild

    data = random.Random(megabytes).randbytes(megabytes << 20)
    layer = tmp / "layer.tar"
    with tarfile.open(layer, "w") as tar:
        info = tarfile.TarInfo("big.bin")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    imagebuild.write_oci_layout_from_layers([layer], tmp / "image", compression="none")
    return tmp / "image", data


@pytest.fixture(scope="module")
def debian_pushed(stack, debian_image):  # type: ignore[no-untyped-def]
    run_cli("push", "-q", str(debian_image), "debian-python:node")
    return "debian-python:node"


def test_foreground_read_does_not_wait_for_the_background_download(stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    image, data = big_image(tmp_path, 48)
    run_cli("push", "-q", str(image), "big/priority")
    local.empty_caches()
    restart_node(IMAGESTREAM_NODE_BACKGROUND_BANDWIDTH="2MiB")  # the background crawls: 48 MB take ~24 s
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        mounts.mount("big/priority", mnt)
        wait_until(lambda: (d := download_of(mnt)) and d.chunks_local > 0, what="the background download to start")
        before = node_status().blocking_fetches
        with open(mnt / "big.bin", "rb") as f:  # the end of the file: the background reaches it last
            f.seek(len(data) - 3 * (1 << 20))
            tail = f.read()
        after = node_status()
        d = download_of(mnt)
        assert tail == data[-3 * (1 << 20):]
        assert after.blocking_fetches > before  # the read fetched its chunks itself ...
        assert d.chunks_local < d.chunks_total - 10  # ... while most of the image was still queued behind it
        assert not d.done
    finally:
        mounts.unmount(mnt)
        restart_node()


def test_after_the_background_download_the_image_reads_with_every_upstream_down(
        stack, debian_pushed, debian_rootfs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    local.empty_caches()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounts.mount(debian_pushed, mnt)
    try:
        d = wait_until(lambda: (d := download_of(mnt)) and d.done and d, timeout=300, what="the download to finish")
        assert d.chunks_local == d.chunks_total > 100 and not d.stalled
        for name in ("zonal_cache", "chunk_store", "cassandra", "redis"):
            local.down(print, name)
        compared = 0
        for dirpath, _, files in os.walk(debian_rootfs):
            for name in files:
                src = pathlib.Path(dirpath) / name
                if src.is_symlink() or not src.is_file():
                    continue
                rel = src.relative_to(debian_rootfs)
                assert hashlib.sha256((mnt / rel).read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest(), rel
                compared += 1
        assert compared > 5000
    finally:
        mounts.unmount(mnt)
        local.up(print)


def test_a_startup_profile_makes_a_cold_start_block_less(stack, debian_image) -> None:  # type: ignore[no-untyped-def]
    name = "debian-python:profiled"
    run_cli("push", "-q", str(debian_image), name)
    program = "import json, sqlite3, decimal, email.parser, asyncio, http.server, logging, argparse; print('ok')"

    def cold_run() -> int:
        local.empty_caches()  # node memory and disk, and the zonal cache, are empty; the node restarts
        assert run_cli("run", name, "--", "python3", "-c", program).stdout.strip() == "ok"
        return node_status().blocking_fetches

    first = cold_run()  # no profile yet: this run records one

    async def resolve():  # type: ignore[no-untyped-def]
        registry = GrpcImageNames(config.get("region"))
        try:
            return await registry.resolve(name)
        finally:
            await registry.close()

    # the profile is uploaded after the run, off its critical path
    wait_until(lambda: asyncio.run(resolve()).profile.hash, timeout=60, what="the first run's startup profile")
    second = cold_run()
    assert second < first, (first, second)


def test_memory_cache_stays_within_a_small_budget_under_many_readers(stack, debian_pushed, tmp_path) -> None:  # type: ignore[no-untyped-def]
    budget = 4 << 20
    local.empty_caches()
    # a slow background download, so the readers' chunks come through the memory tier
    restart_node(IMAGESTREAM_NODE_MEMORY_BYTES=str(budget), IMAGESTREAM_NODE_BACKGROUND_BANDWIDTH="1MiB")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        mounts.mount(debian_pushed, mnt)
        paths = [pathlib.Path(dp) / f for dp, _, fs in os.walk(mnt / "usr/lib/python3.11") for f in fs]
        errors: list[BaseException] = []

        def reader(offset: int) -> None:
            try:
                for p in paths[offset::16]:
                    if p.is_file() and not p.is_symlink():
                        p.read_bytes()
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        memory = next(t for t in node_status().tiers if t.tier == "node memory")
        # the node cache's share of the reservation: the FUSE client's chunk cache has the rest
        share, _ = config.node_memory_split(str(budget), "")
        assert memory.capacity_bytes == share < budget
        assert memory.misses > 50  # the readers did go through the memory tier
        assert 0 < memory.peak_bytes <= share and memory.size_bytes <= share
    finally:
        mounts.unmount(mnt)
        restart_node()
