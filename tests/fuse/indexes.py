"""Hand-built image indexes for FUSE tests (cases a tar layer can't cheaply hold, like a 5 GiB sparse file)."""

from __future__ import annotations

import random

from imagestream.digests import Digest, compress
from imagestream.v1 import index_pb2

T = index_pb2.Inode
CHUNK = 64 * 1024
GIB = 1 << 30


class Builder:
    def __init__(self) -> None:
        self.index = index_pb2.ImageIndex(chunk_size=CHUNK)
        self.chunks: dict[Digest, bytes] = {}
        self.linked = set()
        self.root = self.add(T.DIRECTORY, mode=0o755)

    def add(self, type_: int, **fields) -> int:  # type: ignore[no-untyped-def]
        inode = self.index.inodes.add(type=type_, mtime_ns=1_600_000_000_123_456_789, nlink=1, **fields)
        if type_ == T.DIRECTORY:
            inode.nlink, inode.size = 2, 4096
        return len(self.index.inodes)

    def link(self, parent: int, name: bytes, ino: int) -> None:
        p = self.index.inodes[parent - 1]
        p.entries.add(name=name, inode=ino)
        child = self.index.inodes[ino - 1]
        if child.type == T.DIRECTORY:
            p.nlink += 1
        elif ino in self.linked:  # a second name: a hardlink
            child.nlink += 1
        self.linked.add(ino)

    def file(self, parent: int, name: bytes, data: bytes | None = None, size: int | None = None,
             data_at: dict[int, bytes] | None = None, **fields) -> int:  # type: ignore[no-untyped-def]
        """A regular file: `data`, or `size` bytes of holes with `data_at` {chunk number: chunk bytes}."""
        if data is not None:
            size = len(data)
        assert size is not None
        ino = self.add(T.REGULAR, size=size, mode=fields.pop("mode", 0o644), **fields)
        inode = self.index.inodes[ino - 1]
        for n, start in enumerate(range(0, size, CHUNK)):
            length = min(CHUNK, size - start)
            piece = data[start:start + length] if data is not None else (data_at or {}).get(n)
            ext = inode.extents.add(length=length)
            if piece is not None:
                d = Digest.of(piece)
                self.chunks[d] = compress(piece)
                ext.chunk.CopyFrom(d.to_proto())
        self.link(parent, name, ino)
        return ino

    def dir(self, parent: int, name: bytes, mode: int = 0o755) -> int:
        ino = self.add(T.DIRECTORY, mode=mode)
        self.link(parent, name, ino)
        return ino


def sample() -> tuple[index_pb2.ImageIndex, dict[Digest, bytes], dict[str, bytes]]:
    """An index with every kind of entry; and the expected contents of its files."""
    rng = random.Random(5)
    b = Builder()
    expected: dict[str, bytes] = {}
    etc = b.dir(b.root, b"etc")
    expected["etc/multi"] = rng.randbytes(CHUNK * 3 + 1234)
    multi = b.file(etc, b"multi", expected["etc/multi"], uid=1000, gid=100, mode=0o640)
    b.index.inodes[multi - 1].xattrs.add(name=b"user.origin", value=b"test")
    b.link(etc, b"multi-hardlink", multi)
    expected["etc/empty"] = b""
    b.file(etc, b"empty", b"")
    b.link(etc, b"link", b.add(T.SYMLINK, symlink_target=b"multi", size=5, mode=0o777))
    b.link(b.root, b"abs", b.add(T.SYMLINK, symlink_target=b"/etc/multi", size=10, mode=0o777))
    tail = rng.randbytes(CHUNK)
    big_size = 5 * GIB + 100
    b.file(b.root, b"sparse-5g", size=big_size, data_at={(4 * GIB + CHUNK) // CHUNK: tail})
    expected["sparse-5g@4GiB+64KiB"] = tail
    many = b.dir(b.root, b"many")
    for i in range(1500):
        b.file(many, f"f{i:04d}".encode(), f"{i}\n".encode())
    b.file(b.root, "nön-ascii-ünïcode".encode(), b"x")
    return b.index, b.chunks, expected
