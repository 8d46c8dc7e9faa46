"""Run the regional chunk store: `python -m chunk_store` (flags or IMAGESTREAM_* variables)."""

from __future__ import annotations

import argparse
import asyncio

from imagestream import config, telemetry
from chunk_store.distribution.blobs import Distribution
from chunk_store.distribution.grpc_service import DistributionServicer
from imagestream.rpc.server import serve, service_main
from imagestream.store import VerifiedStore
from imagestream.v1 import distribution_pb2_grpc

from chunk_store.distribution import http as oci_http
from chunk_store.distribution.cassandra_blobs import CassandraBlobIndex
from chunk_store.cassandra_backend import CassandraChunkStore, CassandraImageNames, connect_from_settings

SETTINGS = (
    "chunk_store_listen", "chunk_store_metrics", "distribution_listen", "cassandra_hosts", "cassandra_port",
    "cassandra_keyspace", "cassandra_replication", "cassandra_local_dc", "read_consistency", "write_consistency",
)


async def main(args: argparse.Namespace) -> None:
    db = await asyncio.to_thread(connect_from_settings, vars(args))
    # Bytes read back from Cassandra are checked like any other tier's: a corrupt
    # row is deleted and reported missing rather than served.
    cassandra = CassandraChunkStore(db)
    store = VerifiedStore(cassandra)
    names = CassandraImageNames(db)
    # what push received, for pulls the normal way: gRPC to write, OCI Distribution (HTTP) to read
    distribution = Distribution(store, await asyncio.to_thread(CassandraBlobIndex, db))
    http = await oci_http.start(distribution, args.distribution_listen) if args.distribution_listen else None
    try:
        await serve(
            "chunk_store", config.parse_list(args.chunk_store_listen), store, names,
            metrics=(args.chunk_store_metrics, lambda: telemetry.tier_families({"regional": cassandra})),
            add_servicers=lambda server: distribution_pb2_grpc.add_DistributionServicer_to_server(
                DistributionServicer(distribution), server),
        )
    finally:
        if http is not None:
            await http.cleanup()
        await asyncio.to_thread(db.close)


if __name__ == "__main__":
    service_main("chunk_store", __doc__, SETTINGS, main)
