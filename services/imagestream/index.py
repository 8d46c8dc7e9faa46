"""Reading an image index: load it through a chunk store, look up inodes, list its chunks."""

from __future__ import annotations

from collections.abc import Iterator

from imagestream.digests import Digest, decompress_verified
from imagestream.errors import BadImage, CorruptChunk, FailedPrecondition
from imagestream.store.base import ChunkStore
from imagestream.v1 import images_pb2, index_pb2

ROOT_INODE = 1


class Index:
    """An ImageIndex with lookups by inode number and by (directory, name)."""

    def __init__(self, message: index_pb2.ImageIndex) -> None:
        self.message = message
        self.chunk_size = message.chunk_size
        self.inodes = message.inodes
        self._children: dict[int, dict[bytes, int]] = {}
        if not self.inodes or self.inodes[0].type != index_pb2.Inode.DIRECTORY:
            raise BadImage("index: inode 1 is not the root directory")
        if self.chunk_size <= 0:
            raise BadImage("index: chunk size is not set")

    @classmethod
    def parse(cls, data: bytes) -> Index:
        message = index_pb2.ImageIndex()
        try:
            message.ParseFromString(data)
        except Exception as e:  # protobuf raises DecodeError, which is not exported stably
            raise BadImage(f"index: cannot be parsed ({e})") from None
        return cls(message)

    def inode(self, ino: int) -> index_pb2.Inode:
        if not 1 <= ino <= len(self.inodes):
            raise KeyError(ino)
        return self.inodes[ino - 1]

    def lookup(self, parent: int, name: bytes) -> int | None:
        children = self._children.get(parent)
        if children is None:  # built on first use: mounting a big image stays fast
            children = self._children[parent] = {e.name: e.inode for e in self.inode(parent).entries}
        return children.get(name)

    def walk(self, ino: int = ROOT_INODE, prefix: bytes = b"") -> Iterator[tuple[bytes, int]]:
        """(path, inode) for every entry below `ino`, depth first, names in order."""
        for entry in self.inode(ino).entries:
            path = prefix + b"/" + entry.name
            yield path, entry.inode
            if self.inode(entry.inode).type == index_pb2.Inode.DIRECTORY:
                yield from self.walk(entry.inode, path)

    def config(self) -> dict:
        """The source image's config (Env, WorkingDir, Cmd, ...), {} if it has none."""
        import json

        if not self.message.config_json:
            return {}
        return json.loads(self.message.config_json)

    def chunks(self) -> list[Digest]:
        """Every distinct chunk the image's files are made of, in index order."""
        seen: dict[Digest, None] = {}
        for inode in self.inodes:
            for ext in inode.extents:
                if ext.HasField("chunk"):
                    seen[Digest.from_proto(ext.chunk)] = None
        return list(seen)


async def load_index(store: ChunkStore, digest: Digest) -> Index:
    compressed = await store.get(digest)
    try:
        data = decompress_verified(digest, compressed)
    except CorruptChunk:
        # a bad copy (a node's file): drop it and ask once more, so that the tier holding it fetches it again
        await store.delete(digest)
        data = decompress_verified(digest, await store.get(digest))
    return Index.parse(data)


async def ensure_complete(store: ChunkStore, image: images_pb2.Image) -> None:
    """Refuse to publish a name whose index or any chunk is not stored; fill in the counts."""
    index_digest = Digest.from_proto(image.index)
    if await store.find_missing([index_digest]):
        raise FailedPrecondition(f"image {image.name!r}: index {index_digest} is not stored")
    index = await load_index(store, index_digest)
    chunks = index.chunks()
    missing = await store.find_missing(chunks)
    if missing:
        raise FailedPrecondition(
            f"image {image.name!r}: {len(missing)} of {len(chunks)} chunks are not stored (first: {missing[0]})"
        )
    image.chunk_count = len(chunks)
    image.content_bytes = sum(
        inode.size for inode in index.inodes if inode.type == index_pb2.Inode.REGULAR
    )
