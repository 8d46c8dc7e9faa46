"""Serve any ChunkStore and ImageNames over gRPC, with the standard health service.

Every tier's process is `run_service(...)` around the stores it wires together.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from imagestream import config, telemetry, tls
from imagestream.digests import Digest, decompress_verified
from imagestream.errors import (BadImage, CorruptChunk, FailedPrecondition, ImagestreamError, InvalidArgument,
                                NotFound, PermissionDenied, Unavailable)
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
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
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


# -- who may call what ---------------------------------------------------------
# Every method a TCP caller may reach, with the roles (SAN URIs of its certificate, see imagestream.tls)
# that may call it; ANY: any certificate of the deployment's CA. A method not listed is refused to everyone.
ANY = frozenset({"*"})
READ = frozenset({"pusher", "profiler", "node", "zonal"})
PUSH = frozenset({"pusher"})
PERMISSIONS: dict[str, frozenset[str]] = {
    "/grpc.health.v1.Health/Check": ANY,
    "/grpc.health.v1.Health/Watch": ANY,
    "/imagestream.v1.ChunkStore/GetChunk": READ,
    "/imagestream.v1.ChunkStore/GetChunks": READ,
    "/imagestream.v1.ChunkStore/FindMissingChunks": READ,
    "/imagestream.v1.ChunkStore/PutChunks": PUSH | {"profiler"},  # a recorded profile is stored as a chunk
    "/imagestream.v1.Images/ResolveImage": READ,
    "/imagestream.v1.Images/ListImages": READ,
    "/imagestream.v1.Images/PublishImage": PUSH,
    "/imagestream.v1.Images/DeleteImage": PUSH,
    "/imagestream.v1.Images/SetProfile": PUSH | {"profiler"},
    "/imagestream.v1.Distribution/PutBlob": PUSH,
    "/imagestream.v1.Distribution/PutManifest": PUSH,
    "/imagestream.v1.Distribution/FindMissingBlobs": PUSH,
    "/imagestream.v1.RegionalAdmin/Scrub": PUSH,
    "/imagestream.v1.RegionalAdmin/ListQuarantine": PUSH,
    "/imagestream.v1.RegionalAdmin/CollectGarbage": PUSH,
    # mount leases keep what a node has mounted from the regional gc: its FUSE client takes and renews them
    "/imagestream.v1.Leases/RenewLease": PUSH | {"node"},
    "/imagestream.v1.Leases/ReleaseLease": PUSH | {"node"},
    "/imagestream.v1.Leases/ListLeases": PUSH | {"node"},
    # pull-through mirrors: configured by the operator; their conversions' progress is anyone's to read
    "/imagestream.v1.Mirrors/AddMirror": PUSH,
    "/imagestream.v1.Mirrors/RemoveMirror": PUSH,
    "/imagestream.v1.Mirrors/ListMirrors": PUSH,
    "/imagestream.v1.Mirrors/ListConversions": READ,
    "/imagestream.v1.Node/StartDownload": frozenset({"node"}),
    "/imagestream.v1.Node/EndDownload": frozenset({"node"}),
    "/imagestream.v1.Node/GetNodeStatus": READ,
    "/imagestream.v1.Node/CollectGarbage": frozenset({"node"}),
}


class ReadPolicy:
    """What an authenticated caller may read, beyond its role (the regional tier's tenants: chunk_store.tenancy)."""

    async def check(self, caller: tls.Caller, method: str, request) -> None:  # type: ignore[no-untyped-def]
        """Raise PermissionDenied if `caller` may not make this request."""

    def filter(self, caller: tls.Caller, method: str, response):  # type: ignore[no-untyped-def]
        """The part of a response `caller` may see."""
        return response


def caller_of(context: grpc.aio.ServicerContext) -> tls.Caller | None:
    """The verified client certificate's caller, or None (a Unix socket, or TLS off)."""
    pem = (context.auth_context() or {}).get("x509_pem_cert")
    return tls.caller_from_pem(pem[0]) if pem else None


class Authorizer(grpc.aio.ServerInterceptor):
    """The one place a TCP caller's certificate is checked against what it asks for (PERMISSIONS), and,
    with a ReadPolicy, against what it reads. Callers on a Unix socket pass: the socket's mode decides
    who may connect (tls.unix_socket_permissions)."""

    def __init__(self, reads: ReadPolicy | None = None) -> None:
        self.reads = reads

    async def _admit(self, method: str, request, context) -> tls.Caller | None:  # type: ignore[no-untyped-def]
        if context.peer().startswith("unix:"):
            return None
        caller = caller_of(context)
        if caller is None:  # the TLS handshake demands a certificate: only reachable if TLS is bypassed
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"{method}: no client certificate; every caller must present one signed by this "
                                f"tier's CA ({config.SETTINGS['tls_cert'].env})")
        allowed = PERMISSIONS.get(method)
        if allowed is None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{method}: not open to any caller")
        if allowed is not ANY and not caller.roles & allowed:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"{method}: certificate {caller} may not call it; it needs the role "
                                f"{' or '.join(sorted(allowed))} ({tls.ROLE_URI}ROLE in its subject alternative names)")
        if self.reads is not None and request is not None:
            try:
                await self.reads.check(caller, method, request)
            except PermissionDenied as e:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{method}: {caller.name!r}: {e}")
            except ImagestreamError as e:  # the policy could not tell (e.g. the store is down): refuse
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"{method}: read permission unknown: {e}")
        return caller

    async def intercept_service(self, continuation, details):  # type: ignore[no-untyped-def]
        handler = await continuation(details)
        if handler is None:
            return None
        method, admit, reads = details.method, self._admit, self.reads

        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request, context):  # type: ignore[no-untyped-def]
                caller = await admit(method, request, context)
                response = await inner_uu(request, context)
                return reads.filter(caller, method, response) if reads and caller else response

            return handler._replace(unary_unary=unary_unary)
        if handler.stream_unary:
            inner_su = handler.stream_unary

            async def stream_unary(request_iterator, context):  # type: ignore[no-untyped-def]
                await admit(method, None, context)
                return await inner_su(request_iterator, context)

            return handler._replace(stream_unary=stream_unary)
        kind = "unary_stream" if handler.unary_stream else "stream_stream"
        inner = getattr(handler, kind)
        unary = kind == "unary_stream"

        if inspect.isasyncgenfunction(inner):
            async def streaming(request, context):  # type: ignore[no-untyped-def]
                await admit(method, request if unary else None, context)
                async for response in inner(request, context):
                    yield response
        else:  # a handler that writes with context.write (the health service's Watch)
            async def streaming(request, context):  # type: ignore[no-untyped-def]
                await admit(method, request if unary else None, context)
                return await inner(request, context)

        return handler._replace(**{kind: streaming})


