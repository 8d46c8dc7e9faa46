"""A bounded, content-addressed on-disk cache of compressed chunks (the node's disk tier)."""

from __future__ import annotations

import asyncio
import os
import pathlib
import tempfile
from collections import OrderedDict

from imagestream.digests import Digest
from imagestream.errors import NotFound, Unavailable
from imagestream.store.base import ChunkStore


class DiskStore(ChunkStore):
    """Files named by digest under `root/ab/<hash>-<size>`, evicted least recently used first.

    Recency lives in memory and is rebuilt from file access times at start-up.
    Writes go to a temporary file renamed into place, so a crash never leaves a
    half-written chunk under a digest's name. Bytes read back are not trusted:
    wrap this store in VerifiedStore.
    """

    name = "disk"

    def __init__(self, root: pathlib.Path, capacity_bytes: int | None = None) -> None:
        super().__init__()
        self.root = pathlib.Path(root)
        self.capacity_bytes = capacity_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._lru: OrderedDict[Digest, int] = OrderedDict()
        self.size_bytes = 0
        # chunks of mounted images: never evicted while an owner (a mount) holds them
        self._pins: dict[str, set[Digest]] = {}
        self._pinned: dict[Digest, int] = {}  # digest -> number of owners
        self._scan()

    def _path(self, digest: Digest) -> pathlib.Path:
        return self.root / digest.hash[:2] / f"{digest.hash}-{digest.size}"

    def _scan(self) -> None:
        found: list[tuple[float, Digest, int]] = []
        for sub in self.root.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                if f.name.startswith(".tmp"):
                    f.unlink(missing_ok=True)  # left by a crash mid-write
                    continue
                try:
                    h, size = f.name.split("-")
                    st = f.stat()
                    found.append((st.st_atime, Digest(h, int(size)), st.st_size))
                except (ValueError, OSError):
                    continue
        for _, digest, nbytes in sorted(found):
            self._lru[digest] = nbytes
            self.size_bytes += nbytes

    async def get(self, digest: Digest) -> bytes:
        if digest not in self._lru:
            self.stats.misses += 1
            raise NotFound(f"chunk {digest.short} not on disk")
        try:
            data = await asyncio.to_thread(self._path(digest).read_bytes)
        except FileNotFoundError:
            self._forget(digest)
            self.stats.misses += 1
            raise NotFound(f"chunk {digest.short} vanished from disk") from None
        except OSError as e:
            raise Unavailable(f"disk cache read failed: {e}") from e
        self._lru.move_to_end(digest)
        self.stats.hits += 1
        self.stats.bytes_served += len(data)
        return data

    async def local_path(self, digest: Digest) -> str | None:
        """The chunk's file, for a reader on this machine (a hit: the read counts as recent use)."""
        if digest not in self._lru:
            return None
        self._lru.move_to_end(digest)
        self.stats.hits += 1
        return str(self._path(digest))

    def _write(self, path: pathlib.Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)  # its folder may have been removed under it
        fd, tmp = tempfile.mkstemp(prefix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    async def put(self, digest: Digest, compressed: bytes) -> bool:
        if digest in self._lru:
            self._lru.move_to_end(digest)
            return False
        if self.capacity_bytes is not None and len(compressed) > self.capacity_bytes:
            return False
        await self._evict(room_for=len(compressed))
        try:
            await asyncio.to_thread(self._write, self._path(digest), compressed)
        except OSError as e:
            raise Unavailable(f"disk cache write failed: {e}") from e
        self._lru[digest] = len(compressed)
        self.size_bytes += len(compressed)
        return True

    def pin(self, owner: str, digests: set[Digest]) -> None:
        self.unpin(owner)
        self._pins[owner] = digests
        for d in digests:
            self._pinned[d] = self._pinned.get(d, 0) + 1

    def unpin(self, owner: str) -> None:
        for d in self._pins.pop(owner, ()):
            left = self._pinned[d] - 1
            if left:
                self._pinned[d] = left
            else:
                del self._pinned[d]

    @property
    def pinned_chunks(self) -> int:
        return len(self._pinned)

    async def _evict(self, room_for: int) -> None:
        """Make room, least recently used first, never a pinned chunk; Unavailable if impossible."""
        if self.capacity_bytes is None:
            return
        if self.size_bytes + room_for <= self.capacity_bytes:
            return
        for victim in [d for d in self._lru if d not in self._pinned]:
            await self.delete(victim)
            self.stats.evictions += 1
            if self.size_bytes + room_for <= self.capacity_bytes:
                return
        raise Unavailable(
            f"disk cache full: {self.size_bytes} of {self.capacity_bytes} bytes held by chunks of mounted images"
        )

    async def collect_unpinned(self, dry_run: bool = False) -> tuple[int, int]:
        """Remove every chunk no mounted image pins: (chunks, bytes) removed (or that would be)."""
        victims = [(d, n) for d, n in self._lru.items() if d not in self._pinned]
        if not dry_run:
            for digest, _ in victims:
                await self.delete(digest)
        return len(victims), sum(n for _, n in victims)

    def _forget(self, digest: Digest) -> None:
        nbytes = self._lru.pop(digest, None)
        if nbytes is not None:
            self.size_bytes -= nbytes

    async def contains(self, digest: Digest) -> bool:
        return digest in self._lru

    async def delete(self, digest: Digest) -> None:
        self._forget(digest)
        self._path(digest).unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self._lru)
