"""The read side of the OCI Distribution API, served by the regional tier on HTTP (aiohttp).

    GET|HEAD /v2/                              200: this is a registry (API version registry/2.0)
    GET|HEAD /v2/<name>/manifests/<tag|digest>  the manifest `push` stored for <name>:<tag>
    GET|HEAD /v2/<name>/blobs/<digest>          a config or layer blob, streamed piece by piece

Read-only: images are written by `imagestream push` only, or converted from an upstream registry
the endpoint fronts (a mirror, chunk_store/mirror.py): a repository under a mirror's prefix that the
endpoint does not hold is answered from the upstream (its manifest, its blobs streamed through) and
converted on its first pull by tag. HTTPS with a client
certificate signed by the deployment's CA (imagestream.tls), unless IMAGESTREAM_TLS=off;
with a tenant policy, a tenant's certificate reads only its repositories and their
blobs (chunk_store.tenancy). Blobs are content-addressed and shared by every
repository. Errors use the API's JSON error codes.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from chunk_store.distribution.blobs import Distribution
from chunk_store.mirror import HEADER, tag_name
from imagestream.ingest.registry import RegistryError
from imagestream import tls
from imagestream.oci import check_digest
from imagestream.errors import ImagestreamError, InvalidArgument, NotFound, PermissionDenied

log = logging.getLogger(__name__)

API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"errors": [{"code": code, "message": message}]}, status=status, headers=API_VERSION)


def _caller(request: web.Request) -> tls.Caller | None:
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return tls.caller_from_der(der) if der else None


def app(distribution: Distribution, reads=None, mirrors=None) -> web.Application:  # type: ignore[no-untyped-def]
    """`reads`: a tenant policy (chunk_store.tenancy.TenantReads) or None; `mirrors`: chunk_store.mirror.Mirrors
    or None."""
    routes = web.RouteTableDef()

    async def upstream_manifest(request: web.Request, name: str, reference: str) -> web.Response | None:
        """A mirrored repository's manifest the endpoint does not hold: the upstream's, as it is (a normal
        pull), and a tag's first pull starts its conversion. None: no mirror fronts `name`."""
        hit = await mirrors.match(name) if mirrors is not None else None
        if hit is None:
            return None
        mirror, repository = hit
        try:
            manifest = await mirrors.upstream_manifest(mirror, repository, reference)
        except RegistryError as e:
            code = (404, "MANIFEST_UNKNOWN") if "no such manifest" in str(e) else (503, "UNAVAILABLE")
            log.error("mirror %s: %s", mirror.prefix, e)
            return _error(*code, f"mirror of {mirror.upstream}: {e}")
        except ImagestreamError as e:  # a malformed answer (BadImage)
            log.error("mirror %s: %s", mirror.prefix, e)
            return _error(502, "MANIFEST_INVALID", f"mirror of {mirror.upstream}: {e}")
        state = "proxied"
        image_name = tag_name(name, reference)
        if image_name is not None:
            try:
                state = "fallback; " + await mirrors.convert_on_pull(mirror, repository, reference, image_name)
            except ImagestreamError as e:  # the conversion's bookkeeping is down: the pull still goes on
                state = f"fallback; conversion not started: {e}"
            mirrors.stats.fallbacks += 1
            log.info("mirror: %s is not converted yet (%s): serving %s/%s:%s as it is, a normal pull", image_name,
                     state.split("; ", 1)[1], mirror.upstream, repository, reference)
        headers = {**API_VERSION, "Docker-Content-Digest": manifest.digest, "Content-Type": manifest.media_type,
                   "Content-Length": str(len(manifest.content)), HEADER: state[:200]}
        if request.method == "HEAD":
            return web.Response(status=200, headers=headers)
        return web.Response(body=manifest.content, headers=headers)

    async def upstream_blob(request: web.Request, name: str, digest: str) -> web.StreamResponse | None:
        """A blob of a mirrored repository that the endpoint does not hold: streamed through from the upstream,
        never stored. None: no mirror fronts `name`."""
        hit = await mirrors.match(name) if mirrors is not None else None
        if hit is None:
            return None
        mirror, repository = hit
        try:
            size, pieces = await mirrors.upstream_blob(mirror, repository, digest, head=request.method == "HEAD")
        except RegistryError as e:
            code = (404, "BLOB_UNKNOWN") if "missing from the registry" in str(e) else (503, "UNAVAILABLE")
            return _error(*code, f"mirror of {mirror.upstream}: {e}")
        except ImagestreamError as e:
            return _error(502, "BLOB_UNKNOWN", f"mirror of {mirror.upstream}: {e}")
        headers = {**API_VERSION, "Docker-Content-Digest": digest, "Content-Type": "application/octet-stream",
                   "Content-Length": str(size), HEADER: "proxied"}
        if request.method == "HEAD":
            return web.Response(status=200, headers=headers)
        response = web.StreamResponse(status=200, headers=headers)
        await response.prepare(request)
        try:
            async for data in pieces:
                await response.write(data)
        except ImagestreamError as e:  # headers are gone: cut the body short, the client sees a short read
            log.error("mirror %s: blob %s cut short: %s", mirror.prefix, digest, e)
            raise
        await response.write_eof()
        log.info("mirror: proxied blob %s (%d bytes) from %s/%s", digest[:19], size, mirror.upstream, repository)
        return response

    async def denied(request: web.Request, name: str, digest: str | None = None) -> web.Response | None:
        caller = _caller(request)
        if reads is None or caller is None:
            return None
        try:
            await reads.check_repository(caller, name, digest)
        except PermissionDenied as e:
            return _error(403, "DENIED", f"{caller.name!r}: {e}")
        except ImagestreamError as e:
            return _error(503, "UNAVAILABLE", f"read permission unknown: {e}")
        return None

    @routes.get("/v2/")  # HEAD too
    async def base(request: web.Request) -> web.Response:
        return web.json_response({}, headers=API_VERSION)

    @routes.get("/v2/{name:.+}/manifests/{reference}")  # HEAD too
    async def manifest(request: web.Request) -> web.StreamResponse:
        name, reference = request.match_info["name"], request.match_info["reference"]
        by_digest = reference if reference.startswith("sha256:") else None  # a digest must be one of the tenant's
        if (refused := await denied(request, name, by_digest)) is not None:
            return refused
        try:
            record = await distribution.manifest(name, reference)
            body = b"" if request.method == "HEAD" else await distribution.read_all(record)
        except NotFound as e:
            if (answer := await upstream_manifest(request, name, reference)) is not None:
                return answer
            return _error(404, "MANIFEST_UNKNOWN", str(e))
        except InvalidArgument as e:
            return _error(400, "MANIFEST_INVALID", str(e))
        except ImagestreamError as e:
            return _error(503, "UNAVAILABLE", str(e))
        headers = {**API_VERSION, "Docker-Content-Digest": record.digest, "Content-Type": record.media_type,
                   "Content-Length": str(record.size)}
        if request.method == "HEAD":
            return web.Response(status=200, headers=headers)
        return web.Response(body=body, headers=headers)

    @routes.get("/v2/{name:.+}/blobs/{digest}")  # HEAD too
    async def blob(request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        if (refused := await denied(request, request.match_info["name"], digest)) is not None:
            return refused
        try:
            record = await distribution.blob(check_digest(digest))
        except InvalidArgument as e:
            return _error(400, "DIGEST_INVALID", str(e))
        except NotFound as e:
            if (answer := await upstream_blob(request, request.match_info["name"], digest)) is not None:
                return answer
            return _error(404, "BLOB_UNKNOWN", str(e))
        except ImagestreamError as e:
            return _error(503, "UNAVAILABLE", str(e))
        headers = {**API_VERSION, "Docker-Content-Digest": record.digest,
                   "Content-Type": record.media_type or "application/octet-stream",
                   "Content-Length": str(record.size), "Accept-Ranges": "none"}
        if request.method == "HEAD":
            return web.Response(status=200, headers=headers)
        response = web.StreamResponse(status=200, headers=headers)
        await response.prepare(request)
        try:
            async for data in distribution.read(record):
                await response.write(data)
        except ImagestreamError as e:  # headers are gone: cut the body short, the client sees a short read
            log.error("blob %s cut short: %s", digest, e)
            raise
        await response.write_eof()
        log.info("served blob %s (%d bytes) to %s", digest[:19], record.size, request.remote)
        return response

    application = web.Application()
    application.add_routes(routes)
    return application


async def start(distribution: Distribution, listen: str, reads=None, mirrors=None) -> web.AppRunner:  # type: ignore[no-untyped-def]
    """Serve on host:port; returns the runner (await runner.cleanup() to stop)."""
    host, _, port = listen.rpartition(":")
    ssl_context = tls.server_ssl_context() if tls.enabled() else None
    application = app(distribution, reads, mirrors)
    if ssl_context is not None:
        renewal = asyncio.get_running_loop().create_task(tls.keep_renewed(ssl_context))

        async def stop_renewal(_: web.Application) -> None:
            renewal.cancel()

        application.on_cleanup.append(stop_renewal)
    runner = web.AppRunner(application, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host or "127.0.0.1", int(port), ssl_context=ssl_context).start()
    log.info("OCI distribution (read side) serving on %s://%s/v2/", "https" if ssl_context else "http", listen)
    return runner
