"""The read side of the OCI Distribution API, served by the regional tier on HTTP (aiohttp).

    GET|HEAD /v2/                              200: this is a registry (API version registry/2.0)
    GET|HEAD /v2/<name>/manifests/<tag|digest>  the manifest `push` stored for <name>:<tag>
    GET|HEAD /v2/<name>/blobs/<digest>          a config or layer blob, streamed piece by piece

Read-only and unauthenticated, like a pull-through mirror on a trusted network:
images are written by `imagestream push` only. Blobs are content-addressed and
shared by every repository. Errors use the API's JSON error codes.
"""

from __future__ import annotations

import logging

from aiohttp import web

from chunk_store.distribution.blobs import Distribution
from imagestream.oci import check_digest
from imagestream.errors import ImagestreamError, InvalidArgument, NotFound

log = logging.getLogger(__name__)

API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"errors": [{"code": code, "message": message}]}, status=status, headers=API_VERSION)


def app(distribution: Distribution) -> web.Application:
    routes = web.RouteTableDef()

    @routes.get("/v2/")  # HEAD too
    async def base(request: web.Request) -> web.Response:
        return web.json_response({}, headers=API_VERSION)

    @routes.get("/v2/{name:.+}/manifests/{reference}")  # HEAD too
    async def manifest(request: web.Request) -> web.StreamResponse:
        name, reference = request.match_info["name"], request.match_info["reference"]
        try:
            record = await distribution.manifest(name, reference)
            body = b"" if request.method == "HEAD" else await distribution.read_all(record)
        except NotFound as e:
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
        try:
            record = await distribution.blob(check_digest(digest))
        except InvalidArgument as e:
            return _error(400, "DIGEST_INVALID", str(e))
        except NotFound as e:
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


async def start(distribution: Distribution, listen: str) -> web.AppRunner:
    """Serve on host:port; returns the runner (await runner.cleanup() to stop)."""
    host, _, port = listen.rpartition(":")
    runner = web.AppRunner(app(distribution), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host or "127.0.0.1", int(port)).start()
    log.info("OCI distribution (read side) serving on http://%s/v2/", listen)
    return runner
