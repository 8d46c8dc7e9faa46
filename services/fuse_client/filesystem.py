"""The pyfuse3 filesystem: the node's one mount, a read-only tree per attached image.

Kept thin: metadata comes from each image's Index, bytes from its ChunkReader.
Errors become errno here and nowhere else. Inode numbers are namespaced per
image, as in Nydus's shared daemon: the image in slot S serves its index's
inode I as (S << SLOT_SHIFT) | I, and a slot is never reused by another image,
so what the kernel caches for one image never answers for another.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import time
import logging
import os
import stat

import pyfuse3

from imagestream import telemetry
from imagestream.index import ROOT_INODE, Index
from fuse_client.reader import ChunkFetchFailed, ChunkReader
from imagestream.v1 import index_pb2

log = logging.getLogger(__name__)

T = index_pb2.Inode
_TYPE_BITS = {
    T.REGULAR: stat.S_IFREG,
    T.DIRECTORY: stat.S_IFDIR,
    T.SYMLINK: stat.S_IFLNK,
    T.CHAR_DEVICE: stat.S_IFCHR,
    T.BLOCK_DEVICE: stat.S_IFBLK,
    T.FIFO: stat.S_IFIFO,
    T.SOCKET: stat.S_IFSOCK,
}
# An image never changes under its directory: the kernel may cache names, attributes and pages for long.
CACHE_TIMEOUT_S = 3600.0
# The root's entries come and go with attach and detach.
ROOT_TIMEOUT_S = 1.0
SLOT_SHIFT = 40  # an index has fewer than 2**40 inodes; 2**24 slots before numbers run out


class ImageFilesystem:
    """One image's tree; takes and returns inode numbers of its slot (`base` + the index's own)."""

    def __init__(self, index: Index, reader: ChunkReader, image: str = "", slot: int = 0) -> None:
        self.image = image
        self.index = index
        self.reader = reader
        self.base = slot << SLOT_SHIFT
        total_blocks = sum((i.size + 4095) // 4096 for i in index.inodes if i.type == T.REGULAR)
        self._statfs_blocks = total_blocks
        self.reads = 0
        self.recorded: list[tuple[int, int, int]] | None = None  # (inode, offset, size) in order, when recording

    @property
    def root(self) -> int:
        return self.base + ROOT_INODE

    def _inode(self, ino: int) -> index_pb2.Inode:
        try:
            return self.index.inode(ino - self.base)
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        inode = self._inode(ino)
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = CACHE_TIMEOUT_S
        a.attr_timeout = CACHE_TIMEOUT_S
        a.st_mode = _TYPE_BITS[inode.type] | inode.mode
        a.st_nlink = inode.nlink or 1
        a.st_uid = inode.uid
        a.st_gid = inode.gid
        a.st_rdev = os.makedev(inode.rdev_major, inode.rdev_minor)
        a.st_size = inode.size
        a.st_blksize = 4096
        # holes take no blocks, as in a sparse file on disk
        a.st_blocks = sum(e.length for e in inode.extents if e.HasField("chunk")) // 512 if inode.extents else (
            (inode.size + 511) // 512 if inode.type != T.REGULAR else 0)
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = inode.mtime_ns
        return a

    async def getattr(self, inode, ctx=None):  # type: ignore[no-untyped-def]
        return self._attrs(inode)

    async def lookup(self, parent_inode, name, ctx=None):  # type: ignore[no-untyped-def]
        if self._inode(parent_inode).type != T.DIRECTORY:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        child = self.index.lookup(parent_inode - self.base, name)
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(self.base + child)

    async def opendir(self, inode, ctx):  # type: ignore[no-untyped-def]
        if self._inode(inode).type != T.DIRECTORY:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):  # type: ignore[no-untyped-def]
        entries = self._inode(fh).entries
        for i in range(start_id, len(entries)):
            entry = entries[i]
            if not pyfuse3.readdir_reply(token, entry.name, self._attrs(self.base + entry.inode), i + 1):
                return

    async def releasedir(self, fh):  # type: ignore[no-untyped-def]
        pass

    async def readlink(self, inode, ctx):  # type: ignore[no-untyped-def]
        node = self._inode(inode)
        if node.type != T.SYMLINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.symlink_target

    async def open(self, inode, flags, ctx):  # type: ignore[no-untyped-def]
        node = self._inode(inode)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        if node.type == T.DIRECTORY:
            raise pyfuse3.FUSEError(errno.EISDIR)
        # keep_cache: contents never change, so pages read once stay valid across opens
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh, off, size):  # type: ignore[no-untyped-def]
        self.reads += 1
        ino = fh - self.base
        if self.recorded is not None:
            self.recorded.append((ino, off, size))
        with telemetry.tracer.start_as_current_span("fuse read") as span, telemetry.image_context(self.image):
            if span.is_recording():
                span.set_attributes({"imagestream.image": self.image, "imagestream.inode": ino,
                                     "imagestream.offset": off, "imagestream.size": size})
            try:
                return await self.reader.read(ino, off, size)
            except ChunkFetchFailed as e:
                log.error("read of inode %d of %s at %d failed: %s", ino, self.image, off, e)
                raise pyfuse3.FUSEError(errno.EIO) from None

    async def release(self, fh):  # type: ignore[no-untyped-def]
        self.reader.forget(fh - self.base)

    async def access(self, inode, mode, ctx):  # type: ignore[no-untyped-def]
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        return True

    async def getxattr(self, inode, name, ctx):  # type: ignore[no-untyped-def]
        for x in self._inode(inode).xattrs:
            if x.name == name:
                return x.value
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def listxattr(self, inode, ctx):  # type: ignore[no-untyped-def]
        return [x.name for x in self._inode(inode).xattrs]

    async def statfs(self, ctx):  # type: ignore[no-untyped-def]
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = self._statfs_blocks
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.index.inodes)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s


class NodeFilesystem(pyfuse3.Operations):
    """The node's mount: its root lists the attached images by directory name; the rest is theirs."""

    def __init__(self) -> None:
        super().__init__()
        self.slots: dict[int, ImageFilesystem] = {}  # every image that may still be asked about, attached or not
        self.entries: dict[bytes, int] = {}  # the root's directory names -> slot
        self.initialized = asyncio.Event()  # the kernel's INIT request has been answered
        self._next_slot = 1
        self._mtime_ns = time.time_ns()

    def init(self) -> None:
        self.initialized.set()

    def add(self, index: Index, reader: ChunkReader, image: str) -> ImageFilesystem:
        slot, self._next_slot = self._next_slot, self._next_slot + 1
        fs = self.slots[slot] = ImageFilesystem(index, reader, image, slot)
        return fs

    def drop(self, fs: ImageFilesystem) -> None:
        """Forget an image for good: its inodes now answer ENOENT."""
        self.slots.pop(fs.base >> SLOT_SHIFT, None)

    def show(self, name: str, fs: ImageFilesystem) -> None:
        self.entries[name.encode()] = fs.base >> SLOT_SHIFT
        self._mtime_ns = time.time_ns()

    async def hide(self, name: str) -> None:
        """The name goes from the root, and from the kernel's cache before this returns."""
        if self.entries.pop(name.encode(), None) is not None:
            self._mtime_ns = time.time_ns()
            try:  # on a thread: the kernel may ask this very loop something before it answers
                await asyncio.to_thread(pyfuse3.invalidate_entry, pyfuse3.ROOT_INODE, name.encode())
            except Exception as e:  # noqa: BLE001 - not mounted, or the kernel has nothing cached
                log.debug("invalidate %s: %s", name, e)

    def _image(self, ino: int) -> ImageFilesystem:
        fs = self.slots.get(ino >> SLOT_SHIFT)
        if fs is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return fs

    def _root_attrs(self) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = pyfuse3.ROOT_INODE
        a.entry_timeout = a.attr_timeout = ROOT_TIMEOUT_S
        a.st_mode = stat.S_IFDIR | 0o755
        a.st_nlink = 2 + len(self.entries)
        a.st_blksize = 4096
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self._mtime_ns
        return a

    def _entry(self, fs: ImageFilesystem) -> pyfuse3.EntryAttributes:
        a = fs._attrs(fs.root)
        a.entry_timeout = ROOT_TIMEOUT_S  # the name may be detached; the tree under it is fixed
        return a

    async def getattr(self, inode, ctx=None):  # type: ignore[no-untyped-def]
        if inode == pyfuse3.ROOT_INODE:
            return self._root_attrs()
        return await self._image(inode).getattr(inode, ctx)

    async def lookup(self, parent_inode, name, ctx=None):  # type: ignore[no-untyped-def]
        if parent_inode == pyfuse3.ROOT_INODE:
            slot = self.entries.get(name)
            if slot is None or slot not in self.slots:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._entry(self.slots[slot])
        return await self._image(parent_inode).lookup(parent_inode, name, ctx)

    async def opendir(self, inode, ctx):  # type: ignore[no-untyped-def]
        if inode == pyfuse3.ROOT_INODE:
            return inode
        return await self._image(inode).opendir(inode, ctx)

    async def readdir(self, fh, start_id, token):  # type: ignore[no-untyped-def]
        if fh != pyfuse3.ROOT_INODE:
            return await self._image(fh).readdir(fh, start_id, token)
        names = sorted(self.entries.items())
        for i in range(start_id, len(names)):
            name, slot = names[i]
            if slot in self.slots and not pyfuse3.readdir_reply(token, name, self._entry(self.slots[slot]), i + 1):
                return

    async def releasedir(self, fh):  # type: ignore[no-untyped-def]
        pass

    async def readlink(self, inode, ctx):  # type: ignore[no-untyped-def]
        return await self._image(inode).readlink(inode, ctx)

    async def open(self, inode, flags, ctx):  # type: ignore[no-untyped-def]
        return await self._image(inode).open(inode, flags, ctx)

    async def read(self, fh, off, size):  # type: ignore[no-untyped-def]
        return await self._image(fh).read(fh, off, size)

    async def release(self, fh):  # type: ignore[no-untyped-def]
        fs = self.slots.get(fh >> SLOT_SHIFT)
        if fs is not None:
            await fs.release(fh)

    async def access(self, inode, mode, ctx):  # type: ignore[no-untyped-def]
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        return True

    async def getxattr(self, inode, name, ctx):  # type: ignore[no-untyped-def]
        if inode == pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return await self._image(inode).getxattr(inode, name, ctx)

    async def listxattr(self, inode, ctx):  # type: ignore[no-untyped-def]
        if inode == pyfuse3.ROOT_INODE:
            return []
        return await self._image(inode).listxattr(inode, ctx)

    async def statfs(self, ctx):  # type: ignore[no-untyped-def]
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        shown = [self.slots[slot] for slot in self.entries.values() if slot in self.slots]
        s.f_blocks = sum(fs._statfs_blocks for fs in shown)
        s.f_bfree = s.f_bavail = 0
        s.f_files = sum(len(fs.index.inodes) for fs in shown)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s


def _eio_on_error(handler):  # type: ignore[no-untyped-def]
    """Any error a handler did not mean becomes EIO: every request gets an answer (an unexpected
    exception would leave the kernel's request, and the process that made it, waiting for ever)."""

    @functools.wraps(handler)
    async def answered(self, *args):  # type: ignore[no-untyped-def]
        try:
            return await handler(self, *args)
        except (pyfuse3.FUSEError, asyncio.CancelledError):
            raise
        except Exception:  # noqa: BLE001 - the FUSE edge
            log.exception("%s%r failed", handler.__name__, args[:3])
            raise pyfuse3.FUSEError(errno.EIO) from None

    return answered


for _name, _handler in list(vars(NodeFilesystem).items()):  # the handlers pyfuse3 calls
    if asyncio.iscoroutinefunction(_handler):
        setattr(NodeFilesystem, _name, _eio_on_error(_handler))
