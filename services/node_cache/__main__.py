"""Run the node cache: `python -m node_cache` (flags or IMAGESTREAM_* variables)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging

import grpc

from imagestream import config, telemetry, tls
from imagestream.periodic import every
from imagestream.digests import Digest
from imagestream.rpc.client import FailoverImageNames, GrpcChunkStore, GrpcImageNames
from imagestream.rpc.server import serve, service_main
from imagestream.store import FailoverStore, MemoryStore, ReadThroughStore, VerifiedStore
from imagestream.store.base import ChunkStore
from imagestream.store.disk import DiskStore
from imagestream.v1 import node_pb2, node_pb2_grpc

from node_cache.downloads import Downloads
from node_cache.fetcher import NodeFetcher
from node_cache.state import StateFile

log = logging.getLogger(__name__)

SETTINGS = ("home", "node_cache_socket", "node_cache_metrics", "node_upstreams", "node_memory_bytes", "fuse_cache_bytes", "node_disk_bytes", "node_disk_dir",
            "node_background_bandwidth", "node_background_concurrency", "node_background_quiet", "node_gc_interval",
            "region", "socket_group", *tls.SETTINGS)


class ApplicationReads(ReadThroughStore):
    """The node's chain as its FUSE client reads it: every read, one served from memory or disk too, counts as an
    application reading (ForegroundGate.touch), so that the rest of an image's background download waits until
    the start has gone quiet instead of taking the CPU from a start whose profile is already local."""

    def __init__(self, cache: ChunkStore, upstream: ChunkStore, fetcher: NodeFetcher, name: str) -> None:
        super().__init__(cache, upstream, name=name)
        self.gate = fetcher.gate

    async def get(self, digest: Digest) -> bytes:
        self.gate.touch()
        return await super().get(digest)

    async def local_path(self, digest: Digest) -> str | None:
        self.gate.touch()
        return await super().local_path(digest)


@dataclasses.dataclass
class Node:
    """The node's tiers: memory over disk over the way upstream."""

    memory: MemoryStore
    disk: DiskStore
    fetcher: NodeFetcher
    store: ReadThroughStore
    gc_chunks: int = 0  # removed by node gc since start
    gc_bytes: int = 0


def build(args: argparse.Namespace) -> Node:
    upstreams = config.parse_list(args.node_upstreams)

    def remote(name: str) -> ChunkStore:
        return FailoverStore([VerifiedStore(GrpcChunkStore(t, name=f"{name} {t}")) for t in upstreams])

    # the background download has connections of its own: its transfers never sit in front of a foreground read
    fetcher = NodeFetcher(remote("foreground"), remote("background"),
                          config.parse_size(args.node_background_bandwidth) or None,
                          quiet_s=float(args.node_background_quiet))
    disk = DiskStore(config.node_disk_dir(), config.parse_size(args.node_disk_bytes))
    memory_tier_bytes, _ = config.node_memory_split(args.node_memory_bytes, args.fuse_cache_bytes)
    memory = MemoryStore(memory_tier_bytes)
    # A chunk is checked once on the node: on its way in (by the upstream chain), or when read back from disk.
    disk_tier = ReadThroughStore(VerifiedStore(disk), fetcher, name="node disk")
    disk_tier.fetch_seconds = telemetry.fetch_histogram().labels("node")
    store = ApplicationReads(memory, disk_tier, fetcher, name="node memory")
    return Node(memory, disk, fetcher, store)


