"""The pyfuse3 filesystem: a read-only tree served from an image index.

Kept thin: metadata comes from the Index, bytes from the ChunkReader. Errors
become errno here and nowhere else.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import stat

import pyfuse3

from imagestream import telemetry
from imagestream.index import Index
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
# The image never changes under a mount: the kernel may cache names, attributes and pages for long.
CACHE_TIMEOUT_S = 3600.0


class ImageFilesystem(pyfuse3.Operations):
    def __init__(self, index: Index, reader: ChunkReader, image: str = "") -> None:
        super().__init__()
        self.image = image
        self.index = index
        self.reader = reader
        total_blocks = sum((i.size + 4095) // 4096 for i in index.inodes if i.type == T.REGULAR)
        self._statfs_blocks = total_blocks
        self.reads = 0
        self.recorded: list[tuple[int, int, int]] | None = None  # (inode, offset, size) in order, when recording
        self.initialized = asyncio.Event()  # the kernel's INIT request has been answered

    def init(self) -> None:
        self.initialized.set()

    def _inode(self, ino: int) -> index_pb2.Inode:
        try:
            return self.index.inode(ino)
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
        child = self.index.lookup(parent_inode, name)
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(child)

    async def opendir(self, inode, ctx):  # type: ignore[no-untyped-def]
        if self._inode(inode).type != T.DIRECTORY:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):  # type: ignore[no-untyped-def]
        entries = self._inode(fh).entries
        for i in range(start_id, len(entries)):
            entry = entries[i]
            if not pyfuse3.readdir_reply(token, entry.name, self._attrs(entry.inode), i + 1):
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
        if self.recorded is not None:
            self.recorded.append((fh, off, size))
        with telemetry.tracer.start_as_current_span("fuse read") as span, telemetry.image_context(self.image):
            if span.is_recording():
                span.set_attributes({"imagestream.image": self.image, "imagestream.inode": fh,
                                     "imagestream.offset": off, "imagestream.size": size})
            try:
                return await self.reader.read(fh, off, size)
            except ChunkFetchFailed as e:
                log.error("read of inode %d at %d failed: %s", fh, off, e)
                raise pyfuse3.FUSEError(errno.EIO) from None

    async def release(self, fh):  # type: ignore[no-untyped-def]
        self.reader.forget(fh)

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


for _name, _handler in list(vars(ImageFilesystem).items()):
    if asyncio.iscoroutinefunction(_handler):
        setattr(ImageFilesystem, _name, _eio_on_error(_handler))
