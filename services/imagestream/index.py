"""Reading an image index: load it through a chunk store, look up inodes, list its chunks."""

from __future__ import annotations

from collections.abc import Iterator

from imagestream.digests import Digest, decompress_verified
from imagestream.errors import BadImage, CorruptChunk, FailedPrecondition
from imagestream.index_checks import check
from imagestream.store.base import ChunkStore
from imagestream.v1 import images_pb2, index_pb2

ROOT_INODE = 1


class Index:
    """An ImageIndex with lookups by inode number and by (directory, name).

    Checked on construction (index_checks): whatever it came from, what follows may trust its shape.
    """

    def __init__(self, message: index_pb2.ImageIndex) -> None:
        check(message)
        self.message = message
        self.chunk_size = message.chunk_size
        self.inodes = message.inodes
        self._children: dict[int, dict[bytes, int]] = {}

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
        stack = [iter((prefix + b"/" + e.name, e.inode) for e in self.inode(ino).entries)]
        while stack:  # not recursive: depth is bounded by index_checks, not by Python's stack
            item = next(stack[-1], None)
            if item is None:
                stack.pop()
                continue
            path, child = item
            yield path, child
            if self.inode(child).type == index_pb2.Inode.DIRECTORY:
                stack.append(iter([(path + b"/" + e.name, e.inode) for e in self.inode(child).entries]))

    def config(self) -> dict:
        """The source image's config (Env, WorkingDir, Cmd, ...), {} if it has none."""
        return _config(self.message)

    def chunks(self) -> list[Digest]:
        """Every distinct chunk the image's files are made of, in index order."""
        seen: dict[Digest, None] = {}
        for inode in self.inodes:
            for ext in inode.extents:
                if ext.HasField("chunk"):
                    seen[Digest.from_proto(ext.chunk)] = None
        return list(seen)


def _config(message: index_pb2.ImageIndex) -> dict:
    import json

    if not message.config_json:
        return {}
    try:
        value = json.loads(message.config_json)
    except ValueError as e:  # UnicodeDecodeError is a ValueError
        raise BadImage(f"index: config is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise BadImage("index: config is not a JSON object")
    return value


async def load_index(store: ChunkStore, digest: Digest) -> Index:
    compressed = await store.get(digest)
    try:
        data = decompress_verified(digest, compressed)
    except CorruptChunk:
        # a bad copy (a node's file): drop it and ask once more, so that the tier holding it fetches it again
        await store.delete(digest)
        data = decompress_verified(digest, await store.get(digest))
    return Index.parse(data)


async def load_config(store: ChunkStore, digest: Digest) -> dict:
    """Only the runtime config of an index (`run` reads no more of it; whoever reads the tree loads it
    whole, checked)."""
    message = index_pb2.ImageIndex()
    try:
        message.ParseFromString(decompress_verified(digest, await store.get(digest)))
    except Exception as e:  # protobuf raises DecodeError, which is not exported stably
        raise BadImage(f"index: cannot be parsed ({e})") from None
    return _config(message)


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