def collect(node: Node, downloads: Downloads):  # type: ignore[no-untyped-def]
    """The node's metrics: its tiers, its fetches, and the background downloads."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    yield from telemetry.tier_families({"node_memory": node.memory, "node_disk": node.disk})
    fetches = CounterMetricFamily("imagestream_node_upstream_fetches", "Chunks the node fetched upstream, by kind",
                                  labels=["kind"])
    fetches.add_metric(["blocking"], node.fetcher.blocking_fetches)
    fetches.add_metric(["background"], node.fetcher.background_fetches)
    fetches.add_metric(["joined"], node.fetcher.joined_fetches)
    yield fetches
    chunks = GaugeMetricFamily("imagestream_download_chunks", "Chunks of a mounted image, by state", labels=["image", "state"])
    nbytes = GaugeMetricFamily("imagestream_download_bytes", "Bytes of a mounted image, by state", labels=["image", "state"])
    for d in downloads.status():
        chunks.add_metric([d.image, "total"], d.chunks_total)
        chunks.add_metric([d.image, "local"], d.chunks_local)
        nbytes.add_metric([d.image, "total"], d.bytes_total)
        nbytes.add_metric([d.image, "local"], d.bytes_local)
    yield chunks
    yield nbytes
    gc_chunks = CounterMetricFamily("imagestream_node_gc_collected_chunks", "Unpinned chunks node gc removed from disk")
    gc_chunks.add_metric([], node.gc_chunks)
    gc_bytes = CounterMetricFamily("imagestream_node_gc_collected_bytes", "Bytes node gc removed from disk")
    gc_bytes.add_metric([], node.gc_bytes)
    yield gc_chunks
    yield gc_bytes


class NodeServicer(node_pb2_grpc.NodeServicer):
    def __init__(self, node: Node, downloads: Downloads) -> None:
        self.node = node
        self.downloads = downloads

    async def StartDownload(self, request, context):  # type: ignore[no-untyped-def]
        try:
            index = Digest.from_proto(request.index)
            first = [Digest.from_proto(d) for d in request.first]
        except Exception as e:  # noqa: BLE001 - malformed request
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        self.downloads.start(request.mount_id, request.image, index, first)
        return node_pb2.StartDownloadResponse()

    async def EndDownload(self, request, context):  # type: ignore[no-untyped-def]
        self.downloads.end(request.mount_id)
        return node_pb2.EndDownloadResponse()

    async def CollectGarbage(self, request, context):  # type: ignore[no-untyped-def]
        return await collect_garbage(self.node, request.dry_run)

    async def GetNodeStatus(self, request, context):  # type: ignore[no-untyped-def]
        n = self.node
        tiers = [
            node_pb2.TierStatus(tier="node memory", hits=n.memory.stats.hits, misses=n.memory.stats.misses,
                                bytes_served=n.memory.stats.bytes_served, size_bytes=n.memory.size_bytes,
                                capacity_bytes=n.memory.capacity_bytes or 0, evictions=n.memory.stats.evictions,
                                peak_bytes=n.memory.peak_bytes),
            node_pb2.TierStatus(tier="node disk", hits=n.disk.stats.hits, misses=n.disk.stats.misses,
                                bytes_served=n.disk.stats.bytes_served, size_bytes=n.disk.size_bytes,
                                capacity_bytes=n.disk.capacity_bytes or 0, evictions=n.disk.stats.evictions),
        ]
        return node_pb2.NodeStatus(
            downloads=self.downloads.status(), tiers=tiers, blocking_fetches=n.fetcher.blocking_fetches,
            background_fetches=n.fetcher.background_fetches, pinned_chunks=n.disk.pinned_chunks,
        )


async def collect_garbage(node: Node, dry_run: bool = False) -> node_pb2.NodeGarbageReport:
    chunks, nbytes = await node.disk.collect_unpinned(dry_run)
    if not dry_run:
        node.gc_chunks += chunks
        node.gc_bytes += nbytes
    log.info("node gc%s: %d unpinned chunks (%.1f MB) removed from the disk cache, %d pinned kept",
             " (dry run)" if dry_run else "", chunks, nbytes / 1e6, node.disk.pinned_chunks)
    return node_pb2.NodeGarbageReport(chunks_collected=chunks, bytes_collected=nbytes,
                                      chunks_pinned=node.disk.pinned_chunks, dry_run=dry_run)


async def main(args: argparse.Namespace) -> None:
    node = build(args)
    downloads = Downloads(node.store, node.disk, node.fetcher, concurrency=int(args.node_background_concurrency),
                          state=StateFile(config.node_disk_dir() / "downloads.json"))
    downloads.resume()
    reaper = asyncio.ensure_future(downloads.reap_forever())
    collector = every(float(args.node_gc_interval), lambda: collect_garbage(node), "node gc")
    names = FailoverImageNames([GrpcImageNames(t) for t in config.parse_list(args.node_upstreams)])
    await serve(
        "node_cache", ["unix:" + config.node_cache_socket()], node.store, names, region=args.region,
        add_servicers=lambda server: node_pb2_grpc.add_NodeServicer_to_server(NodeServicer(node, downloads), server),
        metrics=(args.node_cache_metrics, lambda: collect(node, downloads)),
        on_stop=_stop(downloads, reaper, collector),  # the state file stays: the next start resumes what is under way
    )


def _stop(downloads: Downloads, *tasks: asyncio.Task | None):  # type: ignore[no-untyped-def]
    async def stop() -> None:
        for task in tasks:
            if task is not None:
                task.cancel()
        await downloads.flush()

    return stop


if __name__ == "__main__":
    service_main("node_cache", __doc__, SETTINGS, main)
