"""The lifecycle of an image in the regional store: `rm` takes its OCI tag, `imagestream gc` collects what
nothing references any more (mark and sweep) and keeps what a mounted image (its lease) or a push under
way (the grace period) needs; the node collects its unpinned chunks. Real stack, real FUSE mounts."""

from __future__ import annotations

import asyncio
import os
import pathlib
import random
import re
import threading
import time
import urllib.error
import urllib.request

import pytest

from imagestream import config, tls
from imagestream.digests import Digest
from imagestream.errors import NotFound

from tests.conftest import needs_fuse, run_cli

pytestmark = [pytest.mark.services, needs_fuse]


def layout(tmp: pathlib.Path, name: str, files: dict[str, bytes]) -> pathlib.Path:
    from imagestream_dev import imagebuild

    return imagebuild.layout_of_files(files, tmp / name, tmp)


def data(seed: int, size: int = 2 << 20) -> bytes:
    return random.Random(seed).randbytes(size)


async def _region(fn):  # type: ignore[no-untyped-def]
    from imagestream.rpc.client import GrpcChunkStore, GrpcImageNames

    names, store = GrpcImageNames(config.get("region")), GrpcChunkStore(config.get("region"))
    try:
        return await fn(names, store)
    finally:
        await names.close()
        await store.close()


def image_chunks(name: str) -> set[Digest]:
    """The index and every chunk of a published image (read with gets: a find_missing would mark them used)."""
    from imagestream.index import load_index

    async def fn(names, store):  # type: ignore[no-untyped-def]
        index = Digest.from_proto((await names.resolve(name)).index)
        return {index, *(await load_index(store, index)).chunks()}

    return asyncio.run(_region(fn))


def stored(digests: set[Digest]) -> set[Digest]:
    """Which of these chunks the regional store still has."""
    async def fn(names, store):  # type: ignore[no-untyped-def]
        found = set()
        for d in digests:
            try:
                await store.get(d)
                found.add(d)
            except NotFound:
                pass
        return found

    return asyncio.run(_region(fn))


def gc(*args: str) -> tuple[int, int, str]:
    """(chunks collected, bytes reclaimed, output) of `imagestream gc ARGS`."""
    out = run_cli("gc", *args).stdout
    m = re.search(r"(?:collected|would collect) (\d+) (?:unpinned )?chunks, [\d.]+ MB reclaimed(?: \((\d+) bytes\))?", out)
    assert m, out
    return int(m.group(1)), int(m.group(2) or 0), out


def regional_url(path: str) -> int:
    try:
        with tls.urlopen(f"{os.environ['IMAGESTREAM_DISTRIBUTION_LISTEN']}{path}") as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def layer_digest(name: str) -> str:
    import json

    repository, tag = name.rsplit(":", 1)
    with tls.urlopen(f"{os.environ['IMAGESTREAM_DISTRIBUTION_LISTEN']}/v2/{repository}/manifests/{tag}") as r:
        return json.loads(r.read())["layers"][0]["digest"]


