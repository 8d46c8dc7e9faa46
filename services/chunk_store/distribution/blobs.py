"""The regional tier's OCI Distribution side: blob records and tags, checked when recorded and read back
piece by piece. `push` writes through the Distribution gRPC service (`grpc_service.py`); nodes and
containerd read over HTTP (`http.py`)."""

from __future__ import annotations

import abc
import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Iterable

from imagestream.digests import Digest, compress, decompress_verified
from imagestream.errors import FailedPrecondition, InvalidArgument, NotFound
from imagestream.names import WritableImageNames, validate_name
from imagestream.oci import MANIFEST_TYPES, PIECE_SIZE, REFERENCE, BlobRecord, check_digest, repository_and_tag
from imagestream.store.base import ChunkStore
from imagestream.v1 import images_pb2


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

    @abc.abstractmethod
    async def delete_tag(self, repository: str, reference: str) -> None: ...

    async def touch(self, digest: str) -> None:
        """A push found the blob recorded and relies on it: gc's grace period starts again."""

    # for gc (chunk_store/gc.py): every record with when it was last used, every tag, a delete that loses
    # to a touch in between
    @abc.abstractmethod
    async def all_blobs(self) -> list[tuple[str, int | None]]: ...

    @abc.abstractmethod
    async def all_tags(self) -> list[tuple[str, str, str]]: ...

    @abc.abstractmethod
    async def delete_blob_if(self, digest: str, used_at: int | None) -> bool: ...


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

    async def delete_tag(self, repository: str, reference: str) -> None:
        self.tags.pop((repository, reference), None)

    async def all_blobs(self) -> list[tuple[str, int | None]]:
        return [(d, 0) for d in self.blobs]

    async def all_tags(self) -> list[tuple[str, str, str]]:
        return [(r, t, d) for (r, t), d in self.tags.items()]

    async def delete_blob_if(self, digest: str, used_at: int | None) -> bool:
        return self.blobs.pop(digest, None) is not None


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
        """Store a manifest whose blobs are all recorded; tag it `reference` (empty: stored untagged)."""
        if reference and not REFERENCE.match(reference):
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
        digest = await self._store_manifest(media_type, content)
        if reference:
            await self.index.put_tag(repository, reference, digest)
        return digest

    async def put_proxied_manifest(self, media_type: str, content: bytes) -> str:
        """Store, untagged, a mirrored image's manifest (chunk_store/mirror.py): its layer blobs stay in the
        upstream registry, which the OCI endpoint proxies them from."""
        if media_type not in MANIFEST_TYPES:
            raise InvalidArgument(f"manifest media type {media_type!r} is not one of {', '.join(MANIFEST_TYPES)}")
        return await self._store_manifest(media_type, content)

    async def _store_manifest(self, media_type: str, content: bytes) -> str:
        return await self.put_small_blob(media_type, content)

    async def put_small_blob(self, media_type: str, content: bytes) -> str:
        """Store a blob held in memory (a manifest, a config) as pieces, and record it; returns its digest."""
        pieces = []
        for offset in range(0, max(1, len(content)), PIECE_SIZE):
            data = content[offset : offset + PIECE_SIZE]
            piece = Digest.of(data)
            await self.store.put(piece, compress(data))
            pieces.append(piece)
        digest = "sha256:" + hashlib.sha256(content).hexdigest()
        await self.index.put_blob(BlobRecord(digest, len(content), media_type, pieces))
        return digest

    async def find_missing(self, digests: Iterable[str]) -> list[str]:
        """The blobs not recorded; those recorded are marked used (gc keeps them for the push that asked)."""
        missing = []
        for d in dict.fromkeys(digests):
            if await self.index.get_blob(check_digest(d)) is None:
                missing.append(d)
            else:
                await self.index.touch(d)
        return missing

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


class TaggedNames(WritableImageNames):
    """The regional names, with the OCI endpoint's tags kept in step: publishing NAME tags the image's
    manifest as NAME's repository:tag, deleting NAME removes that tag. So a tag never outlives its
    name (containerd can no longer pull a removed image), and a push that fails before its name is
    published leaves no tag behind (the manifest was stored untagged)."""

    def __init__(self, names: WritableImageNames, distribution: Distribution) -> None:
        self.names = names
        self.distribution = distribution

    async def resolve(self, name: str) -> images_pb2.Image:
        return await self.names.resolve(name)

    async def list(self) -> list[images_pb2.Image]:
        return await self.names.list()

    async def set_profile(self, name: str, index: Digest, profile: Digest) -> images_pb2.Image:
        return await self.names.set_profile(name, index, profile)

    async def publish(self, image: images_pb2.Image) -> images_pb2.Image:
        repository, tag = repository_and_tag(validate_name(image.name))
        if image.manifest_digest:
            record = await self.distribution.index.get_blob(check_digest(image.manifest_digest))
            if record is None or record.media_type not in MANIFEST_TYPES:
                raise FailedPrecondition(f"image {image.name!r}: manifest {image.manifest_digest} is not stored")
            await self.distribution.index.put_tag(repository, tag, image.manifest_digest)
        try:
            return await self.names.publish(image)
        except BaseException:
            if image.manifest_digest:  # the name did not make it: neither does its tag
                await asyncio.shield(self.distribution.index.delete_tag(repository, tag))
            raise

    async def delete(self, name: str) -> bool:
        deleted = await self.names.delete(name)
        await self.distribution.index.delete_tag(*repository_and_tag(validate_name(name)))
        return deleted

    async def close(self) -> None:
        await self.names.close()
