"""Garbage collection of the regional store, mark and sweep, and the mount leases it honours.

Mark: what is live is what can be reached from
  * every published name: its index (and every chunk the index names), its startup profile, and the OCI
    manifest kept for it (its pieces, its config and layer blobs and their pieces);
  * every tag of the OCI endpoint: the manifest it names, likewise;
  * every mount lease not expired: the index a node has mounted, whatever became of the name.
Sweep: every chunk and blob record not live is deleted, unless a push has written it or found it
stored (the `used_at` the store keeps) within the grace period: a push under way uploads chunks long
before it publishes the name that makes them live, and relies on chunks it found stored. Each delete is
conditional (`IF used_at = <what the sweep read>`, a Cassandra lightweight transaction), so a push
that marks a chunk used between the read and the delete keeps it. A push that takes longer than the
grace period between its first upload and its publish may lose chunks to a gc; its publish then fails
(the store refuses a name whose chunks are not all stored) and it can be run again: no name ever
points at a missing chunk. If any live index cannot be read, nothing is swept.

Mount leases: a node's FUSE client takes a lease on the index of each image it has attached and
renews it while attached (`fuse_client/leases.py`); a lease row carries a Cassandra TTL, so a node
that dies stops protecting its images once the lease expires.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time

from imagestream.digests import Digest
from imagestream.errors import FailedPrecondition, ImagestreamError, InvalidArgument, NotFound
from imagestream.index import load_index
from imagestream.names import ImageNames
from imagestream.oci import check_digest
from imagestream.rpc.server import status_on_error
from imagestream.v1 import admin_pb2, admin_pb2_grpc

from chunk_store.cassandra_backend import CassandraChunkStore, CassandraConnection, now_ms
from chunk_store.distribution.blobs import Distribution
from chunk_store.healing import HealingStore

log = logging.getLogger(__name__)

DEFAULT_LEASE_TTL_S = 300
MAX_LEASE_TTL_S = 24 * 3600


class Leases:
    """Mount leases in Cassandra: (holder, index) -> image, expiry; each row expires with its TTL."""

    def __init__(self, db: CassandraConnection) -> None:
        self.db = db
        self._put = db.prepare("INSERT INTO {ks}.leases (holder, index_hash, index_size, image, expires_at)"
                               " VALUES (?, ?, ?, ?, ?) USING TTL ?", write=True)
        self._delete = db.prepare("DELETE FROM {ks}.leases WHERE holder = ? AND index_hash = ? AND index_size = ?",
                                  write=True)
        self._all = db.prepare("SELECT holder, index_hash, index_size, image, expires_at FROM {ks}.leases", write=False)

    async def renew(self, holder: str, index: Digest, image: str, ttl_s: int) -> admin_pb2.Lease:
        if not holder or len(holder) > 255:
            raise InvalidArgument("a lease needs a holder of 1..255 characters")
        if not 0 <= ttl_s <= MAX_LEASE_TTL_S:
            raise InvalidArgument(f"lease ttl {ttl_s} s: want 0..{MAX_LEASE_TTL_S} (0: {DEFAULT_LEASE_TTL_S})")
        ttl_s = ttl_s or DEFAULT_LEASE_TTL_S
        expires_at = int(time.time()) + ttl_s
        await self.db.execute(self._put, (holder, index.hash, index.size, image[:255], expires_at, ttl_s))
        return admin_pb2.Lease(holder=holder, index=index.to_proto(), image=image, expires_at=expires_at)

    async def release(self, holder: str, index: Digest) -> None:
        await self.db.execute(self._delete, (holder, index.hash, index.size))

    async def live(self) -> list[admin_pb2.Lease]:
        now = int(time.time())
        return [admin_pb2.Lease(holder=r.holder, index=Digest(r.index_hash, r.index_size).to_proto(), image=r.image or "",
                                expires_at=r.expires_at)
                for r in await self.db.execute(self._all) if (r.expires_at or 0) > now]


@dataclasses.dataclass
class GcTotals:
    """Counters since the store started, for metrics."""

    runs: int = 0
    chunks_collected: int = 0
    bytes_collected: int = 0
    blobs_collected: int = 0


class GarbageCollector:
    def __init__(self, store: HealingStore, names: ImageNames, distribution: Distribution, leases: Leases,
                 default_grace_s: float) -> None:
        self.store = store
        self.chunks: CassandraChunkStore = store.inner
        self.names = names
        self.distribution = distribution
        self.leases = leases
        self.default_grace_s = default_grace_s
        self.totals = GcTotals()
        self._lock = asyncio.Lock()  # one collection at a time in this process

    async def _manifest_blobs(self, digest: str, live_blobs: set[str]) -> None:
        """Mark a manifest and the config and layer blobs it names."""
        live_blobs.add(check_digest(digest))
        try:
            record = await self.distribution.blob(digest)
        except NotFound:
            return
        try:
            doc = json.loads(await self.distribution.read_all(record))
            live_blobs.update(check_digest(d["digest"]) for d in [doc["config"], *(doc.get("layers") or [])])
        except (ValueError, KeyError, TypeError, InvalidArgument) as e:
            raise FailedPrecondition(f"gc: manifest {digest} cannot be read ({e}); nothing collected") from None

    async def mark(self) -> tuple[set[Digest], set[str], admin_pb2.GarbageReport]:
        report = admin_pb2.GarbageReport()
        live_chunks: set[Digest] = set()
        live_blobs: set[str] = set()
        indexes: set[Digest] = set()
        images = await self.names.list()
        report.names = len(images)
        for image in images:
            indexes.add(Digest.from_proto(image.index))
            if image.profile.hash:
                live_chunks.add(Digest.from_proto(image.profile))
            if image.manifest_digest:
                await self._manifest_blobs(image.manifest_digest, live_blobs)
        tags = await self.distribution.index.all_tags()
        report.tags = len(tags)
        for _, _, digest in tags:
            await self._manifest_blobs(digest, live_blobs)
        leases = await self.leases.live()
        report.leases = len(leases)
        indexes.update(Digest.from_proto(lease.index) for lease in leases)
        for index in indexes:
            try:
                loaded = await load_index(self.store, index)
            except ImagestreamError as e:
                raise FailedPrecondition(f"gc: index {index} cannot be read ({e}); nothing collected") from None
            live_chunks.add(index)
            live_chunks.update(loaded.chunks())
        for digest in live_blobs:
            try:
                record = await self.distribution.blob(digest)
            except NotFound:
                continue
            live_chunks.update(record.pieces)
        report.live_chunks = len(live_chunks)
        return live_chunks, live_blobs, report

    async def collect(self, grace_s: float | None = None, dry_run: bool = False) -> admin_pb2.GarbageReport:
        grace_s = self.default_grace_s if grace_s is None else grace_s
        async with self._lock:
            started = time.monotonic()
            # what a push marked used after this instant is kept, however long the collection takes
            cutoff = now_ms() - int(grace_s * 1000)
            live_chunks, live_blobs, report = await self.mark()
            report.dry_run = dry_run
            await self._sweep_blobs(live_blobs, cutoff, dry_run, report)
            await self._sweep_chunks(live_chunks, cutoff, dry_run, report)
            report.seconds = time.monotonic() - started
            if not dry_run:
                self.totals.runs += 1
                self.totals.chunks_collected += report.chunks_collected
                self.totals.bytes_collected += report.bytes_collected
                self.totals.blobs_collected += report.blobs_collected
            log.info("gc%s: %d names, %d tags, %d leases -> %d live chunks; collected %d chunks (%.1f MB) and %d "
                     "blob records, kept %d recent, in %.1f s", " (dry run)" if dry_run else "", report.names,
                     report.tags, report.leases, report.live_chunks, report.chunks_collected,
                     report.bytes_collected / 1e6, report.blobs_collected, report.chunks_kept_recent, report.seconds)
            return report

    async def _sweep_blobs(self, live: set[str], cutoff: int, dry_run: bool, report: admin_pb2.GarbageReport) -> None:
        for digest, used_at in await self.distribution.index.all_blobs():
            if digest in live or (used_at or 0) >= cutoff:
                continue
            if dry_run or await self.distribution.index.delete_blob_if(digest, used_at):
                report.blobs_collected += 1

    async def _sweep_chunks(self, live: set[Digest], cutoff: int, dry_run: bool,
                            report: admin_pb2.GarbageReport, concurrency: int = 16) -> None:
        keys: asyncio.Queue[tuple[str, int] | None] = asyncio.Queue(maxsize=1000)
        loop = asyncio.get_running_loop()

        def produce() -> None:  # the key listing is a blocking, paged scan
            try:
                for key in self.chunks.all_digests():
                    asyncio.run_coroutine_threadsafe(keys.put(key), loop).result()
            finally:
                for _ in range(concurrency):
                    asyncio.run_coroutine_threadsafe(keys.put(None), loop).result()

        async def sweep() -> None:
            while (key := await keys.get()) is not None:
                digest = Digest(*key)
                if digest in live:
                    continue
                usage = await self.chunks.usage(digest)
                if usage is None:
                    continue  # gone already
                used_at, stored = usage
                if (used_at or 0) >= cutoff:
                    report.chunks_kept_recent += 1
                    continue
                if dry_run or await self.chunks.delete_if_unused_since(digest, used_at):
                    report.chunks_collected += 1
                    report.bytes_collected += stored or 0

        producer = asyncio.ensure_future(asyncio.to_thread(produce))
        await asyncio.gather(*(sweep() for _ in range(concurrency)))
        await producer


class LeasesServicer(admin_pb2_grpc.LeasesServicer):
    """Mount leases, taken and renewed by nodes (their FUSE clients)."""

    def __init__(self, leases: Leases) -> None:
        self.leases = leases

    async def RenewLease(self, request, context):  # type: ignore[no-untyped-def]
        async with status_on_error(context):
            return await self.leases.renew(request.holder, Digest.from_proto(request.index), request.image,
                                           request.ttl_seconds)

    async def ReleaseLease(self, request, context):  # type: ignore[no-untyped-def]
        async with status_on_error(context):
            await self.leases.release(request.holder, Digest.from_proto(request.index))
            return admin_pb2.ReleaseLeaseResponse()

    async def ListLeases(self, request, context):  # type: ignore[no-untyped-def]
        async with status_on_error(context):
            return admin_pb2.LeaseList(leases=await self.leases.live())
