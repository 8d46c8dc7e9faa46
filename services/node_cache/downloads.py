"""Background full download of mounted images.

While an application runs on streamed data, its whole image is fetched behind
it: the startup profile's chunks first, then the rest in index order, in
batches (one upstream call each, a few MiB at most, so that a foreground read
never waits long behind one), a few batches at a time, under an optional
bandwidth cap, always yielding to foreground fetches and holding back the rest
of the image while the application is starting (see fetcher.py). Chunks
go to the node's disk, pinned there while the image is mounted; once all are
local, every read of the mount is served by the node without a network hop.

What is under way is recorded in a state file (state.py) and resumed when the
node cache starts again; a download whose mount's process has exited is ended,
and its pins released, whether or not EndDownload arrived.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import OrderedDict

from imagestream import telemetry
from imagestream.digests import Digest
from imagestream.errors import ImagestreamError, Unavailable
from imagestream.index import load_index
from imagestream.store.base import ChunkStore
from imagestream.store.disk import DiskStore
from imagestream.v1 import node_pb2

from node_cache.fetcher import NodeFetcher
from node_cache.state import Entry, StateFile, owner_gone, owner_of

log = logging.getLogger(__name__)

KEEP_CHUNK_LISTS = 8


@dataclasses.dataclass
class Download:
    mount_id: str
    image: str
    chunks: list[Digest] = dataclasses.field(default_factory=list)
    local: set[Digest] = dataclasses.field(default_factory=set)
    profile: set[Digest] = dataclasses.field(default_factory=set)  # chunks of its startup profile
    stalled: str = ""
    task: asyncio.Task | None = None

    @property
    def done(self) -> bool:
        return bool(self.chunks) and len(self.local) == len(self.chunks)

    def to_proto(self, rate: float) -> node_pb2.Download:
        return node_pb2.Download(
            mount_id=self.mount_id, image=self.image, chunks_total=len(self.chunks), chunks_local=len(self.local),
            bytes_total=sum(d.size for d in self.chunks), bytes_local=sum(d.size for d in self.local),
            rate_bytes_per_s=rate, done=self.done, stalled=self.stalled, profile_chunks=len(self.profile),
        )


class Downloads:
    def __init__(self, store: ChunkStore, disk: DiskStore, fetcher: NodeFetcher,
                 batch_chunks: int = 16, batch_bytes: int = 4 << 20, concurrency: int = 2,
                 state: StateFile | None = None) -> None:
        self.store = store  # the node's whole chain, to read the index through
        self.disk = disk
        self.fetcher = fetcher
        self.batch_chunks = batch_chunks
        self.batch_bytes = batch_bytes  # of chunk (uncompressed) bytes: bounds what a foreground read can wait behind
        self.concurrency = concurrency
        self.downloads: dict[str, Download] = {}
        self.state = state
        self.entries: dict[str, Entry] = {}  # what the state file holds
        self._unsaved = False
        self._saver: asyncio.Task | None = None
        self._chunk_lists: OrderedDict[Digest, list[Digest]] = OrderedDict()  # of the last few indexes

    def start(self, mount_id: str, image: str, index: Digest, first: list[Digest],
              owner: tuple[int, str] | None = None) -> Download:
        self._end(mount_id)
        download = self.downloads[mount_id] = Download(mount_id, image)
        self.entries[mount_id] = Entry(mount_id, image, index, tuple(first), owner or owner_of(mount_id))
        self._save()
        self.fetcher.gate.touch()  # the application's first reads are coming: the rest of the image waits
        download.task = asyncio.ensure_future(self._run(download, index, first))
        return download

    def end(self, mount_id: str) -> None:
        self._end(mount_id)
        self._save()

    def _end(self, mount_id: str) -> None:
        download = self.downloads.pop(mount_id, None)
        self.entries.pop(mount_id, None)
        if download is not None and download.task is not None:
            download.task.cancel()
        self.disk.unpin(mount_id)

    def _save(self) -> None:
        """Write the state file behind the caller: its two fsyncs can take 100 ms on a busy disk, and this
        event loop serves the node's reads. Saves in a row collapse into one of the latest entries."""
        if self.state is None:
            return
        self._unsaved = True
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no loop (start-up, tests): write at once
            self._unsaved = False
            self.state.save(list(self.entries.values()))
            return
        if self._saver is None or self._saver.done():
            self._saver = asyncio.ensure_future(self._save_latest())

    async def _save_latest(self) -> None:
        while self._unsaved:
            self._unsaved = False
            await asyncio.to_thread(self.state.save, list(self.entries.values()))  # type: ignore[union-attr]

    async def flush(self) -> None:
        """Until the state file holds what is under way now."""
        while self._saver is not None and not self._saver.done():
            await asyncio.shield(self._saver)

    def resume(self) -> int:
        """Start again the downloads the state file records whose mounts still live; returns how many."""
        if self.state is None:
            return 0
        resumed = 0
        for entry in self.state.load():
            if owner_gone(entry):
                log.info("mount %s of %s ended while the node cache was down: its download and pins are dropped",
                         entry.mount_id, entry.image)
                continue
            self.start(entry.mount_id, entry.image, entry.index, list(entry.first), entry.owner)
            resumed += 1
        self._save()  # also drops what was not resumed
        if resumed:
            log.info("resumed %d background downloads (and their pins) from %s", resumed, self.state.path)
        return resumed

    def reap(self) -> list[str]:
        """End the downloads whose mount's process has exited without saying so (killed); returns their ids."""
        gone = [mount_id for mount_id, entry in self.entries.items() if owner_gone(entry)]
        for mount_id in gone:
            log.warning("mount %s is gone without ending its download: its download and pins are dropped", mount_id)
            self._end(mount_id)
        if gone:
            self._save()
        return gone

    async def reap_forever(self, every_s: float = 5.0) -> None:
        while True:
            await asyncio.sleep(every_s)
            self.reap()

    async def _run(self, download: Download, index_digest: Digest, first: list[Digest]) -> None:
        try:
            everything = await self._chunks_of(index_digest)
            in_image = set(everything)
            profile = [d for d in dict.fromkeys(first) if d in in_image]
            download.profile = set(profile)
            download.chunks = profile + [d for d in everything if d not in download.profile]
            self.disk.pin(download.mount_id, set(download.chunks) | {index_digest})
            download.local = {d for d in download.chunks if await self.disk.contains(d)}
            todo = [d for d in download.chunks if d not in download.local]
            log.info("download of %s: %d chunks, %d local, %d first from the profile",
                     download.image, len(download.chunks), len(download.local), len(profile))
            queue: asyncio.Queue[list[Digest]] = asyncio.Queue()
            # the profile's chunks are wanted at once anyway: large batches; the rest in small ones
            batches = (self._batches([d for d in todo if d in download.profile], max_bytes=None)
                       + self._batches([d for d in todo if d not in download.profile], max_bytes=self.batch_bytes))
            for batch in batches:
                queue.put_nowait(batch)
            workers = [asyncio.ensure_future(self._worker(download, queue)) for _ in range(self.concurrency)]
            try:
                await asyncio.gather(*workers)
            finally:
                for w in workers:
                    w.cancel()
            if download.done:
                log.info("download of %s complete: every chunk is on this node", download.image)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a background job reports, it does not crash the node
            download.stalled = f"{type(e).__name__}: {e}"
            log.warning("download of %s stopped: %s", download.image, download.stalled)

    async def _chunks_of(self, index_digest: Digest) -> list[Digest]:
        """The image's chunks; an image mounted again and again (a warm start) loads its index once."""
        chunks = self._chunk_lists.get(index_digest)
        if chunks is None:
            chunks = (await load_index(self.store, index_digest)).chunks()
            self._chunk_lists[index_digest] = chunks
            while len(self._chunk_lists) > KEEP_CHUNK_LISTS:
                self._chunk_lists.popitem(last=False)
        self._chunk_lists.move_to_end(index_digest)
        return chunks

    def _batches(self, digests: list[Digest], max_bytes: int | None) -> list[list[Digest]]:
        """Consecutive runs of at most `batch_chunks` chunks and `max_bytes` bytes (but one chunk at least)."""
        batches: list[list[Digest]] = []
        current: list[Digest] = []
        size = 0
        for d in digests:
            if current and (len(current) >= self.batch_chunks or (max_bytes is not None and size + d.size > max_bytes)):
                batches.append(current)
                current, size = [], 0
            current.append(d)
            size += d.size
        if current:
            batches.append(current)
        return batches

    async def _worker(self, download: Download, queue: asyncio.Queue[list[Digest]]) -> None:
        while not queue.empty() and not download.stalled:
            batch = []
            for d in queue.get_nowait():
                if d in download.local:
                    continue
                if await self.disk.contains(d):  # a foreground read brought it meanwhile
                    download.local.add(d)
                    continue
                batch.append(d)
            if not batch:
                continue
            try:
                predicted = download.profile.issuperset(batch)
                with telemetry.new_trace("background download batch", image=download.image, chunks=len(batch)):
                    got = await self.fetcher.fetch_background(batch, predicted=predicted)
            except ImagestreamError as e:
                log.warning("download of %s: batch failed, retrying later: %s", download.image, e)
                await asyncio.sleep(1.0)
                queue.put_nowait(batch)
                continue
            for digest, data in got.items():
                try:
                    await self.disk.put_verified(digest, data)  # the background chain checked it
                except Unavailable as e:
                    download.stalled = str(e)
                    log.warning("download of %s stalled: %s (streaming goes on)", download.image, e)
                    return
                download.local.add(digest)
            missing = [d for d in batch if d not in got and not await self.disk.contains(d)]
            download.local.update(d for d in batch if d not in missing)
            if missing and not got:
                download.stalled = f"{len(missing)} chunks not available upstream (first {missing[0]})"
                return
            if missing:
                queue.put_nowait(missing)

    def status(self) -> list[node_pb2.Download]:
        rate = self.fetcher.rate()
        return [d.to_proto(rate) for d in self.downloads.values()]
