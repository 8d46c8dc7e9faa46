"""The RegionalAdmin gRPC service: scrub, quarantine and garbage collection, served by the regional chunk store only."""

from __future__ import annotations

from imagestream.digests import Digest
from imagestream.errors import InvalidArgument, Unavailable
from imagestream.rpc.server import status_on_error
from imagestream.v1 import admin_pb2, admin_pb2_grpc

from chunk_store.gc import GarbageCollector
from chunk_store.healing import HealingStore


class RegionalAdminServicer(admin_pb2_grpc.RegionalAdminServicer):
    def __init__(self, store: HealingStore, gc: GarbageCollector) -> None:
        self.store = store
        self.gc = gc

    async def CollectGarbage(self, request, context):  # type: ignore[no-untyped-def]
        async with status_on_error(context):
            if request.grace_seconds < 0:
                raise InvalidArgument(f"grace {request.grace_seconds} s < 0")
            # 0 means the store's default; a caller that wants no grace at all asks for 1 s
            return await self.gc.collect(request.grace_seconds or None, request.dry_run)

    async def Scrub(self, request, context):  # type: ignore[no-untyped-def]
        async with status_on_error(context):
            if request.limit < 0:
                raise InvalidArgument(f"limit {request.limit} < 0")
            report = await self.store.scrub(limit=request.limit)
            found = set(report.found)
            try:
                chunks = [q for q in await self._quarantine() if Digest.from_proto(q.digest) in found]
            except Unavailable:  # the report stands without the details
                chunks = [admin_pb2.QuarantinedChunk(digest=d.to_proto(), reason="see the chunk store's log")
                          for d in report.found]
            return admin_pb2.ScrubReport(checked=report.checked, bytes=report.bytes, corrupt=report.corrupt,
                                         healed=report.healed, unhealed=report.unhealed, unreadable=report.unreadable,
                                         replicas_not_reached=report.replicas_not_reached,
                                         seconds=report.seconds, found=chunks)

    async def ListQuarantine(self, request, context):  # type: ignore[no-untyped-def]
        async with status_on_error(context):
            return admin_pb2.QuarantineList(chunks=await self._quarantine())

    async def _quarantine(self) -> list[admin_pb2.QuarantinedChunk]:
        rows = await self.store.inner.quarantine_list()
        return [admin_pb2.QuarantinedChunk(digest=Digest(r.hash, r.size).to_proto(), found_at=r.found_at or 0,
                                           reason=r.reason or "", healed=bool(r.healed)) for r in rows]
