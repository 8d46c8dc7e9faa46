"""The node's images: attached by lease into the one mount, loaded once, detached with their last lease.

An image's index stays loaded after its last lease goes (the last few images,
`KEEP_DETACHED`), so attaching it again costs one name lookup; its inode
numbers stay the same then, and what the kernel cached of its files is still
good. Detaching ends the image's background download and saves the startup
profile recorded under it, after the caller has its answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from collections import OrderedDict

from imagestream import config
from imagestream.digests import Digest
from imagestream.errors import FailedPrecondition, InvalidArgument, NotFound
from imagestream.index import Index, load_index
from imagestream.names import ImageNames
from imagestream.store.base import ChunkStore
from imagestream.v1 import fuse_pb2, images_pb2

from fuse_client.filesystem import ImageFilesystem, NodeFilesystem
from fuse_client.profiles import load_profile, save_profile, should_record
from fuse_client.reader import ChunkCache, ChunkReader

log = logging.getLogger("fuse_client")

KEEP_DETACHED = 8


@dataclasses.dataclass
class Image:
    """An image known to this node: its tree in the mount, and who holds it."""

    record: images_pb2.Image
    fs: ImageFilesystem
    dirname: str
    leases: set[str] = dataclasses.field(default_factory=set)
    download_id: str = ""
    download_started: asyncio.Task | None = None  # StartDownload on its way: EndDownload must come after it
    record_reads: str = ""
    recording_lease: str = ""  # the startup profile recorded under this lease is saved when it goes
    attach_seconds: float = 0.0

    @property
    def index(self) -> Digest:
        return Digest.from_proto(self.record.index)


class NodeImages:
    def __init__(self, fs: NodeFilesystem, store: ChunkStore, names: ImageNames, node,  # type: ignore[no-untyped-def]
                 mountpoint: str, timeout_s: float = 10.0, retries: int = 3, leases=None,
                 cache: ChunkCache | None = None) -> None:
        self.fs = fs
        self.cache = cache if cache is not None else ChunkCache(32 << 20)  # one for every image
        self.leases = leases  # MountLeases in the regional store (fuse_client/leases.py), or None
        self.store = store
        self.names = names
        self.node = node  # the node cache's Node API (background downloads), or None
        self.mountpoint = mountpoint
        self.timeout_s = timeout_s
        self.retries = retries
        self.known: OrderedDict[str, Image] = OrderedDict()  # index hash -> image, least recently attached first
        self.by_lease: dict[str, Image] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._background: set[asyncio.Task] = set()
        self._downloads = 0

    def dirname(self, index: Digest) -> str:
        return index.hash[:32]

    def path(self, image: Image) -> str:
        return os.path.join(self.mountpoint, image.dirname)

    async def attach(self, request: fuse_pb2.AttachRequest) -> fuse_pb2.Attachment:
        if not request.lease:
            raise InvalidArgument("an attach needs a lease")
        held = self.by_lease.get(request.lease)
        if held is not None:
            return self.describe(held)
        started = time.monotonic()
        try:
            record = await self.names.resolve(request.image)
        except NotFound:
            if not request.HasField("index"):
                raise
            # The caller names the content it was made of (the snapshotter: a layer snapshot kept on this node)
            # and the name is gone: removed, or the region started over and the same content came back under
            # another name, which containerd, having the layer's snapshot, never shows the snapshotter. That
            # content, checked against its digest, is still the container's image while the region has it.
            record = images_pb2.Image(name=request.image, index=request.index)
            log.warning("image %r is no longer a name; attaching its index %s, which a caller on this node was "
                        "made of", request.image, request.index.hash[:12])
        if record.streaming_disabled:
            raise FailedPrecondition("the image was pushed with streaming disabled (imagestream push --no-streaming)")
        index = Digest.from_proto(record.index)
        if request.HasField("index") and Digest.from_proto(request.index) != index:
            raise FailedPrecondition(f"image {request.image!r} now points at index {index.hash[:12]}, "
                                     f"not {request.index.hash[:12]}")
        lock = self._locks.setdefault(index.hash, asyncio.Lock())
        async with lock:
            image = self.known.get(index.hash)
            profile_mode = request.profile or config.get("profile")
            if image is not None and not image.leases and profile_mode == "always":
                # a profile of what a start reads: the kernel's cache of this slot would hide those reads
                self._forget(image)
                image = None
            if image is None:
                image = await self._load(record, index)
            self.known.move_to_end(index.hash)
            # a profile belongs to a name: none is recorded for content attached without one (published_at 0)
            if image.fs.reader.touched is None and record.published_at and should_record(profile_mode, record):
                image.fs.reader.touched, image.recording_lease = [], request.lease
            if request.record_reads and image.fs.recorded is None:
                image.fs.recorded, image.record_reads = [], request.record_reads
            first_lease = not image.leases
            image.leases.add(request.lease)
            self.by_lease[request.lease] = image
            if first_lease:
                image.record = record
                self.fs.show(image.dirname, image.fs)
                if self.leases is not None:  # gc keeps the image's chunks while it is attached here
                    self._spawn(self.leases.hold(index, record.name))
            if request.download and not image.download_id:
                self._downloads += 1  # a new id each time: the end of an earlier one may still be on its way
                image.download_id = f"fuse:{image.dirname}:{self._downloads}"
                image.download_started = self._spawn(self._start_download(image))
            self._evict()
        image.attach_seconds = time.monotonic() - started
        log.info("ImageStreaming: %s attached at %s under %s in %.3f s (%d leases)", request.image, self.path(image),
                 request.lease, image.attach_seconds, len(image.leases))
        return self.describe(image)

    def _reader(self, index: Index) -> ChunkReader:
        return ChunkReader(self.store, index, cache=self.cache, timeout_s=self.timeout_s,
                           retries=self.retries)

    async def _load(self, record: images_pb2.Image, index: Digest) -> Image:
        loaded: Index = await load_index(self.store, index)
        fs = self.fs.add(loaded, self._reader(loaded), record.name)
        image = Image(record, fs, self.dirname(index))
        old = self.known.pop(index.hash, None)
        if old is not None:
            self.fs.drop(old.fs)
        self.known[index.hash] = image
        log.info("index of %s loaded: %s, %d inodes", record.name, index.hash[:12], len(loaded.inodes))
        return image

    def _forget(self, image: Image) -> None:
        self.known.pop(image.index.hash, None)
        self.fs.drop(image.fs)

    def _evict(self) -> None:
        detached = [i for i in self.known.values() if not i.leases]
        for image in detached[: max(0, len(detached) - KEEP_DETACHED)]:
            self._forget(image)

    async def _start_download(self, image: Image) -> None:
        # the profile's chunks first (fetched in parallel right after attach), then the whole image
        if self.node is None:
            return
        first = await load_profile(self.store, image.record)
        try:
            await self.node.start_download(image.download_id, image.record.name, image.index, first)
        except Exception as e:  # noqa: BLE001 - streaming works without it
            log.warning("background download of %s not started: %s", image.record.name, e)
            image.download_id = ""
            return
        log.info("background download of %s started (%d chunks first from its startup profile)",
                 image.record.name, len(first))

    async def detach(self, lease: str, wait: bool = False) -> bool:
        image = self.by_lease.pop(lease, None)
        if image is None:
            return False
        image.leases.discard(lease)
        last = not image.leases
        if last:
            await self.fs.hide(image.dirname)
            log.info("%s detached (its last lease %s went); %d reads, %d chunks fetched", image.record.name, lease,
                     image.fs.reads, image.fs.reader.fetches)
        touched = recorded = None
        download_id, download_started = "", None
        if lease == image.recording_lease or last:
            touched, image.fs.reader.touched, image.recording_lease = image.fs.reader.touched, None, ""
        if last:
            recorded, image.fs.recorded = image.fs.recorded, None
            download_id, image.download_id = image.download_id, ""
            download_started, image.download_started = image.download_started, None
            if self.leases is not None:
                self._spawn(self.leases.release(image.index))
            image.fs.reader = self._reader(image.fs.index)  # its chunks go: the node cache keeps them
        if touched or last:
            work = self._spawn(self._after_detach(image, touched, recorded, download_id, download_started))
            if wait:
                await asyncio.shield(work)
        return last

    async def _after_detach(self, image: Image, touched: list[Digest] | None,
                            recorded: list[tuple[int, int, int]] | None, download_id: str,
                            download_started: asyncio.Task | None = None) -> None:
        try:
            if download_started is not None:  # else its start could reach the node cache after its end: a leak
                await asyncio.wait([download_started])
            if download_id and self.node is not None:
                await self.node.end_download(download_id)
            if touched:
                region = config.get("region")
                digest = await save_profile(region, image.record, touched, timeout_s=self.timeout_s)
                log.info("startup profile of %s recorded in %s: %d chunks (%s)", image.record.name, region,
                         len(touched), digest)
            if recorded is not None and image.record_reads:
                await asyncio.to_thread(write_recording, image.record_reads, image.fs.index, recorded)
        except Exception as e:  # noqa: BLE001 - the detach itself is done
            log.warning("after detaching %s: %s", image.record.name, e)

    def _spawn(self, coro) -> asyncio.Task:  # type: ignore[no-untyped-def]
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def describe(self, image: Image) -> fuse_pb2.Attachment:
        return fuse_pb2.Attachment(
            image=image.record.name, index=image.record.index, path=self.path(image), leases=sorted(image.leases),
            attach_seconds=image.attach_seconds, inodes=len(image.fs.index.inodes),
            has_profile=bool(image.record.profile.hash), recording_profile=image.fs.reader.touched is not None,
            download_id=image.download_id, config_json=json.dumps(image.fs.index.config()), pid=os.getpid())

    def attachments(self) -> list[fuse_pb2.Attachment]:
        return [self.describe(i) for i in self.known.values() if i.leases]

    async def close(self) -> None:
        """Every lease ends (the mount is going): downloads end and profiles are saved, for a few seconds at most."""
        for lease in list(self.by_lease):
            await self.detach(lease)
        if self._background:
            await asyncio.wait(list(self._background), timeout=5)


def write_recording(path: str, index: Index, recorded: list[tuple[int, int, int]]) -> None:
    """One JSON line per read, in order, with the file's path so it can be mapped onto another index."""
    paths = {ino: p.decode("utf-8", "surrogateescape") for p, ino in index.walk()}
    with open(path, "w") as f:
        for ino, offset, size in recorded:
            f.write(json.dumps({"inode": ino, "offset": offset, "size": size, "path": paths.get(ino, "")}) + "\n")
