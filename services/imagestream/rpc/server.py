"""Serve any ChunkStore and ImageNames over gRPC, with the standard health service.

Every tier's process is `run_service(...)` around the stores it wires together.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from imagestream import config, telemetry
from imagestream.digests import Digest, decompress_verified
from imagestream.errors import (BadImage, CorruptChunk, FailedPrecondition, ImagestreamError, InvalidArgument,
                                NotFound, Unavailable)
from imagestream.rpc.client import MAX_MESSAGE_BYTES
from imagestream.index import ensure_complete
from imagestream.names import ImageNames, WritableImageNames, validate_name
from imagestream.store.base import ChunkStore
from imagestream.v1 import chunk_store_pb2, chunk_store_pb2_grpc, images_pb2, images_pb2_grpc

log = logging.getLogger(__name__)

_ERROR_TO_STATUS: list[tuple[type[Exception], grpc.StatusCode]] = [
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (BadImage, grpc.StatusCode.INVALID_ARGUMENT),  # e.g. an index that fails index_checks at publish
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (CorruptChunk, grpc.StatusCode.NOT_FOUND),  # a corrupt copy was dropped: as good as absent
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
]


@contextlib.asynccontextmanager
async def status_on_error(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Turn imagestream errors into gRPC statuses; anything else is logged as a bug and is INTERNAL."""
    try:
        yield
    except ImagestreamError as e:
        for cls, code in _ERROR_TO_STATUS:
            if isinstance(e, cls):
                await context.abort(code, str(e))
        await context.abort(grpc.StatusCode.INTERNAL, str(e))
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - the edge: never crash the server on one request
        if isinstance(e, grpc.aio.AbortError):
            raise
        log.exception("internal error")
        await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")


def _digest(message) -> Digest:  # type: ignore[no-untyped-def]
    return Digest.from_proto(message)


class ChunkStoreServicer(chunk_store_pb2_grpc.ChunkStoreServicer):
    def __init__(self, store: ChunkStore) -> None:
        self.store = store

    async def GetChunk(self, request, context):  # type: ignore[no-untyped-def]
        async with status_on_error(context):
            digest = _digest(request.digest)
            telemetry.annotate(chunk=str(digest), image=request.image or telemetry.current_image())
            if request.accept_local_path:
                path = await self.store.local_path(digest)
                if path is not None:
                    return chunk_store_pb2.Chunk(digest=request.digest, local_path=path)
            data = await self.store.get(digest)
            return chunk_store_pb2.Chunk(digest=request.digest, compressed=data)

    async def GetChunks(self, request, context):  # type: ignore[no-untyped-def]
        async with status_on_error(context):
            digests = [_digest(d) for d in request.digests]
            async for digest, data in self.store.get_many(digests):
                yield chunk_store_pb2.Chunk(digest=digest.to_proto(), compressed=data)

    async def PutChunks(self, request_iterator, context):  # type: ignore[no-untyped-def]
        stored = 0
        async with status_on_error(context):
            async for request in request_iterator:
                # the chunks of one request are checked and written concurrently: a push is bound by
                # the store's write latency otherwise (one Cassandra round trip per chunk)
                results = await asyncio.gather(*(self._put_one(chunk) for chunk in request.chunks))
                stored += sum(results)
            return chunk_store_pb2.PutChunksResponse(stored=stored)

    async def _put_one(self, chunk: chunk_store_pb2.Chunk) -> bool:
        digest = _digest(chunk.digest)
        try:
            if len(chunk.compressed) > 64 * 1024:
                await asyncio.to_thread(decompress_verified, digest, chunk.compressed)
            else:
                decompress_verified(digest, chunk.compressed)
        except CorruptChunk as e:
            raise InvalidArgument(f"refused: {e}") from None
        return await self.store.put_verified(digest, chunk.compressed)

    async def FindMissingChunks(self, request, context):  # type: ignore[no-untyped-def]
        async with status_on_error(context):
            digests = [_digest(d) for d in request.digests]
            missing = await self.store.find_missing(digests)
            return chunk_store_pb2.FindMissingChunksResponse(missing=[d.to_proto() for d in missing])


