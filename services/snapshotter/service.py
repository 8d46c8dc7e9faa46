"""containerd's snapshots API (containerd.services.snapshots.v1.Snapshots) over the Snapshotter."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from containerd.types import mount_pb2
from imagestream.errors import FailedPrecondition, ImagestreamError, InvalidArgument, NotFound

from snapshotter.metadata import Snapshot
from snapshotter.snapshotter import AlreadyExists, Mount, Snapshotter

log = logging.getLogger("snapshotter")

# containerd turns these codes back into its errdefs (ErrAlreadyExists, ErrNotFound, ...)
_CODES = [
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
]


@contextlib.asynccontextmanager
async def _status(context: grpc.aio.ServicerContext, call: str) -> AsyncIterator[None]:
    try:
        yield
    except ImagestreamError as e:
        code = next((c for cls, c in _CODES if isinstance(e, cls)), grpc.StatusCode.UNAVAILABLE)
        if code != grpc.StatusCode.ALREADY_EXISTS:
            log.info("%s: %s: %s", call, code.name, e)
        await context.abort(code, str(e))
    except grpc.aio.AbortError:
        raise
    except Exception as e:  # noqa: BLE001 - the edge: one bad call never takes the snapshotter down
        log.exception("%s failed", call)
        await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")


async def _finish(coro):  # type: ignore[no-untyped-def]
    """Run a change to completion even if containerd gives up on the call (a cancelled call must not leave
    a snapshot half-removed or an image half-unmounted)."""
    return await asyncio.shield(asyncio.ensure_future(coro))


def _mounts(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=m.options) for m in mounts]


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    t = timestamp_pb2.Timestamp()
    t.FromNanoseconds(ns)
    return t


def info(s: Snapshot) -> snapshots_pb2.Info:
    return snapshots_pb2.Info(name=s.key, parent=s.parent, kind=s.kind, created_at=_timestamp(s.created_ns),
                              updated_at=_timestamp(s.updated_ns), labels=s.labels)


class SnapshotsServicer(snapshots_pb2_grpc.SnapshotsServicer):
    def __init__(self, snapshotter: Snapshotter) -> None:
        self.s = snapshotter

    async def Prepare(self, request, context):  # type: ignore[no-untyped-def]
        async with _status(context, f"prepare {request.key}"):
            mounts = await _finish(self.s.prepare(request.key, request.parent, dict(request.labels)))
            return snapshots_pb2.PrepareSnapshotResponse(mounts=_mounts(mounts))

    async def View(self, request, context):  # type: ignore[no-untyped-def]
        async with _status(context, f"view {request.key}"):
            mounts = await _finish(self.s.view(request.key, request.parent, dict(request.labels)))
            return snapshots_pb2.ViewSnapshotResponse(mounts=_mounts(mounts))

    async def Mounts(self, request, context):  # type: ignore[no-untyped-def]
        async with _status(context, f"mounts {request.key}"):
            return snapshots_pb2.MountsResponse(mounts=_mounts(await self.s.mounts(request.key)))

    async def Commit(self, request, context):  # type: ignore[no-untyped-def]
        async with _status(context, f"commit {request.key} as {request.name}"):
            await _finish(self.s.commit(request.name, request.key, dict(request.labels)))
            return empty_pb2.Empty()

    async def Remove(self, request, context):  # type: ignore[no-untyped-def]
        async with _status(context, f"remove {request.key}"):
            await _finish(self.s.remove(request.key))
            return empty_pb2.Empty()

    async def Stat(self, request, context):  # type: ignore[no-untyped-def]
        async with _status(context, f"stat {request.key}"):
            return snapshots_pb2.StatSnapshotResponse(info=info(self.s.stat(request.key)))

    async def Update(self, request, context):  # type: ignore[no-untyped-def]
        async with _status(context, f"update {request.info.name}"):
            s = await _finish(self.s.update(request.info.name, dict(request.info.labels),
                                             list(request.update_mask.paths)))
            return snapshots_pb2.UpdateSnapshotResponse(info=info(s))

    async def List(self, request, context):  # type: ignore[no-untyped-def]
        async with _status(context, "list"):
            found = self.s.walk(list(request.filters))
            for i in range(0, len(found), 100):
                yield snapshots_pb2.ListSnapshotsResponse(info=[info(s) for s in found[i : i + 100]])

    async def Usage(self, request, context):  # type: ignore[no-untyped-def]
        async with _status(context, f"usage {request.key}"):
            size, inodes = await self.s.usage(request.key)
            return snapshots_pb2.UsageResponse(size=size, inodes=inodes)

    async def Cleanup(self, request, context):  # type: ignore[no-untyped-def]
        async with _status(context, "cleanup"):
            await _finish(self.s.cleanup())
            return empty_pb2.Empty()
