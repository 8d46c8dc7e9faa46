"""Full pull: the fallback when an image cannot be streamed on this node.

Every chunk is fetched through the node cache (in batches, with a progress
bar), then the tree is written out to a local folder with all its metadata
(nothing outside it: see write_tree); `run` then uses that folder where it
would have used the streamed mount. The folder is kept per index digest, only
root can enter it, and `imagestream rm` removes it with the image; a second
run of the same image starts at once. Written to a temporary folder and renamed into place, so a pull cut
short is never taken for a complete one.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import re
import shutil
import stat

from tqdm import tqdm

from imagestream import config
from imagestream.digests import Digest, decompress_verified
from imagestream.rpc.client import GrpcChunkStore, GrpcImageNames
from imagestream.index import Index, load_index
from imagestream.index_checks import check_name
from imagestream.v1 import index_pb2

T = index_pb2.Inode
_KIND = {T.CHAR_DEVICE: stat.S_IFCHR, T.BLOCK_DEVICE: stat.S_IFBLK, T.FIFO: stat.S_IFIFO, T.SOCKET: stat.S_IFSOCK}


async def _fetch_all(name: str, progress: bool) -> tuple[Index, dict[Digest, bytes], str]:
    target = "unix:" + config.node_cache_socket()
    store, names = GrpcChunkStore(target), GrpcImageNames(target)
    try:
        image = await names.resolve(name)
        index = await load_index(store, Digest.from_proto(image.index))
        chunks = index.chunks()
        data: dict[Digest, bytes] = {}
        with tqdm(total=sum(d.size for d in chunks), unit="B", unit_scale=True, desc="pull",
                  disable=not progress) as bar:
            for i in range(0, len(chunks), 32):
                async for digest, compressed in store.get_many(chunks[i : i + 32]):
                    data[digest] = await asyncio.to_thread(decompress_verified, digest, compressed)
                    bar.update(digest.size)
        return index, data, image.index.hash
    finally:
        await store.close()
        await names.close()


def write_tree(index: Index, chunks: dict[Digest, bytes], root: pathlib.Path) -> None:
    """The image's tree under `root`, with modes, owners, times, xattrs, links and holes as in the index.

    Nothing is resolved by path: every name is created or opened relative to its parent directory's
    descriptor with O_NOFOLLOW, so whatever the index holds (and index_checks has already refused
    '..', '/' and loops), nothing is written outside `root`.
    """
    root.mkdir(mode=0o700)
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    first_name: dict[int, tuple[int, bytes]] = {}  # inode -> (its directory's descriptor, name), for hardlinks
    kept: list[int] = []  # descriptors held for hardlinks, closed at the end
    # (directory descriptor, directory inode, iterator over its entries); metadata set on the way out
    stack = [(root_fd, index.inode(1), iter(index.inode(1).entries))]
    try:
        while stack:
            dir_fd, dir_node, entries = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                _set_metadata_fd(dir_fd, dir_node)  # last: writing into a directory changes its mtime
                if dir_fd != root_fd:
                    os.close(dir_fd)
                else:
                    os.fchmod(root_fd, 0o700)  # the container sees its upper dir's mode for /, not this
                continue
            name, ino = entry.name, entry.inode
            check_name(name)  # an Index is checked already; this function stays safe on its own
            node = index.inode(ino)
            if ino in first_name:
                src_fd, src_name = first_name[ino]
                os.link(src_name, name, src_dir_fd=src_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
                continue
            if node.type == T.DIRECTORY:
                os.mkdir(name, 0o700, dir_fd=dir_fd)
                child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
                stack.append((child, node, iter(node.entries)))
                continue
            if node.nlink > 1:
                held = os.dup(dir_fd)
                kept.append(held)
                first_name[ino] = (held, name)
            if node.type == T.REGULAR:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
                try:
                    with open(fd, "wb", closefd=False) as f:
                        for ext in node.extents:
                            if ext.HasField("chunk"):
                                chunk = chunks[Digest.from_proto(ext.chunk)]
                                f.write(chunk[ext.chunk_offset : ext.chunk_offset + ext.length])
                            else:
                                f.seek(ext.length, os.SEEK_CUR)  # a hole stays a hole
                        f.truncate(node.size)
                    _set_metadata_fd(fd, node)
                finally:
                    os.close(fd)
                continue
            if node.type == T.SYMLINK:
                os.symlink(node.symlink_target, name, dir_fd=dir_fd)
            else:
                os.mknod(name, _KIND[node.type] | 0o600, os.makedev(node.rdev_major, node.rdev_minor), dir_fd=dir_fd)
            _set_metadata_at(dir_fd, name, node)
    finally:
        for fd in kept + [fd for fd, _, _ in stack[1:]]:
            os.close(fd)
        os.close(root_fd)


def _set_metadata_fd(fd: int, node: index_pb2.Inode) -> None:
    """Owner, mode, xattrs and times of an open file or directory."""
    os.fchown(fd, node.uid, node.gid)
    os.fchmod(fd, node.mode)  # after chown, which clears setuid bits
    for x in node.xattrs:
        os.setxattr(fd, x.name, x.value)
    os.utime(fd, ns=(node.mtime_ns, node.mtime_ns))


def _set_metadata_at(dir_fd: int, name: bytes, node: index_pb2.Inode) -> None:
    """The same for a symlink, device or fifo (never opened: a fifo would block, a device is not ours to open)."""
    os.chown(name, node.uid, node.gid, dir_fd=dir_fd, follow_symlinks=False)
    if node.type != T.SYMLINK:
        # just made by mknod in a directory only root can reach: not a symlink, so following is the same
        os.chmod(name, node.mode, dir_fd=dir_fd)
        if node.xattrs:
            path = f"/proc/self/fd/{dir_fd}/{os.fsdecode(name)}"
            for x in node.xattrs:
                os.setxattr(path, x.name, x.value, follow_symlinks=False)
    os.utime(name, ns=(node.mtime_ns, node.mtime_ns), dir_fd=dir_fd, follow_symlinks=False)


def pulled_dir() -> pathlib.Path:
    """Where full pulls are kept: root's alone (trees keep their set-uid files and device nodes)."""
    pulled = config.home() / "pulled"
    pulled.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(pulled, 0o700)  # also when an older version made it world-traversable
    return pulled


def remove_pulled(index_hash: str) -> bool:
    """Remove the full pull of an index from this node, if there is one."""
    if not re.fullmatch(r"[0-9a-f]{64}", index_hash):
        return False
    path = config.home() / "pulled" / index_hash
    if not path.is_dir() or path.is_symlink():
        return False
    shutil.rmtree(path)
    return True


def pull(name: str, progress: bool = True) -> pathlib.Path:
    """The image's tree on local disk (fetched and written now, or kept from an earlier pull)."""
    index, chunks, index_hash = asyncio.run(_fetch_all(name, progress))
    pulled = pulled_dir()
    final = pulled / index_hash
    if final.is_dir():
        return final
    tmp = pulled / f".tmp-{index_hash[:16]}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_tree(index, chunks, tmp)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
