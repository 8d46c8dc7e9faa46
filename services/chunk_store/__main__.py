"""Run the regional chunk store: `python -m chunk_store` (flags or IMAGESTREAM_* variables)."""

from __future__ import annotations

import argparse
import asyncio

from imagestream import config, telemetry, tls
from imagestream.periodic import every
from chunk_store.distribution.blobs import Distribution, TaggedNames
from chunk_store.distribution.grpc_service import DistributionServicer
from imagestream.rpc.server import serve, service_main
from imagestream.v1 import admin_pb2_grpc, distribution_pb2_grpc, mirror_pb2_grpc

from chunk_store.distribution import http as oci_http
from chunk_store.distribution.cassandra_blobs import CassandraBlobIndex
from chunk_store.admin import RegionalAdminServicer
from chunk_store.cassandra_backend import CassandraChunkStore, CassandraImageNames, connect_from_settings
from chunk_store.gc import GarbageCollector, Leases, LeasesServicer
from chunk_store.healing import HealingStore
from chunk_store.mirror import Mirrors, MirrorsServicer, MirrorTable, families as mirror_families
from chunk_store.tenancy import TenantReads, load_policy

SETTINGS = (
    "chunk_store_listen", "chunk_store_metrics", "distribution_listen", "cassandra_hosts", "cassandra_port",
    "cassandra_keyspace", "cassandra_local_dc", "cassandra_username", "cassandra_password_file", "read_consistency", "write_consistency",
    "scrub_interval", "gc_interval", "gc_grace", "tenants", *tls.SETTINGS,
)


def collect(cassandra: CassandraChunkStore, store: HealingStore, gc: GarbageCollector, mirrors: Mirrors):  # type: ignore[no-untyped-def]
    from prometheus_client.core import CounterMetricFamily

    yield from telemetry.tier_families({"regional": cassandra})
    yield from mirror_families(mirrors)
    healing = CounterMetricFamily("imagestream_regional_corrupt_chunks",
                                  "Regional reads that found a chunk not matching its digest, by outcome",
                                  labels=["outcome"])
    healing.add_metric(["healed"], store.heal_stats.healed)
    healing.add_metric(["quarantined"], store.heal_stats.unhealed)
    yield healing
    totals = gc.totals
    for name, help_, value in (
            ("imagestream_gc_runs", "Garbage collections of the regional store", totals.runs),
            ("imagestream_gc_collected_chunks", "Chunks deleted by garbage collection", totals.chunks_collected),
            ("imagestream_gc_collected_bytes", "Bytes (compressed, as stored) reclaimed by garbage collection",
             totals.bytes_collected),
            ("imagestream_gc_collected_blobs", "Blob records (layers, configs, manifests) deleted by garbage collection",
             totals.blobs_collected)):
        family = CounterMetricFamily(name, help_)
        family.add_metric([], value)
        yield family


async def main(args: argparse.Namespace) -> None:
    db = await asyncio.to_thread(connect_from_settings, vars(args))
    # Bytes read back from Cassandra are checked like any other tier's; a corrupt row is
    # quarantined and healed from a good replica, never deleted (see healing.py).
    cassandra = CassandraChunkStore(db)
    store = HealingStore(cassandra)
    scrubber = every(float(args.scrub_interval), store.scrub, "scrub")
    # what push received, for pulls the normal way: gRPC to write, OCI Distribution (HTTP) to read
    distribution = Distribution(store, await asyncio.to_thread(CassandraBlobIndex, db))
    names = TaggedNames(CassandraImageNames(db), distribution)  # a name's tag comes and goes with it
    leases = Leases(db)
    gc = GarbageCollector(store, names, distribution, leases, float(args.gc_grace))
    collector = every(float(args.gc_interval), gc.collect, "gc")
    # optional per-image read permission, checked here and at the OCI endpoint (tenancy.py)
    reads = TenantReads(load_policy(args.tenants), names, store, distribution) if args.tenants else None
    # pull-through: the OCI endpoint fronts upstream registries and converts their images on first pull
    mirrors = Mirrors(await asyncio.to_thread(MirrorTable, db), store, names, distribution)
    http = await oci_http.start(distribution, args.distribution_listen, reads, mirrors) \
        if args.distribution_listen else None
    try:
        await serve(
            "chunk_store", config.parse_list(args.chunk_store_listen), store, names,
            metrics=(args.chunk_store_metrics, lambda: collect(cassandra, store, gc, mirrors)), reads=reads,
            add_servicers=lambda server: (
                distribution_pb2_grpc.add_DistributionServicer_to_server(DistributionServicer(distribution), server),
                admin_pb2_grpc.add_RegionalAdminServicer_to_server(RegionalAdminServicer(store, gc), server),
                admin_pb2_grpc.add_LeasesServicer_to_server(LeasesServicer(leases), server),
                mirror_pb2_grpc.add_MirrorsServicer_to_server(MirrorsServicer(mirrors), server)),
        )
    finally:
        for job in (scrubber, collector):
            if job is not None:
                job.cancel()
        if http is not None:
            await http.cleanup()
        await asyncio.to_thread(db.close)


if __name__ == "__main__":
    service_main("chunk_store", __doc__, SETTINGS, main)
