"""Per-image read permission at the regional tier: a tenant reads only the images under its name prefixes.

The policy file (IMAGESTREAM_TENANTS) has one line per tenant, `TENANT PREFIX [PREFIX...]`, `#` comments:

    acme     acme/ shared/base
    globex   globex/

A caller whose certificate names a tenant (SAN URI imagestream://tenant/NAME) may resolve, list, publish,
delete and read only the names starting with one of its prefixes, and only the chunks and blobs of those
images (their index, startup profile and content chunks; their manifest, config and layers). A tenant the
file does not list reads nothing. Callers whose certificate names no tenant (the zonal caches, nodes shared
by every tenant) are not restricted. Chunks are shared between images: a tenant may read a chunk that is
also in another namespace's image, but only because one of its own images holds it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import pathlib
import time

from imagestream import tls
from imagestream.digests import Digest
from imagestream.errors import BadImage, CorruptChunk, ImagestreamError, NotFound, PermissionDenied
from imagestream.index import load_index
from imagestream.names import ImageNames
from imagestream.oci import repository_and_tag
from imagestream.rpc.server import ReadPolicy
from imagestream.store.base import ChunkStore
from imagestream.v1 import images_pb2

log = logging.getLogger(__name__)

_NAMED = {  # methods whose request names one image
    "/imagestream.v1.Images/ResolveImage": lambda r: r.name,
    "/imagestream.v1.Images/DeleteImage": lambda r: r.name,
    "/imagestream.v1.Images/SetProfile": lambda r: r.name,
    "/imagestream.v1.Images/PublishImage": lambda r: r.image.name,
}
_CHUNKS = {
    "/imagestream.v1.ChunkStore/GetChunk": lambda r: [r.digest],
    "/imagestream.v1.ChunkStore/GetChunks": lambda r: list(r.digests),
}


class PolicyError(ImagestreamError):
    pass


def parse_policy(text: str, source: str = "tenant policy") -> dict[str, tuple[str, ...]]:
    prefixes: dict[str, tuple[str, ...]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) < 2:
            raise PolicyError(f"{source}:{n}: expected 'TENANT PREFIX [PREFIX...]', got {line.strip()!r}")
        if words[0] in prefixes:
            raise PolicyError(f"{source}:{n}: tenant {words[0]!r} listed twice")
        prefixes[words[0]] = tuple(words[1:])
    return prefixes


def load_policy(path: str) -> dict[str, tuple[str, ...]]:
    try:
        text = pathlib.Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError(f"tenant policy {path}: cannot read it ({e})") from None
    return parse_policy(text, path)


class TenantReads(ReadPolicy):
    """The read policy of the regional tier's gRPC interceptor and its OCI endpoint."""

    def __init__(self, prefixes: dict[str, tuple[str, ...]], names: ImageNames, store: ChunkStore,
                 distribution=None, refresh_s: float = 2.0) -> None:  # type: ignore[no-untyped-def]
        self.prefixes = prefixes
        self.names = names
        self.store = store
        self.distribution = distribution
        self.refresh_s = refresh_s
        self._index_chunks: dict[Digest, frozenset[Digest]] = {}  # indexes never change: kept
        self._manifest_blobs: dict[str, frozenset[str]] = {}
        self._readable: dict[str, tuple[float, frozenset[Digest], frozenset[str]]] = {}
        self._lock = asyncio.Lock()

    def may_name(self, caller: tls.Caller, name: str) -> bool:
        return caller.tenant is None or any(name.startswith(p) for p in self.prefixes.get(caller.tenant, ()))

    def _refuse_name(self, caller: tls.Caller, name: str) -> PermissionDenied:
        prefixes = self.prefixes.get(caller.tenant or "", ())
        where = f"its prefixes are {', '.join(map(repr, prefixes))}" if prefixes else "the policy lists none"
        return PermissionDenied(f"tenant {caller.tenant!r} may not read {name!r}: {where}")

    async def check(self, caller: tls.Caller, method: str, request) -> None:  # type: ignore[no-untyped-def]
        if caller.tenant is None:
            return
        if method in _NAMED:
            name = _NAMED[method](request)
            if not self.may_name(caller, name):
                raise self._refuse_name(caller, name)
        elif method in _CHUNKS:
            wanted = {Digest.from_proto(d) for d in _CHUNKS[method](request)}
            chunks, _ = await self._tenant(caller.tenant)
            if not wanted <= chunks:
                chunks, _ = await self._tenant(caller.tenant, fresh=True)  # published since: look again
            outside = wanted - chunks
            if outside:
                raise PermissionDenied(f"tenant {caller.tenant!r} may not read chunk {min(outside)}: it is in no "
                                       "image under the tenant's prefixes")

    def filter(self, caller: tls.Caller, method: str, response):  # type: ignore[no-untyped-def]
        if caller.tenant is None or method != "/imagestream.v1.Images/ListImages":
            return response
        return images_pb2.ListImagesResponse(images=[i for i in response.images if self.may_name(caller, i.name)])

    async def check_repository(self, caller: tls.Caller, repository: str, blob: str | None = None) -> None:
        """The OCI endpoint: a manifest of `repository`, or one of its blobs."""
        if caller.tenant is None:
            return
        if not self.may_name(caller, repository):
            raise self._refuse_name(caller, repository)
        if blob is not None:
            _, blobs = await self._tenant(caller.tenant)
            if blob not in blobs:
                _, blobs = await self._tenant(caller.tenant, fresh=True)
            if blob not in blobs:
                raise PermissionDenied(f"tenant {caller.tenant!r} may not read blob {blob}: it is in no image "
                                       "under the tenant's prefixes")

    async def _tenant(self, tenant: str, fresh: bool = False) -> tuple[frozenset[Digest], frozenset[str]]:
        """The chunks and blobs of the tenant's images, listed again at most every refresh_s."""
        async with self._lock:
            cached = self._readable.get(tenant)
            if cached is not None and (not fresh or time.monotonic() - cached[0] < self.refresh_s):
                return cached[1], cached[2]
            chunks: set[Digest] = set()
            blobs: set[str] = set()
            prefixes = self.prefixes.get(tenant, ())
            for image in await self.names.list() if prefixes else []:
                if not any(image.name.startswith(p) for p in prefixes):
                    continue
                try:
                    chunks |= await self._chunks_of(image)
                    blobs |= await self._blobs_of(image.name)
                except (BadImage, NotFound, CorruptChunk) as e:  # one broken image hides only itself
                    log.warning("tenant %s: image %r left out of what it may read: %s", tenant, image.name, e)
            self._readable[tenant] = (time.monotonic(), frozenset(chunks), frozenset(blobs))
            return self._readable[tenant][1], self._readable[tenant][2]

    async def _chunks_of(self, image: images_pb2.Image) -> set[Digest]:
        index = Digest.from_proto(image.index)
        if index not in self._index_chunks:
            self._index_chunks[index] = frozenset([index, *(await load_index(self.store, index)).chunks()])
        found = set(self._index_chunks[index])
        if image.profile.hash:
            found.add(Digest.from_proto(image.profile))
        return found

    async def _blobs_of(self, name: str) -> set[str]:
        if self.distribution is None:
            return set()
        repository, tag = repository_and_tag(name)
        try:
            record = await self.distribution.manifest(repository, tag)
        except NotFound:
            return set()
        if record.digest not in self._manifest_blobs:
            try:
                manifest = json.loads(await self.distribution.read_all(record))
                listed = [manifest.get("config", {}).get("digest")] + [
                    layer.get("digest") for layer in manifest.get("layers", [])]
            except (ValueError, AttributeError, TypeError):
                listed = []
            self._manifest_blobs[record.digest] = frozenset(d for d in listed if isinstance(d, str))
        return {record.digest, *self._manifest_blobs[record.digest]}