def gc_metric(name: str) -> float:
    with urllib.request.urlopen(f"http://{config.get('chunk_store_metrics')}/metrics") as r:
        text = r.read().decode()
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_gc_collects_a_removed_images_chunks_and_keeps_a_mounted_images(stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    shared = data(1)
    a_files = {"shared/big": shared, "a/unique": data(2)}
    b_files = {"shared/big": shared, "b/unique": data(3), "b/small": b"small file of b\n"}
    run_cli("push", "-q", str(layout(tmp_path, "a", a_files)), "gc/a:v1")
    run_cli("push", "-q", str(layout(tmp_path, "b", b_files)), "gc/b:v1")
    a_chunks, b_chunks = image_chunks("gc/a:v1"), image_chunks("gc/b:v1")
    a_only = a_chunks - b_chunks
    assert len(a_chunks & b_chunks) == 2 and len(a_only) == 3  # the shared file; a's own file and index
    a_layer, b_layer = layer_digest("gc/a:v1"), layer_digest("gc/b:v1")
    mnt = tmp_path / "b-mounted"
    mnt.mkdir()
    run_cli("mount", "--no-download", "gc/b:v1", str(mnt))
    try:
        run_cli("rm", "gc/a:v1")
        assert regional_url("/v2/gc/a/manifests/v1") == 404  # the tag went with the name: no pull the normal way
        assert regional_url("/v2/gc/b/manifests/v1") == 200
        before = gc_metric("imagestream_gc_collected_bytes_total")
        dry, _, _ = gc("--dry-run", "--grace", "1")
        assert dry >= len(a_only) and stored(a_only) == a_only  # a dry run deletes nothing
        time.sleep(1.5)
        collected, reclaimed, out = gc("--grace", "1")
        assert collected >= len(a_only) and reclaimed > 0, out
        assert stored(a_only) == set()  # a's own chunks and index are gone
        assert stored(b_chunks) == b_chunks  # b's, and the ones a shared with it, stay
        assert regional_url(f"/v2/gc/a/blobs/{a_layer}") == 404  # a's layer blob went too, b's stays
        assert regional_url(f"/v2/gc/b/blobs/{b_layer}") == 200
        assert gc_metric("imagestream_gc_collected_bytes_total") >= before + reclaimed
        for path, content in b_files.items():  # the mounted image reads on
            assert (mnt / path).read_bytes() == content

        # the node: what b's reads brought to its disk is not pinned (no download): collected, and read again
        node_collected, _, out = gc("--node")
        assert node_collected > 0, out
        assert gc("--node")[0] == 0
        for path, content in b_files.items():
            assert (mnt / path).read_bytes() == content
    finally:
        run_cli("umount", str(mnt))
        run_cli("rm", "gc/b:v1", check=False)


def leases_on(index: Digest) -> int:
    from imagestream.rpc.client import GrpcLeases

    async def fn() -> int:
        client = GrpcLeases(config.get("region"))
        try:
            return sum(Digest.from_proto(lease.index) == index for lease in await client.list())
        finally:
            await client.close()

    return asyncio.run(fn())


def test_a_mount_lease_keeps_a_removed_image_until_it_is_unmounted(stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    files = {"c/unique": data(4), "c/other": data(5, 300_000)}
    run_cli("push", "-q", str(layout(tmp_path, "c", files)), "gc/c:v1")
    chunks = image_chunks("gc/c:v1")
    index = asyncio.run(_region(lambda names, store: names.resolve("gc/c:v1"))).index
    index = Digest.from_proto(index)
    mnt = tmp_path / "c-mounted"
    mnt.mkdir()
    run_cli("mount", "--no-download", "gc/c:v1", str(mnt))
    try:
        deadline = time.monotonic() + 10
        while not leases_on(index) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert leases_on(index) == 1  # taken by the node's FUSE client as the image attached
        run_cli("rm", "gc/c:v1")
        time.sleep(1.5)
        _, _, out = gc("--grace", "1")
        assert stored(chunks) == chunks, out  # nothing of the mounted image went
        for path, content in files.items():
            assert (mnt / path).read_bytes() == content
    finally:
        run_cli("umount", str(mnt))
    deadline = time.monotonic() + 10
    while leases_on(index) and time.monotonic() < deadline:  # given back with the last attachment
        time.sleep(0.2)
    assert leases_on(index) == 0
    collected, _, out = gc("--grace", "1")
    assert stored(chunks) == set() and collected >= len(chunks), out


def test_a_push_racing_gc_loses_nothing(stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from imagestream.rpc.client import GrpcRegionalAdmin

    grace = 5
    shared = data(6, 3 << 20)
    run_cli("push", "-q", str(layout(tmp_path, "x", {"shared/big": shared, "x/unique": data(7)})), "gc/x:v1")
    x_chunks = image_chunks("gc/x:v1")
    run_cli("rm", "gc/x:v1")
    time.sleep(grace + 1)  # x's chunks are now older than the grace period: fair game, shared ones included
    y_files = {"shared/big": shared, "y/unique": data(8)}
    y_layout = layout(tmp_path, "y", y_files)

    runs: list = []
    spans: list[tuple[float, float]] = []  # (start, end) of each collection
    stop = threading.Event()

    def collect_while_pushing() -> None:
        async def loop() -> None:
            admin = GrpcRegionalAdmin(config.get("region"))
            try:
                while not stop.is_set():
                    started = time.monotonic()
                    runs.append(await admin.collect_garbage(grace))
                    spans.append((started, time.monotonic()))
            finally:
                await admin.close()

        asyncio.run(loop())

    collector = threading.Thread(target=collect_while_pushing)
    collector.start()
    try:
        while not runs:  # a collection has finished before the push starts, more run during it
            time.sleep(0.05)
        push_started = time.monotonic()
        run_cli("push", "-q", str(y_layout), "gc/y:v1")
        push_ended = time.monotonic()
    finally:
        stop.set()
        collector.join(120)
    # the collector was busy collecting while the push ran: a collection ran during it, and some collected
    assert any(start < push_ended and end > push_started for start, end in spans), (spans, push_started, push_ended)
    assert sum(r.chunks_collected for r in runs) > 0
    y_chunks = image_chunks("gc/y:v1")
    assert stored(y_chunks) == y_chunks  # every chunk of the pushed image is there

    async def read_y(names, store):  # type: ignore[no-untyped-def]
        from imagestream.digests import decompress_verified
        from imagestream.index import ROOT_INODE, load_index

        index = await load_index(store, Digest.from_proto((await names.resolve("gc/y:v1")).index))
        out = {}
        for path, content in y_files.items():
            ino = ROOT_INODE
            for part in path.split("/"):
                ino = index.lookup(ino, part.encode())
            body = b""
            for ext in index.inode(ino).extents:
                d = Digest.from_proto(ext.chunk)
                body += decompress_verified(d, await store.get(d))[ext.chunk_offset : ext.chunk_offset + ext.length]
            out[path] = body
        return out

    assert asyncio.run(_region(read_y)) == y_files
    assert stored(x_chunks - y_chunks) == set()  # what only x had was collected meanwhile
    run_cli("rm", "gc/y:v1")
