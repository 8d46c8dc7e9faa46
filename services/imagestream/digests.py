"""Content addresses and the chunk wire format (zstd frame of the bytes, verified by SHA-256)."""

from __future__ import annotations

import hashlib
import io
import re
import threading
from typing import IO, NamedTuple

import zstandard

from imagestream.errors import CorruptChunk, InvalidArgument
from imagestream.v1 import digest_pb2

_HEX64 = re.compile(r"[0-9a-f]{64}\Z")

# Refuse to decompress more than this, whatever a frame claims: a hostile or
# corrupt chunk must not make a tier allocate gigabytes.
MAX_BLOB_BYTES = 64 * 1024 * 1024


class Digest(NamedTuple):
    """SHA-256 (lower-case hex) of the uncompressed bytes, and their length."""

    hash: str
    size: int

    def __str__(self) -> str:
        return f"sha256:{self.hash}/{self.size}"

    @property
    def short(self) -> str:
        return f"{self.hash[:12]}/{self.size}"

    def to_proto(self) -> digest_pb2.Digest:
        return digest_pb2.Digest(hash=self.hash, size_bytes=self.size)

    @classmethod
    def from_proto(cls, message: digest_pb2.Digest) -> Digest:
        return parse(message.hash, message.size_bytes)

    @classmethod
    def of(cls, data: bytes) -> Digest:
        return cls(hashlib.sha256(data).hexdigest(), len(data))


class HashingStream(io.RawIOBase):
    """Reads from or writes to `inner`, hashing (SHA-256) and counting every byte that passes: an OCI
    blob's digest, or a layer's diff_id, in the same pass that reads or writes it."""

    def __init__(self, inner: IO[bytes]) -> None:
        self.inner = inner
        self.hash = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return self.inner.readable()

    def writable(self) -> bool:
        return self.inner.writable()

    def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
        data = self.inner.read(len(b))
        n = len(data)
        b[:n] = data
        self.hash.update(data)
        self.size += n
        return n

    def write(self, b) -> int:  # type: ignore[no-untyped-def,override]
        self.inner.write(b)
        self.hash.update(b)
        self.size += len(b)
        return len(b)

    def tell(self) -> int:
        return self.size

    def drain(self) -> None:
        """Read what is left (so that the digest covers the whole stream)."""
        while self.read(1 << 20):
            pass

    def oci_digest(self) -> str:
        """'sha256:<hex>' of the bytes so far."""
        return "sha256:" + self.hash.hexdigest()


def parse(hash_: str, size: int) -> Digest:
    """A Digest from untrusted parts; InvalidArgument names what is wrong."""
    if not isinstance(hash_, str) or not _HEX64.match(hash_):
        raise InvalidArgument(f"malformed digest hash {hash_!r}: want 64 lower-case hex digits")
    if not 0 <= size <= MAX_BLOB_BYTES:
        raise InvalidArgument(f"digest {hash_[:12]} has size {size}: want 0..{MAX_BLOB_BYTES}")
    return Digest(hash_, size)


# zstd contexts are not thread-safe; keep one per thread (the Cassandra driver
# and asyncio.to_thread both call in from worker threads).
_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    c = getattr(_local, "c", None)
    if c is None:
        c = _local.c = zstandard.ZstdCompressor(level=3, write_content_size=True)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


def compress(data: bytes) -> bytes:
    return _compressor().compress(data)


def decompress_verified(digest: Digest, compressed: bytes) -> bytes:
    """The chunk's bytes, or CorruptChunk if they do not decompress to exactly `digest`."""
    try:
        data = _decompressor().decompress(compressed, max_output_size=max(digest.size, 1))
    except zstandard.ZstdError as e:
        raise CorruptChunk(f"chunk {digest.short}: not a valid zstd frame ({e})") from None
    if len(data) != digest.size or hashlib.sha256(data).hexdigest() != digest.hash:
        raise CorruptChunk(f"chunk {digest.short}: content does not match its digest")
    return data


def verify(digest: Digest, compressed: bytes) -> None:
    decompress_verified(digest, compressed)
