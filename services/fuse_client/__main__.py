"""Mount one image: `python -m fuse_client NAME MOUNTPOINT` (usually started by `imagestream mount`).

Resolves NAME and fetches only its index through the node cache, mounts, tells
the parent it is ready (on --ready-fd), and serves until unmounted or SIGTERM.
Chunks are read through the node cache only; a startup profile recorded here is
stored in the regional store (IMAGESTREAM_REGION), the one tier that takes writes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import time

import pyfuse3
import pyfuse3.asyncio

from imagestream import config, telemetry
from imagestream.digests import Digest
from imagestream.rpc.client import GrpcChunkStore, GrpcImageNames, NodeClient
from imagestream.rpc.server import setup_logging
from imagestream.index import load_index
from fuse_client.profiles import load_profile, save_profile, should_record

from fuse_client.filesystem import ImageFilesystem
from fuse_client.reader import ChunkReader

log = logging.getLogger("fuse_client")


def _tell_parent(fd: int | None, message: dict) -> None:
    if fd is None:
        return
    try:
        os.write(fd, (json.dumps(message) + "\n").encode())
        os.close(fd)
    except OSError:
        pass


def _raise_kernel_readahead(mountpoint: str, kib: int = 4096) -> None:
    """Let the kernel read ahead 4 MiB (FUSE mounts get 128 KiB), so a sequential reader's requests are
    large and arrive early: measured 178 -> 276 MB/s on a node-local 200 MB file (docs/benchmarks/core.md)."""
    target = mountpoint  # already resolved: resolving it now would ask this very filesystem
    device = None
    with open("/proc/self/mountinfo") as f:  # not os.stat(): that would ask this very filesystem, not yet served
        for line in f:
            fields = line.split()
            if fields[4] == target:
                device = fields[2]
    try:
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as f:
            f.write(str(kib))
    except OSError as e:
        log.info("kernel readahead left at its default for %s: %s", target, e)


async def run(args: argparse.Namespace) -> None:
    started = time.monotonic()
    target = "unix:" + config.node_cache_socket()
    timeout = float(args.fetch_timeout)
    # the node cache sits on this machine: a chunk on its disk comes back as its file's path
    store = GrpcChunkStore(target, name="node cache", timeout_s=timeout, accept_local_path=True)
    names = GrpcImageNames(target, timeout_s=timeout)
    node = NodeClient(target, timeout_s=timeout)
    try:
        image = await names.resolve(args.name)
        index_digest = Digest.from_proto(image.index)
        index = await load_index(store, index_digest)
    except Exception as e:
        _tell_parent(args.ready_fd, {"error": f"cannot mount {args.name!r}: {e}"})
        raise SystemExit(1) from None
    reader = ChunkReader(store, index, timeout_s=timeout, retries=int(args.fetch_retries))
    recording = should_record(args.profile, image)
    if recording:
        reader.touched = []
    fs = ImageFilesystem(index, reader, args.name)
    if args.record_reads:
        fs.recorded = []
    options = set(pyfuse3.default_options)
    options |= {f"fsname=imagestream:{args.name}", "subtype=imagestream", "ro", "default_permissions", "nodev"}
    if os.geteuid() == 0:
        options.add("allow_other")  # the container's processes run as other users
    args.mountpoint = os.path.realpath(args.mountpoint)
    try:
        pyfuse3.init(fs, args.mountpoint, options)
    except Exception as e:
        _tell_parent(args.ready_fd, {"error": f"cannot mount on {args.mountpoint}: {e}"})
        raise SystemExit(1) from None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, pyfuse3.terminate)
    loop.add_signal_handler(signal.SIGINT, pyfuse3.terminate)

    async def after_init() -> None:
        """Ready once the kernel has our INIT reply and the larger readahead: a file opened before that
        would keep the 128 KiB default for as long as it is open."""
        try:
            await asyncio.wait_for(fs.initialized.wait(), 5)
            await asyncio.sleep(0.01)  # the kernel sets the mount's readahead from our INIT reply: go after it
            await asyncio.to_thread(_raise_kernel_readahead, args.mountpoint)
        except TimeoutError:
            log.warning("no INIT from the kernel within 5 s; readahead left at its default")
        mount_s = time.monotonic() - started
        log.info("ImageStreaming: streaming %s (index %s, %d inodes) on %s, mounted in %.3f s",
                 args.name, image.index.hash[:12], len(index.inodes), args.mountpoint, mount_s)
        _tell_parent(args.ready_fd, {"ok": True, "pid": os.getpid(), "mount_seconds": mount_s,
                                     "index": image.index.hash, "inodes": len(index.inodes),
                                     "profile": bool(image.profile.hash), "recording_profile": recording})

    async def start_download() -> None:
        # the profile's chunks first (fetched in parallel right after mount), then the whole image
        first = await load_profile(store, image)
        try:
            await node.start_download(mount_id, args.name, index_digest, first)
        except Exception as e:  # noqa: BLE001 - streaming works without it
            log.warning("background download of %s not started: %s", args.name, e)
            return
        log.info("background download of %s started (%d chunks first from its startup profile)", args.name, len(first))

    mount_id = f"{os.getpid()}:{args.mountpoint}"
    background = [asyncio.ensure_future(after_init())]
    if args.download:
        background.append(asyncio.ensure_future(start_download()))
    try:
        await pyfuse3.main()
    finally:
        for task in background:
            task.cancel()
        pyfuse3.close(unmount=True)
        log.info("unmounted %s; %d reads, %d chunks fetched (%d bytes, %d read from files the node named), %d readaheads",
                 args.mountpoint, fs.reads, reader.fetches, reader.fetched_bytes, store.local_reads, reader.readaheads)
        try:
            await node.end_download(mount_id)
            if recording and reader.touched:
                digest = await save_profile(args.region, image, reader.touched, timeout_s=timeout)
                log.info("startup profile of %s recorded in %s: %d chunks (%s)",
                         args.name, args.region, len(reader.touched), digest)
        except Exception as e:  # noqa: BLE001 - the unmount itself must finish
            log.warning("after unmount of %s: %s", args.name, e)
        await store.close()
        await names.close()
        await node.close()
        if fs.recorded is not None:
            write_recording(args.record_reads, index, fs.recorded)
        telemetry.shutdown()  # flush the last spans


def write_recording(path: str, index, recorded: list[tuple[int, int, int]]) -> None:  # type: ignore[no-untyped-def]
    """One JSON line per read, in order, with the file's path so it can be mapped onto another index."""
    paths = {ino: p.decode("utf-8", "surrogateescape") for p, ino in index.walk()}
    with open(path, "w") as f:
        for ino, offset, size in recorded:
            f.write(json.dumps({"inode": ino, "offset": offset, "size": size, "path": paths.get(ino, "")}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(prog="fuse_client", description=__doc__)
    parser.add_argument("name")
    parser.add_argument("mountpoint")
    parser.add_argument("--ready-fd", type=int, default=None, help="write one JSON line here once mounted")
    parser.add_argument("--no-download", dest="download", action="store_false",
                        help="stream only; do not fetch the whole image in the background")
    config.add_arguments(parser, "node_cache_socket", "region", "fetch_timeout", "fetch_retries", "profile",
                         "record_reads", "log_level")
    args = parser.parse_args()
    if args.node_cache_socket:
        os.environ[config.SETTINGS["node_cache_socket"].env] = args.node_cache_socket
    setup_logging(args.log_level)
    telemetry.setup_tracing("fuse_client")
    pyfuse3.asyncio.enable()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
