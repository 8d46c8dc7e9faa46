"""What `push` received, kept so that every pushed image can be pulled the normal way (OCI Distribution).

A blob (manifest, config, layer) is stored as *pieces*, chunks of the chunk store
of at most PIECE_SIZE bytes, plus a record: digest, size, media type, pieces.
Tags name manifests per repository. The regional tier serves them read-only on
HTTP (`chunk_store.oci_http`); `push` writes them through the Distribution gRPC
service (`imagestream.v1.Distribution`).

How a node tells a streamable image (the snapshotter's side of it): `push` adds
annotations to every layer descriptor of the manifest it stores, under the
prefix containerd passes on to snapshotters as labels while unpacking
(`containerd.io/snapshot/`):

    containerd.io/snapshot/imagestream.image   the imagestream name to mount
    containerd.io/snapshot/imagestream.index   the index it must point at (sha256:<hex>/<size>)
    containerd.io/snapshot/imagestream.layer   "<i>/<n>": this layer's place in the image
    containerd.io/snapshot/imagestream.blob    the layer's blob digest (to unpack it if it must be)

An image pushed with `--no-streaming` gets none, and is pulled and unpacked as usual.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import hashlib
import io
import json
import re
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import IO, Any

import grpc

from imagestream.digests import Digest, compress, decompress_verified
from imagestream.errors import FailedPrecondition, InvalidArgument, NotFound
from imagestream.store.base import ChunkStore
from imagestream.v1 import distribution_pb2, distribution_pb2_grpc

PIECE_SIZE = 4 << 20

LABEL_PREFIX = "containerd.io/snapshot/imagestream."
LABEL_IMAGE = LABEL_PREFIX + "image"
LABEL_INDEX = LABEL_PREFIX + "index"
LABEL_LAYER = LABEL_PREFIX + "layer"
LABEL_BLOB = LABEL_PREFIX + "blob"  # the layer's own blob digest: to unpack it after all, if it must be

MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MANIFEST_TYPES = (MEDIA_OCI_MANIFEST, "application/vnd.docker.distribution.manifest.v2+json")

_OCI_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")
_REFERENCE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _OCI_DIGEST.match(digest):
        raise InvalidArgument(f"malformed blob digest {digest!r}: want sha256:<64 lower-case hex digits>")
    return digest


def repository_and_tag(name: str) -> tuple[str, str]:
    """'debian-python:e2e' -> ('debian-python', 'e2e'); no tag means 'latest'."""
    repository, sep, tag = name.rpartition(":")
    if not sep or "/" in tag:
        return name, "latest"
    return repository, tag


# -- which images stream -------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StreamedLayer:
    """A layer snapshot that is part of a streamable image (from the labels containerd passes)."""

    image: str
    index: Digest
    position: int  # 1-based
    count: int
    blob: str = ""  # the layer blob's digest ("sha256:<hex>"), if the manifest said

    @property
    def is_top(self) -> bool:
        return self.position == self.count

    def labels(self) -> dict[str, str]:
        labels = {LABEL_IMAGE: self.image, LABEL_INDEX: f"sha256:{self.index.hash}/{self.index.size}",
                  LABEL_LAYER: f"{self.position}/{self.count}"}
        if self.blob:
            labels[LABEL_BLOB] = self.blob
        return labels

    @classmethod
    def from_labels(cls, labels: dict[str, str]) -> StreamedLayer | None:
        """None unless all three labels are there; InvalidArgument if they are there but malformed."""
        if not all(k in labels for k in (LABEL_IMAGE, LABEL_INDEX, LABEL_LAYER)):
            return None
        m = re.fullmatch(r"sha256:([0-9a-f]{64})/(\d+)", labels[LABEL_INDEX])
        n = re.fullmatch(r"(\d+)/(\d+)", labels[LABEL_LAYER])
        if not m or not n or not 1 <= int(n.group(1)) <= int(n.group(2)):
            raise InvalidArgument(f"malformed imagestream labels: {labels[LABEL_INDEX]!r}, {labels[LABEL_LAYER]!r}")
        from imagestream.digests import parse

        blob = labels.get(LABEL_BLOB, "")
        return cls(labels[LABEL_IMAGE], parse(m.group(1), int(m.group(2))), int(n.group(1)), int(n.group(2)),
                   check_digest(blob) if blob else "")


def annotate_for_streaming(manifest: dict[str, Any], name: str, index: Digest) -> dict[str, Any]:
    """A copy of `manifest` whose layer descriptors say which streamed image they belong to."""
    out = json.loads(json.dumps(manifest))
    layers = out.get("layers") or []
    for i, layer in enumerate(layers, 1):
        layer["annotations"] = {**(layer.get("annotations") or {}),
                                **StreamedLayer(name, index, i, len(layers), layer.get("digest", "")).labels()}
    return out


# -- the records ---------------------------------------------------------------

@dataclasses.dataclass
class BlobRecord:
    digest: str
    size: int
    media_type: str
    pieces: list[Digest]

    def to_proto(self) -> distribution_pb2.Blob:
        return distribution_pb2.Blob(digest=self.digest, size=self.size, media_type=self.media_type,
                                     pieces=[p.to_proto() for p in self.pieces])

    @classmethod
    def from_proto(cls, m: distribution_pb2.Blob) -> BlobRecord:
        return cls(check_digest(m.digest), m.size, m.media_type, [Digest.from_proto(p) for p in m.pieces])

    def pieces_bytes(self) -> bytes:
        return distribution_pb2.Blob(pieces=[p.to_proto() for p in self.pieces]).SerializeToString()

    @staticmethod
    def parse_pieces(data: bytes) -> list[Digest]:
        m = distribution_pb2.Blob()
        m.ParseFromString(data)
        return [Digest.from_proto(p) for p in m.pieces]


class BlobIndex(abc.ABC):
    """Blob records and tags (the regional store keeps them in Cassandra)."""

    @abc.abstractmethod
    async def put_blob(self, record: BlobRecord) -> None: ...

    @abc.abstractmethod
    async def get_blob(self, digest: str) -> BlobRecord | None: ...

    @abc.abstractmethod
    async def put_tag(self, repository: str, reference: str, digest: str) -> None: ...

    @abc.abstractmethod
    async def get_tag(self, repository: str, reference: str) -> str | None: ...


class MemoryBlobIndex(BlobIndex):
    def __init__(self) -> None:
        self.blobs: dict[str, BlobRecord] = {}
        self.tags: dict[tuple[str, str], str] = {}

    async def put_blob(self, record: BlobRecord) -> None:
        self.blobs[record.digest] = record

    async def get_blob(self, digest: str) -> BlobRecord | None:
        return self.blobs.get(digest)

    async def put_tag(self, repository: str, reference: str, digest: str) -> None:
        self.tags[(repository, reference)] = digest

    async def get_tag(self, repository: str, reference: str) -> str | None:
        return self.tags.get((repository, reference))


class Distribution:
    """The regional side: checks what is recorded, and reads blobs back."""

    def __init__(self, store: ChunkStore, index: BlobIndex) -> None:
        self.store = store
        self.index = index

    async def put_blob(self, record: BlobRecord) -> None:
        check_digest(record.digest)
        if sum(p.size for p in record.pieces) != record.size:
            raise InvalidArgument(f"blob {record.digest}: pieces add up to {sum(p.size for p in record.pieces)} bytes, "
                                  f"not {record.size}")
        missing = await self.store.find_missing(record.pieces)
        if missing:
            raise FailedPrecondition(f"blob {record.digest}: {len(missing)} of {len(record.pieces)} pieces are not stored")
        h = hashlib.sha256()
        async for data in self._read(record):
            h.update(data)
        if "sha256:" + h.hexdigest() != record.digest:
            raise InvalidArgument(f"blob {record.digest}: its pieces make sha256:{h.hexdigest()}, refused")
        await self.index.put_blob(record)

    async def put_manifest(self, repository: str, reference: str, media_type: str, content: bytes) -> str:
        if not _REFERENCE.match(reference):
            raise InvalidArgument(f"invalid tag {reference!r}")
        if media_type not in MANIFEST_TYPES:
            raise InvalidArgument(f"manifest media type {media_type!r} is not one of {', '.join(MANIFEST_TYPES)}")
        try:
            doc = json.loads(content)
            wanted = [doc["config"]["digest"], *(layer["digest"] for layer in doc.get("layers") or [])]
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidArgument(f"manifest for {repository}:{reference} is not an image manifest ({e})") from None
        missing = [d for d in wanted if await self.index.get_blob(check_digest(d)) is None]
        if missing:
            raise FailedPrecondition(f"manifest for {repository}:{reference}: blob {missing[0]} is not stored "
                                     f"({len(missing)} missing)")
        piece = Digest.of(content)
        await self.store.put(piece, compress(content))
        digest = "sha256:" + piece.hash
        await self.index.put_blob(BlobRecord(digest, len(content), media_type, [piece]))
        await self.index.put_tag(repository, reference, digest)
        return digest

    async def find_missing(self, digests: Iterable[str]) -> list[str]:
        return [d for d in dict.fromkeys(digests) if await self.index.get_blob(check_digest(d)) is None]

    async def manifest(self, repository: str, reference: str) -> BlobRecord:
        """The manifest a tag or digest names in `repository`; NotFound otherwise."""
        digest = reference if reference.startswith("sha256:") else await self.index.get_tag(repository, reference)
        if digest is None:
            raise NotFound(f"manifest {repository}:{reference} is unknown")
        record = await self.index.get_blob(check_digest(digest))
        if record is None or record.media_type not in MANIFEST_TYPES:
            raise NotFound(f"manifest {repository}@{digest} is unknown")
        return record

    async def blob(self, digest: str) -> BlobRecord:
        record = await self.index.get_blob(check_digest(digest))
        if record is None:
            raise NotFound(f"blob {digest} is unknown")
        return record

    async def read_all(self, record: BlobRecord) -> bytes:
        return b"".join([data async for data in self._read(record)])

    def read(self, record: BlobRecord) -> AsyncIterator[bytes]:
        return self._read(record)

    async def _read(self, record: BlobRecord) -> AsyncIterator[bytes]:
        """The blob's bytes, piece by piece, each checked against its digest; the next piece is fetched
        while this one is sent."""
        ahead: asyncio.Task[bytes] | None = None

        async def fetch(piece: Digest) -> bytes:
            compressed = await self.store.get(piece)
            return await asyncio.to_thread(decompress_verified, piece, compressed)

        try:
            for i, piece in enumerate(record.pieces):
                current = ahead if ahead is not None else asyncio.ensure_future(fetch(piece))
                ahead = asyncio.ensure_future(fetch(record.pieces[i + 1])) if i + 1 < len(record.pieces) else None
                yield await current
        finally:
            if ahead is not None:
                ahead.cancel()


# -- gRPC ----------------------------------------------------------------------

class DistributionServicer(distribution_pb2_grpc.DistributionServicer):
    def __init__(self, distribution: Distribution) -> None:
        self.distribution = distribution

    async def PutBlob(self, request, context):  # type: ignore[no-untyped-def]
        from imagestream.grpc_server import _status_on_error

        async with _status_on_error(context):
            await self.distribution.put_blob(BlobRecord.from_proto(request.blob))
            return distribution_pb2.PutBlobResponse()

    async def PutManifest(self, request, context):  # type: ignore[no-untyped-def]
        from imagestream.grpc_server import _status_on_error

        async with _status_on_error(context):
            digest = await self.distribution.put_manifest(request.repository, request.reference, request.media_type,
                                                          request.content)
            return distribution_pb2.PutManifestResponse(digest=digest)

    async def FindMissingBlobs(self, request, context):  # type: ignore[no-untyped-def]
        from imagestream.grpc_server import _status_on_error

        async with _status_on_error(context):
            missing = await self.distribution.find_missing(request.digests)
            return distribution_pb2.FindMissingBlobsResponse(missing=missing)


class GrpcDistribution:
    """The client `push` uses."""

    def __init__(self, target: str, timeout_s: float = 120.0) -> None:
        from imagestream.grpc_client import channel

        self.target = target
        self.timeout_s = timeout_s
        self._channel = channel(target)
        self._stub = distribution_pb2_grpc.DistributionStub(self._channel)

    async def _call(self, method, request):  # type: ignore[no-untyped-def]
        from imagestream.grpc_client import to_error

        try:
            return await method(request, timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise to_error(self.target, e) from None

    async def put_blob(self, record: BlobRecord) -> None:
        await self._call(self._stub.PutBlob, distribution_pb2.PutBlobRequest(blob=record.to_proto()))

    async def put_manifest(self, repository: str, reference: str, media_type: str, content: bytes) -> str:
        request = distribution_pb2.PutManifestRequest(repository=repository, reference=reference,
                                                      media_type=media_type, content=content)
        return (await self._call(self._stub.PutManifest, request)).digest

    async def find_missing(self, digests: list[str]) -> list[str]:
        request = distribution_pb2.FindMissingBlobsRequest(digests=digests)
        return list((await self._call(self._stub.FindMissingBlobs, request)).missing)

    async def close(self) -> None:
        await self._channel.close()


# -- push's side -----------------------------------------------------------------

def split_pieces(f: IO[bytes]) -> Iterator[tuple[bytes, Digest, bytes]]:
    """(raw piece, its digest, its zstd frame) for consecutive PIECE_SIZE pieces of `f`."""
    while piece := f.read(PIECE_SIZE):
        yield piece, Digest.of(piece), compress(piece)



def _layer_media_type(head: bytes) -> str:
    if head[:2] == b"\x1f\x8b":
        return "application/vnd.oci.image.layer.v1.tar+gzip"
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return "application/vnd.oci.image.layer.v1.tar+zstd"
    return "application/vnd.oci.image.layer.v1.tar"


async def push_blobs(source, chunks: ChunkStore, dist: GrpcDistribution, name: str,  # type: ignore[no-untyped-def]
                     index: Digest | None, on_bytes=lambda n: None) -> tuple[str, int]:
    """Store the source's config and layer blobs as received, then its manifest under NAME's tag.

    `index` set: the image streams, and the stored manifest's layers carry the annotations a node's
    snapshotter looks for (see the module's doc). An OCI source keeps its manifest (plus those
    annotations); a docker archive, which has none, gets an OCI manifest made for it. Blobs already
    recorded are not read again. Returns the stored manifest's digest and the bytes uploaded.
    """
    from imagestream.errors import BadImage

    uploaded = 0

    async def store_blob(opener, media_type: str, expected: str | None) -> dict[str, Any]:
        nonlocal uploaded
        h, size, pieces = hashlib.sha256(), 0, []
        with opener() as f:
            parts = split_pieces(f)
            while (item := await asyncio.to_thread(next, parts, None)) is not None:
                raw, digest, compressed = item
                h.update(raw)
                size += len(raw)
                pieces.append(digest)
                if await chunks.find_missing([digest]):
                    await chunks.put(digest, compressed)
                    uploaded += len(compressed)
                if not media_type:
                    media_type = _layer_media_type(raw[:4])
                on_bytes(len(raw))
        actual = "sha256:" + h.hexdigest()
        if expected is not None and actual != expected:
            raise BadImage(f"blob {expected} does not match its digest (content is {actual})")
        await dist.put_blob(BlobRecord(actual, size, media_type, pieces))
        return {"mediaType": media_type, "digest": actual, "size": size}

    manifest = source.manifest
    if manifest is not None:  # OCI: the blobs are named by the manifest
        descriptors = [manifest["config"], *manifest.get("layers", [])]
        missing = set(await dist.find_missing([d["digest"] for d in descriptors]))
        if manifest["config"]["digest"] in missing:
            await store_blob(lambda: io.BytesIO(source.config_bytes), manifest["config"].get("mediaType", MEDIA_OCI_CONFIG),
                             manifest["config"]["digest"])
        for layer, descriptor in zip(source.layers, manifest.get("layers", [])):
            if descriptor["digest"] in missing:
                await store_blob(lambda layer=layer: source._open(layer.blob_name), descriptor.get("mediaType", ""),
                                 layer.digest)
    else:  # docker archive: make an OCI manifest for what it holds
        config = await store_blob(lambda: io.BytesIO(source.config_bytes), MEDIA_OCI_CONFIG, None)
        layers = [await store_blob(lambda layer=layer: source._open(layer.blob_name), "", None) for layer in source.layers]
        manifest = {"schemaVersion": 2, "mediaType": MEDIA_OCI_MANIFEST, "config": config, "layers": layers}
    if index is not None:
        manifest = annotate_for_streaming(manifest, name, index)
    media_type = manifest.get("mediaType") or MEDIA_OCI_MANIFEST
    content = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
    repository, tag = repository_and_tag(name)
    return await dist.put_manifest(repository, tag, media_type, content), uploaded
