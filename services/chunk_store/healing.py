"""The regional store checks what it serves, and heals instead of deleting.

The regional store is the source of truth: a chunk that fails its digest check
there must not be deleted (every image sharing it would fail until pushed
again). Instead it is quarantined (a row in the `quarantine` table), every copy
that can be had is read (at consistency ALL, then each replica on its own), and
a copy that matches is served and written again, which supersedes the bad one
on every replica. With no good copy the read fails as corrupt, the row stays
for a later push to overwrite (`find_missing` reports an unhealed chunk as
missing, so the next push of any image holding it uploads it again).

`scrub` reads every replica's copy of every stored chunk on its own (a quorum
read may never look at a bad replica; a replica-by-replica read at consistency
ONE mixes nothing, so no read repair spreads a bad copy); the chunk store runs it
on demand (`imagestream scrub`, the RegionalAdmin service) and, optionally, in
the background (IMAGESTREAM_SCRUB_INTERVAL).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence

from imagestream.digests import Digest, verify
from imagestream.errors import CorruptChunk, ImagestreamError, NotFound, Unavailable
from imagestream.store.base import DelegatingStore

from chunk_store.cassandra_backend import CassandraChunkStore

log = logging.getLogger(__name__)

UNHEALED_REFRESH_S = 5.0


@dataclasses.dataclass
class HealStats:
    corrupt_found: int = 0  # reads that found a copy not matching its digest
    healed: int = 0  # of those, a good copy was found and written again
    unhealed: int = 0  # no good copy anywhere: the read failed, the chunk stays quarantined


@dataclasses.dataclass
class ScrubReport:
    checked: int = 0
    bytes: int = 0
    corrupt: int = 0
    healed: int = 0
    unhealed: int = 0
    unreadable: int = 0
    replicas_not_reached: int = 0  # chunks with a replica that did not answer: its copy went unchecked
    seconds: float = 0.0
    found: list[Digest] = dataclasses.field(default_factory=list)


def _sha(copies: list[bytes]) -> str:
    return ",".join(hashlib.sha256(c).hexdigest()[:16] for c in copies)


def _ok(digest: Digest, data: bytes) -> bool:
    try:
        verify(digest, data)
    except CorruptChunk:
        return False
    return True


class HealingStore(DelegatingStore):
    """The regional tier over Cassandra: every chunk checked on the way in and out, none deleted on a failed check."""

    checked = True  # type: ignore[assignment]

    def __init__(self, inner: CassandraChunkStore) -> None:
        super().__init__(inner)
        self.inner: CassandraChunkStore = inner
        self.heal_stats = HealStats()
        self._healing: dict[Digest, asyncio.Future[bytes]] = {}
        self._unhealed_set: set[Digest] = set()
        self._unhealed_at = -UNHEALED_REFRESH_S

    async def _checked(self, digest: Digest, data: bytes) -> bytes:
        good = await asyncio.to_thread(_ok, digest, data) if len(data) > 64 * 1024 else _ok(digest, data)
        if good:
            return data
        # one repair per chunk at a time, whoever asks
        pending = self._healing.get(digest)
        if pending is None:
            pending = self._healing[digest] = asyncio.ensure_future(self._heal(digest, data))
            pending.add_done_callback(lambda _f: self._healing.pop(digest, None))
        return await asyncio.shield(pending)

    async def _heal(self, digest: Digest, bad: bytes) -> bytes:
        self.heal_stats.corrupt_found += 1
        self.stats.corrupt_dropped += 1
        log.warning("regional: chunk %s does not match its digest (stored copy sha256 %s): quarantined, "
                    "looking for a good replica", digest, hashlib.sha256(bad).hexdigest()[:16])
        good = await self._repair(digest, [bad])
        if good is None:
            raise CorruptChunk(f"chunk {digest} is corrupt in the regional store (quarantined)")
        return good

    async def _repair(self, digest: Digest, bad: list[bytes]) -> bytes | None:
        """Find a good copy among the replicas and write it again (healed), or quarantine the chunk (None)."""
        copies = await self.inner.copies(digest)
        for _, copy in copies:
            if copy is not None and copy not in bad and await asyncio.to_thread(_ok, digest, copy):
                await self.inner.rewrite(digest, copy)
                await self.inner.quarantine(digest, "digest mismatch; healed from a good replica", _sha(bad), True)
                self.heal_stats.healed += 1
                self._unhealed_set.discard(digest)
                log.warning("regional: chunk %s healed: a good copy was found and written again", digest)
                return copy
        await self.inner.quarantine(digest, "digest mismatch; no good copy found", _sha(bad), False)
        self.heal_stats.unhealed += 1
        self._unhealed_set.add(digest)
        log.error("regional: chunk %s: no replica holds a good copy; kept in quarantine until pushed again", digest)
        return None

    async def check_replicas(self, digest: Digest) -> tuple[str, int, bool]:
        """Check each replica's copy of one chunk (what a quorum read may never look at); heal a bad one.
        Returns ("ok" | "healed" | "unhealed" | "unreadable", bytes of a good copy, whether every replica
        answered): a replica that is down is not checked, and the scrub says so rather than call the chunk ok."""
        answers = await self.inner.copies(digest, strong=False)
        every_replica = len(answers) >= self.inner.replica_count(digest)
        verdict, nbytes = await self._check_copies(digest, [(w, d) for w, d in answers if d is not None])
        return verdict, nbytes, every_replica

    async def _check_copies(self, digest: Digest, copies: list[tuple[str, bytes]]) -> tuple[str, int]:
        if not copies:
            return "unreadable", 0
        verdicts = [(data, await asyncio.to_thread(_ok, digest, data)) for _, data in copies]
        bad = [data for data, ok in verdicts if not ok]
        if not bad:
            return "ok", len(copies[0][1])
        self.heal_stats.corrupt_found += 1
        self.stats.corrupt_dropped += 1
        log.warning("scrub: chunk %s: %d of %d replicas hold a copy not matching its digest",
                    digest, len(bad), len(copies))
        good = await self._repair(digest, bad)
        return ("healed", len(good)) if good is not None else ("unhealed", 0)

    async def get(self, digest: Digest) -> bytes:
        return await self._checked(digest, await self.inner.get(digest))

    async def get_many(self, digests: Sequence[Digest], concurrency: int = 16) -> AsyncIterator[tuple[Digest, bytes]]:
        async for digest, data in self.inner.get_many(digests, concurrency):
            try:
                yield digest, await self._checked(digest, data)
            except CorruptChunk:
                continue  # left out of the batch: the caller fetches it one by one or reports it

    async def put(self, digest: Digest, compressed: bytes) -> bool:
        verify(digest, compressed)
        return await self.put_verified(digest, compressed)

    async def put_verified(self, digest: Digest, compressed: bytes) -> bool:
        stored = await self.inner.put(digest, compressed)
        if digest in await self._unhealed():
            await self.inner.quarantine(digest, "digest mismatch; a good copy was pushed again", "", True)
            self._unhealed_set.discard(digest)
            log.warning("regional: quarantined chunk %s healed by a push", digest)
        return stored

    async def delete(self, digest: Digest) -> None:
        """Never on a reader's word: the source of truth keeps its chunks (a bad one is quarantined by `get`)."""
        log.warning("regional: asked to drop chunk %s; kept (checked copies are served, bad ones quarantined)", digest)

    async def _unhealed(self) -> set[Digest]:
        """Quarantined chunks without a good copy; read from the table at most every few seconds (it is small),
        so that other chunk-store replicas' findings are seen too."""
        if time.monotonic() - self._unhealed_at > UNHEALED_REFRESH_S:
            try:
                rows = await self.inner.quarantine_list()
            except Unavailable as e:
                log.warning("regional: quarantine table unreadable, using what was read before: %s", e)
            else:
                self._unhealed_set = {Digest(r.hash, r.size) for r in rows if not r.healed}
                self._unhealed_at = time.monotonic()
        return self._unhealed_set

    async def contains(self, digest: Digest) -> bool:
        return await self.inner.contains(digest) and digest not in await self._unhealed()

    async def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        digests = list(dict.fromkeys(digests))
        missing = set(await self.inner.find_missing(digests))
        # a stored chunk quarantined without a good copy counts as missing: a push brings it again
        missing |= await self._unhealed() & set(digests)
        return [d for d in digests if d in missing]

    # -- scrub -------------------------------------------------------------------------

    async def scrub(self, limit: int = 0, concurrency: int = 8) -> ScrubReport:
        """Read and check every stored chunk (the first `limit` with limit > 0)."""
        report = ScrubReport()
        started = time.monotonic()
        keys: asyncio.Queue[tuple[str, int] | None] = asyncio.Queue(maxsize=1000)
        loop = asyncio.get_running_loop()

        def produce() -> None:
            n = 0
            try:
                for key in self.inner.all_digests():
                    asyncio.run_coroutine_threadsafe(keys.put(key), loop).result()
                    n += 1
                    if limit and n >= limit:
                        break
            finally:
                for _ in range(concurrency):
                    asyncio.run_coroutine_threadsafe(keys.put(None), loop).result()

        async def check() -> None:
            while (key := await keys.get()) is not None:
                digest = Digest(*key)
                report.checked += 1
                try:
                    verdict, nbytes, every_replica = await self.check_replicas(digest)
                except (NotFound, Unavailable) as e:
                    verdict, nbytes, every_replica = "unreadable", 0, False
                    log.warning("scrub: chunk %s unreadable: %s", digest, e)
                report.bytes += nbytes
                if not every_replica:
                    report.replicas_not_reached += 1
                if verdict == "unreadable":
                    report.unreadable += 1
                elif verdict != "ok":
                    report.corrupt += 1
                    report.found.append(digest)
                    if verdict == "healed":
                        report.healed += 1
                    else:
                        report.unhealed += 1

        producer = asyncio.ensure_future(asyncio.to_thread(produce))
        await asyncio.gather(*(check() for _ in range(concurrency)))
        try:
            await producer
        except ImagestreamError:
            raise
        except Exception as e:  # noqa: BLE001 - listing keys failed part way: report what was checked
            log.warning("scrub: listing chunks stopped: %s", e)
            report.unreadable += 1
        report.seconds = time.monotonic() - started
        log.info("scrub: %d chunks (%.1f MB) checked in %.1f s: %d corrupt, %d healed, %d unhealed, %d unreadable, "
                 "%d with a replica not reached", report.checked, report.bytes / 1e6, report.seconds, report.corrupt,
                 report.healed, report.unhealed, report.unreadable, report.replicas_not_reached)
        return report
