"""Run the zonal cache: `python -m zonal_cache` (flags or IMAGESTREAM_* variables)."""

from __future__ import annotations

import argparse
import asyncio
import logging

from imagestream import config, telemetry, tls
from imagestream.errors import Unavailable
from imagestream.rpc.client import FailoverImageNames, GrpcChunkStore, GrpcImageNames
from imagestream.rpc.server import serve, service_main
from imagestream.store import CoalescingStore, FailoverStore, ReadThroughStore, VerifiedStore
from imagestream.store.base import ChunkStore

from zonal_cache.redis_backend import RedisChunkStore

SETTINGS = ("zonal_cache_listen", "zonal_cache_metrics", "redis_url", "redis_username", "redis_password_file",
            "zonal_upstreams", *tls.SETTINGS)


def build(redis_store: ChunkStore, upstreams: list[str]) -> CoalescingStore:
    """The zonal tier: Redis over the regional stores."""
    regional = FailoverStore([VerifiedStore(GrpcChunkStore(t, name=f"regional {t}")) for t in upstreams])
    read_through = ReadThroughStore(VerifiedStore(redis_store), regional, name="zonal")
    read_through.fetch_seconds = telemetry.fetch_histogram().labels("zonal")
    # Requests for one chunk from many nodes at once become one Redis lookup and at most one regional fetch.
    return CoalescingStore(read_through)


async def main(args: argparse.Namespace) -> None:
    upstreams = config.parse_list(args.zonal_upstreams)
    redis_store = RedisChunkStore(args.redis_url, username=args.redis_username,
                                  password=config.read_secret("redis_password_file", args.redis_password_file))
    try:
        await redis_store.check_eviction_policy()
    except Unavailable as e:  # Redis may come up later; reads go upstream meanwhile
        logging.getLogger(__name__).warning("%s", e)
    store = build(redis_store, upstreams)
    names = FailoverImageNames([GrpcImageNames(t) for t in upstreams])

    def collect():  # type: ignore[no-untyped-def]
        from prometheus_client.core import CounterMetricFamily

        yield from telemetry.tier_families({"zonal": store})
        c = CounterMetricFamily("imagestream_coalesced_fetches", "Misses that joined a fetch already under way",
                                labels=["tier"])
        c.add_metric(["zonal"], store.coalesced)
        yield c

    await serve("zonal_cache", config.parse_list(args.zonal_cache_listen), store, names, region=",".join(upstreams),
                metrics=(args.zonal_cache_metrics, collect))


if __name__ == "__main__":
    service_main("zonal_cache", __doc__, SETTINGS, main)
