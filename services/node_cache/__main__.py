"""Run the node cache: `python -m node_cache` (flags or IMAGESTREAM_* variables)."""

from __future__ import annotations

import argparse
import asyncio

from imagestream import config
from imagestream.grpc_client import FailoverImageRegistry, GrpcChunkStore, GrpcImageRegistry
from imagestream.grpc_server import serve, setup_logging
from imagestream.store import CoalescingStore, FailoverStore, MemoryStore, ReadThroughStore, VerifiedStore
from imagestream.store.disk import DiskStore

SETTINGS = ("home", "node_cache_socket", "node_upstreams", "node_memory_bytes", "node_disk_bytes", "node_disk_dir",
            "log_level")


def build_store(args: argparse.Namespace) -> ReadThroughStore:
    upstreams = config.parse_list(args.node_upstreams)
    remote = FailoverStore([VerifiedStore(GrpcChunkStore(t)) for t in upstreams])
    disk = DiskStore(config.node_disk_dir(), config.parse_size(args.node_disk_bytes))
    memory = MemoryStore(config.parse_size(args.node_memory_bytes))
    # Memory holds chunks already verified on their way in; disk bytes are checked on every read.
    return ReadThroughStore(
        memory,
        ReadThroughStore(VerifiedStore(disk), CoalescingStore(remote), name="disk"),
        name="node",
    )


async def main(args: argparse.Namespace) -> None:
    store = build_store(args)
    registry = FailoverImageRegistry([GrpcImageRegistry(t) for t in config.parse_list(args.node_upstreams)])
    await serve("node_cache", ["unix:" + (args.node_cache_socket or config.node_cache_socket())], store, registry)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="node_cache", description=__doc__)
    config.add_arguments(parser, *SETTINGS)
    arguments = parser.parse_args()
    if arguments.home:
        import os

        os.environ[config.SETTINGS["home"].env] = arguments.home
    setup_logging(arguments.log_level)
    asyncio.run(main(arguments))
