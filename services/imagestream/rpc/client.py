"""gRPC clients of the next tier: a ChunkStore and an ImageNames over the wire."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence

import grpc

from imagestream import telemetry, tls
from imagestream.digests import Digest
from imagestream.errors import (CorruptChunk, FailedPrecondition, ImagestreamError, InvalidArgument, NotFound,
                               PermissionDenied, Unavailable)
from imagestream.store.failover import Failover
from imagestream.names import ImageNames, WritableImageNames
from imagestream.store.base import ChunkStore
from imagestream.v1 import (admin_pb2, admin_pb2_grpc, chunk_store_pb2, chunk_store_pb2_grpc, distribution_pb2,
                            distribution_pb2_grpc, images_pb2, images_pb2_grpc, mirror_pb2, mirror_pb2_grpc, node_pb2,
                            node_pb2_grpc)

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 80 * 1024 * 1024  # a 64 MiB blob plus framing

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # fail fast on a dead upstream so failover moves on instead of waiting
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 30000),
]

_STATUS_TO_ERROR: dict[grpc.StatusCode, type[ImagestreamError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.DATA_LOSS: CorruptChunk,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: PermissionDenied,
}


def to_error(target: str, e: grpc.RpcError) -> ImagestreamError:
    """A gRPC failure as an imagestream error; anything unexpected counts as the tier being unavailable."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    cls = _STATUS_TO_ERROR.get(code, Unavailable)
    details = e.details() if hasattr(e, "details") else str(e)
    if code == grpc.StatusCode.UNAVAILABLE and not target.startswith("unix:") and tls.enabled():
        # a refused TLS handshake looks like a closed socket from this side: say what we presented
        details += f" (is it up, and does it trust our certificate {tls.cert_path()}? we trust {tls.ca_path()})"
    return cls(f"{target}: {code.name}: {details}")


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def channel(target: str) -> grpc.aio.Channel:
    return tls.grpc_channel(target, CHANNEL_OPTIONS)