class ImagesServicer(images_pb2_grpc.ImagesServicer):
    """Resolves and lists names from `names`, as every tier does.

    A cache tier serves reads only: publishing, deleting and profiles go to the
    regional store, and are refused here with FAILED_PRECONDITION naming it
    (`region`), never forwarded.
    """

    def __init__(self, names: ImageNames, region: str = "") -> None:
        self.names = names
        self.region = region

    async def ResolveImage(self, request, context):  # type: ignore[no-untyped-def]
        async with status_on_error(context):
            return await self.names.resolve(validate_name(request.name))

    async def ListImages(self, request, context):  # type: ignore[no-untyped-def]
        async with status_on_error(context):
            return images_pb2.ListImagesResponse(images=await self.names.list())

    async def _refuse(self, context, what: str):  # type: ignore[no-untyped-def]
        where = f" at {self.region}" if self.region else ""
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                            f"{what}: this tier serves reads only; send it to the regional store{where}"
                            f" ({config.SETTINGS['region'].env})")

    async def PublishImage(self, request, context):  # type: ignore[no-untyped-def]
        await self._refuse(context, f"publish {request.image.name!r}")

    async def SetProfile(self, request, context):  # type: ignore[no-untyped-def]
        await self._refuse(context, f"set the profile of {request.name!r}")

    async def DeleteImage(self, request, context):  # type: ignore[no-untyped-def]
        await self._refuse(context, f"delete {request.name!r}")


class RegionalImagesServicer(ImagesServicer):
    """The regional store's names, the source of truth: reads and writes.

    A name is published only once its index and every chunk it references are
    in `store`, and a profile is attached only once it is stored.
    """

    def __init__(self, names: WritableImageNames, store: ChunkStore) -> None:
        super().__init__(names)
        self.writable = names
        self.store = store

    async def PublishImage(self, request, context):  # type: ignore[no-untyped-def]
        async with status_on_error(context):
            validate_name(request.image.name)
            _digest(request.image.index)
            await ensure_complete(self.store, request.image)
            return await self.writable.publish(request.image)

    async def SetProfile(self, request, context):  # type: ignore[no-untyped-def]
        async with status_on_error(context):
            validate_name(request.name)
            index, profile = _digest(request.index), _digest(request.profile)
            if await self.store.find_missing([profile]):
                raise FailedPrecondition(f"image {request.name!r}: profile {profile} is not stored")
            return await self.writable.set_profile(request.name, index, profile)

    async def DeleteImage(self, request, context):  # type: ignore[no-untyped-def]
        async with status_on_error(context):
            return images_pb2.DeleteImageResponse(deleted=await self.writable.delete(validate_name(request.name)))


async def start_server(
    service_name: str,
    listen: Sequence[str],
    store: ChunkStore,
    names: ImageNames,
    region: str = "",
    add_servicers: Callable[[grpc.aio.Server], None] | None = None,
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A started gRPC server of the chunk and image APIs plus the health service.

    `names` that are writable make this the regional store (the source of truth,
    which takes writes); other tiers serve reads and refuse writes, naming
    `region`, the regional store's address.
    """
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    chunk_store_pb2_grpc.add_ChunkStoreServicer_to_server(ChunkStoreServicer(store), server)
    images = (RegionalImagesServicer(names, store) if isinstance(names, WritableImageNames)
              else ImagesServicer(names, region))
    images_pb2_grpc.add_ImagesServicer_to_server(images, server)
    if add_servicers is not None:
        add_servicers(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for address in listen:
        if address.startswith("unix:"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(address.removeprefix("unix:"))  # a stale socket from a killed run
        try:
            server.add_insecure_port(address)
        except RuntimeError as e:
            raise SystemExit(f"{service_name}: cannot listen on {address}: {e}") from None
    await server.start()
    for name in ("", service_name, "imagestream.v1.ChunkStore", "imagestream.v1.Images"):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("%s serving on %s", service_name, ", ".join(listen))
    return server, health_servicer


async def serve(
    service_name: str,
    listen: Sequence[str],
    store: ChunkStore,
    names: ImageNames,
    region: str = "",
    add_servicers: Callable[[grpc.aio.Server], None] | None = None,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    metrics: tuple[str, Callable[[], Iterator[object]]] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then drain in-flight calls and close the stores.

    `metrics` is (listen address, collect function) for the Prometheus endpoint.
    """
    server, health_servicer = await start_server(service_name, listen, store, names, region, add_servicers)
    if metrics is not None:
        telemetry.serve_metrics(*metrics)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("%s stopping", service_name)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=5)
    if on_stop is not None:
        await on_stop()
    await store.close()
    await names.close()
    telemetry.shutdown()


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def service_main(prog: str, description: str | None, settings: Sequence[str],
                 main: Callable[[argparse.Namespace], Awaitable[None]]) -> None:
    """The entry point every tier service shares: flags (defaulting to IMAGESTREAM_* variables), logging, run."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    config.add_arguments(parser, *settings, "log_level")
    args = parser.parse_args()
    for name in settings:  # flags win over the environment, for config.get() too
        os.environ[config.SETTINGS[name].env] = getattr(args, name)
    setup_logging(args.log_level)
    telemetry.setup_tracing(prog)
    try:
        asyncio.run(main(args))
    except ImagestreamError as e:  # a setting that cannot work (an unreadable password file, a refused login)
        raise SystemExit(f"{prog}: {e}") from None
