"""Mount one image: `python -m fuse_client NAME MOUNTPOINT` (usually started by `imagestream mount`).

Resolves NAME and fetches only its index through the node cache, mounts, tells
the parent it is ready (on --ready-fd), and serves until unmounted or SIGTERM.
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

from imagestream import config
from imagestream.digests import Digest
from imagestream.grpc_client import GrpcChunkStore, GrpcImageRegistry
from imagestream.grpc_server import setup_logging
from imagestream.index import load_index

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


async def run(args: argparse.Namespace) -> None:
    started = time.monotonic()
    target = "unix:" + (args.node_cache_socket or config.node_cache_socket())
    timeout = float(args.fetch_timeout)
    store = GrpcChunkStore(target, name="node cache", timeout_s=timeout)
    registry = GrpcImageRegistry(target, timeout_s=timeout)
    try:
        image = await registry.resolve(args.name)
        index = await load_index(store, Digest.from_proto(image.index))
    except Exception as e:
        _tell_parent(args.ready_fd, {"error": f"cannot mount {args.name!r}: {e}"})
        raise SystemExit(1) from None
    reader = ChunkReader(store, index, timeout_s=timeout, retries=int(args.fetch_retries))
    fs = ImageFilesystem(index, reader)
    options = set(pyfuse3.default_options)
    options |= {f"fsname=imagestream:{args.name}", "subtype=imagestream", "ro", "default_permissions", "nodev"}
    if os.geteuid() == 0:
        options.add("allow_other")  # the container's processes run as other users
    try:
        pyfuse3.init(fs, args.mountpoint, options)
    except Exception as e:
        _tell_parent(args.ready_fd, {"error": f"cannot mount on {args.mountpoint}: {e}"})
        raise SystemExit(1) from None
    mount_s = time.monotonic() - started
    log.info("mounted %s (index %s, %d inodes) on %s in %.3f s",
             args.name, image.index.hash[:12], len(index.inodes), args.mountpoint, mount_s)
    _tell_parent(args.ready_fd, {"ok": True, "pid": os.getpid(), "mount_seconds": mount_s,
                                 "index": image.index.hash, "inodes": len(index.inodes)})

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, pyfuse3.terminate)
    loop.add_signal_handler(signal.SIGINT, pyfuse3.terminate)
    try:
        await pyfuse3.main()
    finally:
        pyfuse3.close(unmount=True)
        await store.close()
        await registry.close()
        log.info("unmounted %s; %d reads, %d chunks fetched (%d bytes), %d readaheads",
                 args.mountpoint, fs.reads, reader.fetches, reader.fetched_bytes, reader.readaheads)


def main() -> None:
    parser = argparse.ArgumentParser(prog="fuse_client", description=__doc__)
    parser.add_argument("name")
    parser.add_argument("mountpoint")
    parser.add_argument("--ready-fd", type=int, default=None, help="write one JSON line here once mounted")
    config.add_arguments(parser, "node_cache_socket", "fetch_timeout", "fetch_retries", "log_level")
    args = parser.parse_args()
    setup_logging(args.log_level)
    pyfuse3.asyncio.enable()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