class GrpcClient:
    """A channel to `target` (host:port or unix:/path) and one stub; every call has a deadline, and a
    failure comes back as an imagestream error naming the target.

    Over TLS, a renewed certificate (cert-manager rewrites the files of its Secret) is taken up without a
    restart: when the files changed, the next call opens a new channel with them, and the old one is
    closed once its calls are done. Connections made before the renewal would otherwise go on
    presenting the old certificate, and fail on their next reconnect once it expires."""

    stub_class: type = type(None)
    OLD_CHANNEL_GRACE_S = 60.0  # calls under way on the old channel get this long to finish

    def __init__(self, target: str, timeout_s: float) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._watch_certificates = not target.startswith("unix:") and tls.enabled()
        self._material = tls.material_stamp() if self._watch_certificates else ()
        self._checked_at = time.monotonic()
        self._retiring: dict[asyncio.Task, grpc.aio.Channel] = {}  # old channels, closing
        self._channel = channel(target)
        self._current_stub = self.stub_class(self._channel)

    @property
    def _stub(self):  # type: ignore[no-untyped-def]
        if self._watch_certificates and time.monotonic() - self._checked_at >= tls.RENEWAL_CHECK_S:
            self._checked_at = time.monotonic()
            self._renew_if_rotated()
        return self._current_stub

    def _renew_if_rotated(self) -> None:
        stamp = tls.material_stamp()
        if stamp == self._material:
            return
        try:
            tls.matched_material()
        except tls.TlsError:  # caught between the files of a renewal: keep the old channel, look again later
            return
        old, self._material = self._channel, stamp
        self._channel = channel(self.target)
        self._current_stub = self.stub_class(self._channel)
        log.info("%s: certificate files changed, new connections present the renewed certificate",
                 self.target)
        task = asyncio.get_running_loop().create_task(old.close(grace=self.OLD_CHANNEL_GRACE_S))
        self._retiring[task] = old
        task.add_done_callback(lambda done: self._retiring.pop(done, None))

    async def _call(self, method, request, timeout_s: float | None = None):  # type: ignore[no-untyped-def]
        try:
            return await method(request, timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as e:
            raise to_error(self.target, e) from None

    async def close(self) -> None:
        for task, old in list(self._retiring.items()):
            task.cancel()
            await old.close()
        await self._channel.close()


class GrpcChunkStore(GrpcClient, ChunkStore):
    """The ChunkStore of another tier, reached at `target` (host:port or unix:/path)."""

    stub_class = chunk_store_pb2_grpc.ChunkStoreStub

    def __init__(self, target: str, name: str | None = None, timeout_s: float = 30.0,
                 accept_local_path: bool = False) -> None:
        ChunkStore.__init__(self)
        GrpcClient.__init__(self, target, timeout_s)
        # On the node cache's own machine: a chunk on its disk may come back as the path of its file
        # (the node saw the read), read here without copying it through the socket.
        self.accept_local_path = accept_local_path
        self.local_reads = 0  # chunks read from a file the node named
        self._distrusted: set[Digest] = set()  # found corrupt in such a file: ask for the bytes
        self.name = name or target

    async def get(self, digest: Digest, image: str = "") -> bytes:
        image = image or telemetry.current_image()
        local = self.accept_local_path and digest not in self._distrusted
        chunk = await self._get(digest, image, local)
        if chunk.local_path:
            try:
                data = await asyncio.to_thread(_read_file, chunk.local_path)
            except FileNotFoundError:  # evicted since the answer: ask for the bytes
                chunk = await self._get(digest, image, False)
            else:
                self.local_reads += 1
                self.stats.bytes_served += len(data)
                return data
        self._distrusted.discard(digest)  # the node has checked its copy
        self.stats.bytes_served += len(chunk.compressed)
        return chunk.compressed

    async def _get(self, digest: Digest, image: str, accept_local_path: bool) -> chunk_store_pb2.Chunk:
        request = chunk_store_pb2.GetChunkRequest(digest=digest.to_proto(), image=image,
                                                  accept_local_path=accept_local_path)
        return await self._call(self._stub.GetChunk, request)

    async def delete(self, digest: Digest) -> None:
        """The caller found the chunk corrupt. The other tier's copy is not ours to drop: ask it for the
        bytes next time rather than read its file, so that it checks its copy (and drops a bad one)."""
        if self.accept_local_path:
            self._distrusted.add(digest)

    async def get_many(self, digests: Sequence[Digest], concurrency: int = 16) -> AsyncIterator[tuple[Digest, bytes]]:
        request = chunk_store_pb2.GetChunksRequest(digests=[d.to_proto() for d in dict.fromkeys(digests)])
        try:
            async for chunk in self._stub.GetChunks(request, timeout=self.timeout_s * 4):
                yield Digest.from_proto(chunk.digest), chunk.compressed
        except grpc.RpcError as e:
            raise to_error(self.target, e) from None

    # One PutChunks stream carries at most this much, under a deadline of its own: a deadline is for a call
    # that hangs, and one stream for a whole image (1.6 GB at a few MB/s) would outlast any sane one.
    STREAM_BYTES = 128 * 1024 * 1024

    async def put_many(self, chunks: Iterable[tuple[Digest, bytes]], batch_bytes: int = 4 * 1024 * 1024) -> int:
        """Stream chunks up in messages of about `batch_bytes`, streams of about STREAM_BYTES; the number
        newly stored."""
        pending = iter(chunks)
        more = [True]

        def one_stream():  # type: ignore[no-untyped-def]
            batch: list[chunk_store_pb2.Chunk] = []
            size = streamed = 0
            for digest, data in pending:
                batch.append(chunk_store_pb2.Chunk(digest=digest.to_proto(), compressed=data))
                size += len(data)
                if size >= batch_bytes:
                    yield chunk_store_pb2.PutChunksRequest(chunks=batch)
                    streamed += size
                    batch, size = [], 0
                    if streamed >= self.STREAM_BYTES:
                        return  # the rest in the next stream
            more[0] = False
            if batch:
                yield chunk_store_pb2.PutChunksRequest(chunks=batch)

        stored = 0
        while more[0]:
            stored += (await self._call(self._stub.PutChunks, one_stream(), self.timeout_s * 10)).stored
        return stored

    async def put(self, digest: Digest, compressed: bytes) -> bool:
        return await self.put_many([(digest, compressed)]) > 0

    async def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        request = chunk_store_pb2.FindMissingChunksRequest(digests=[d.to_proto() for d in dict.fromkeys(digests)])
        response = await self._call(self._stub.FindMissingChunks, request)
        return [Digest.from_proto(d) for d in response.missing]

    async def contains(self, digest: Digest) -> bool:
        return not await self.find_missing([digest])


class GrpcImageNames(GrpcClient, WritableImageNames):
    """Image names over gRPC: reads of any tier; writes of the regional store (the caches refuse them)."""

    stub_class = images_pb2_grpc.ImagesStub

    def __init__(self, target: str, timeout_s: float = 30.0) -> None:
        super().__init__(target, timeout_s)
        self.name = target

    async def resolve(self, name: str) -> images_pb2.Image:
        return await self._call(self._stub.ResolveImage, images_pb2.ResolveImageRequest(name=name))

    async def publish(self, image: images_pb2.Image) -> images_pb2.Image:
        return await self._call(self._stub.PublishImage, images_pb2.PublishImageRequest(image=image))

    async def list(self) -> list[images_pb2.Image]:
        return list((await self._call(self._stub.ListImages, images_pb2.ListImagesRequest())).images)

    async def delete(self, name: str) -> bool:
        return (await self._call(self._stub.DeleteImage, images_pb2.DeleteImageRequest(name=name))).deleted

    async def set_profile(self, name: str, index: Digest, profile: Digest) -> images_pb2.Image:
        request = images_pb2.SetProfileRequest(name=name, index=index.to_proto(), profile=profile.to_proto())
        return await self._call(self._stub.SetProfile, request)


class FailoverImageNames(ImageNames):
    """Names read from the first upstream that answers (a cache tier's way to the regional names)."""

    def __init__(self, upstreams: Sequence[ImageNames]) -> None:
        self.failover: Failover[ImageNames] = Failover(upstreams)

    async def resolve(self, name: str) -> images_pb2.Image:
        return await self.failover.call(f"resolve {name}", lambda u: u.resolve(name))

    async def list(self) -> list[images_pb2.Image]:
        return await self.failover.call("list images", lambda u: u.list())

    async def close(self) -> None:
        for u in self.failover.upstreams:
            await u.close()


class NodeClient(GrpcClient):
    """The node cache's own API: background downloads and status."""

    stub_class = node_pb2_grpc.NodeStub

    def __init__(self, target: str, timeout_s: float = 10.0) -> None:
        super().__init__(target, timeout_s)

    async def start_download(self, mount_id: str, image: str, index: Digest, first: Sequence[Digest] = ()) -> None:
        await self._call(self._stub.StartDownload, node_pb2.StartDownloadRequest(
            mount_id=mount_id, image=image, index=index.to_proto(), first=[d.to_proto() for d in first]))

    async def end_download(self, mount_id: str) -> None:
        await self._call(self._stub.EndDownload, node_pb2.EndDownloadRequest(mount_id=mount_id))

    async def status(self) -> node_pb2.NodeStatus:
        return await self._call(self._stub.GetNodeStatus, node_pb2.GetNodeStatusRequest())

    async def collect_garbage(self, dry_run: bool = False) -> node_pb2.NodeGarbageReport:
        return await self._call(self._stub.CollectGarbage, node_pb2.NodeGarbageRequest(dry_run=dry_run), 600)


class GrpcDistribution(GrpcClient):
    """The regional Distribution service, as `push` writes to it."""

    stub_class = distribution_pb2_grpc.DistributionStub

    def __init__(self, target: str, timeout_s: float = 120.0) -> None:
        super().__init__(target, timeout_s)

    async def put_blob(self, record: BlobRecord) -> None:
        await self._call(self._stub.PutBlob, distribution_pb2.PutBlobRequest(blob=record.to_proto()))

    async def put_manifest(self, repository: str, reference: str, media_type: str, content: bytes) -> str:
        request = distribution_pb2.PutManifestRequest(repository=repository, reference=reference,
                                                      media_type=media_type, content=content)
        return (await self._call(self._stub.PutManifest, request)).digest

    async def find_missing(self, digests: list[str]) -> list[str]:
        request = distribution_pb2.FindMissingBlobsRequest(digests=digests)
        return list((await self._call(self._stub.FindMissingBlobs, request)).missing)


class GrpcRegionalAdmin(GrpcClient):
    """The regional store's admin service: scrub stored chunks, list what was quarantined."""

    stub_class = admin_pb2_grpc.RegionalAdminStub

    def __init__(self, target: str, timeout_s: float = 60.0) -> None:
        super().__init__(target, timeout_s)

    async def scrub(self, limit: int = 0) -> admin_pb2.ScrubReport:
        return await self._call(self._stub.Scrub, admin_pb2.ScrubRequest(limit=limit), 24 * 3600)

    async def list_quarantine(self) -> admin_pb2.QuarantineList:
        return await self._call(self._stub.ListQuarantine, admin_pb2.ListQuarantineRequest())

    async def collect_garbage(self, grace_s: int = 0, dry_run: bool = False) -> admin_pb2.GarbageReport:
        request = admin_pb2.CollectGarbageRequest(grace_seconds=grace_s, dry_run=dry_run)
        return await self._call(self._stub.CollectGarbage, request, 24 * 3600)


class GrpcLeases(GrpcClient):
    """The regional store's mount leases, as a node's FUSE client takes, renews and gives them back."""

    stub_class = admin_pb2_grpc.LeasesStub

    def __init__(self, target: str, timeout_s: float = 10.0) -> None:
        super().__init__(target, timeout_s)

    async def renew(self, holder: str, index: Digest, image: str, ttl_s: int = 0) -> admin_pb2.Lease:
        return await self._call(self._stub.RenewLease, admin_pb2.RenewLeaseRequest(
            holder=holder, index=index.to_proto(), image=image, ttl_seconds=ttl_s))

    async def release(self, holder: str, index: Digest) -> None:
        await self._call(self._stub.ReleaseLease, admin_pb2.ReleaseLeaseRequest(holder=holder, index=index.to_proto()))

    async def list(self) -> list[admin_pb2.Lease]:
        return list((await self._call(self._stub.ListLeases, admin_pb2.ListLeasesRequest())).leases)


class GrpcMirrors(GrpcClient):
    """The regional store's pull-through mirrors and their conversions."""

    stub_class = mirror_pb2_grpc.MirrorsStub

    def __init__(self, target: str, timeout_s: float = 60.0) -> None:
        super().__init__(target, timeout_s)

    async def add(self, request: mirror_pb2.AddMirrorRequest) -> mirror_pb2.Mirror:
        return await self._call(self._stub.AddMirror, request)

    async def list(self) -> list[mirror_pb2.Mirror]:
        return list((await self._call(self._stub.ListMirrors, mirror_pb2.ListMirrorsRequest())).mirrors)

    async def remove(self, prefix: str) -> bool:
        return (await self._call(self._stub.RemoveMirror, mirror_pb2.RemoveMirrorRequest(prefix=prefix))).removed

    async def conversions(self) -> list[mirror_pb2.Conversion]:
        return list((await self._call(self._stub.ListConversions, mirror_pb2.ListConversionsRequest())).conversions)


def node_status(target: str | None = None) -> node_pb2.NodeStatus:
    """The local node cache's status, from synchronous code (CLI, tests, benchmarks)."""
    from imagestream import config

    async def fetch() -> node_pb2.NodeStatus:
        node = NodeClient(target or "unix:" + config.node_cache_socket())
        try:
            return await node.status()
        finally:
            await node.close()

    return asyncio.run(fetch())