def add_port(server: grpc.aio.Server, service_name: str, address: str) -> None:
    """Listen on `address`: TLS requiring a client certificate on TCP (unless IMAGESTREAM_TLS=off); a Unix
    socket made 0600 (0660 with IMAGESTREAM_SOCKET_GROUP) from the moment it exists."""
    try:
        if address.startswith("unix:"):
            path = address.removeprefix("unix:")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a stale socket from a killed run
            with tls.unix_socket_permissions(path):
                server.add_insecure_port(address)
        elif tls.enabled():
            server.add_secure_port(address, tls.server_credentials())
        else:
            server.add_insecure_port(address)
    except RuntimeError as e:
        raise SystemExit(f"{service_name}: cannot listen on {address}: {e}") from None
    except tls.TlsError as e:
        raise SystemExit(f"{service_name}: {e}") from None


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
    reads: ReadPolicy | None = None,
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
        ],
        # with IMAGESTREAM_TLS=off no caller has a certificate to check: a network trusted already
        interceptors=[Authorizer(reads)] if tls.enabled() else [],
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
        add_port(server, service_name, address)
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
    reads: ReadPolicy | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then drain in-flight calls and close the stores.

    `metrics` is (listen address, collect function) for the Prometheus endpoint.
    """
    server, health_servicer = await start_server(service_name, listen, store, names, region, add_servicers, reads)
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
    tls.set_identity(prog.replace("_", "-"))  # the certificate it presents: TLS_DIR/chunk-store.crt, ...
    telemetry.setup_tracing(prog)
    try:
        asyncio.run(main(args))
    except ImagestreamError as e:  # a setting that cannot work (a certificate, a policy file, a refused login)
        raise SystemExit(f"{prog}: {e}") from None
