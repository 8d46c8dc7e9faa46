"""Full pull: the fallback when an image cannot be streamed on this node.

Every chunk is fetched through the node cache (in batches, with a progress
bar), then the tree is written out to a local folder with all its metadata;
`run` then uses that folder where it would have used the streamed mount. The
folder is kept per index digest, so a second run of the same image starts at
once. Written to a temporary folder and renamed into place, so a pull cut
short is never taken for a complete one.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import shutil
import stat

from tqdm import tqdm

from imagestream import config
from imagestream.digests import Digest, decompress_verified
from imagestream.rpc.client import GrpcChunkStore, GrpcImageNames
from imagestream.index import Index, load_index
from imagestream.v1 import index_pb2
from fuse_client.mounts import streaming_unavailable_reason  # noqa: F401 - where run and the snapshotter ask

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
    """The image's tree under `root`, with modes, owners, times, xattrs, links and holes as in the index."""
    first_path: dict[int, pathlib.Path] = {}
    dirs: list[tuple[pathlib.Path, index_pb2.Inode]] = [(root, index.inode(1))]
    root.mkdir(mode=0o700)
    for raw, ino in index.walk():
        path = root / os.fsdecode(raw.lstrip(b"/"))
        node = index.inode(ino)
        if ino in first_path:
            os.link(first_path[ino], path)
            continue
        first_path[ino] = path
        if node.type == T.DIRECTORY:
            path.mkdir(mode=0o700)
            dirs.append((path, node))
            continue
        if node.type == T.REGULAR:
            with open(path, "wb") as f:
                for ext in node.extents:
                    if ext.HasField("chunk"):
                        chunk = chunks[Digest.from_proto(ext.chunk)]
                        f.write(chunk[ext.chunk_offset : ext.chunk_offset + ext.length])
                    else:
                        f.seek(ext.length, os.SEEK_CUR)  # a hole stays a hole
                f.truncate(node.size)
        elif node.type == T.SYMLINK:
            os.symlink(node.symlink_target, path)
        else:
            os.mknod(path, _KIND[node.type] | 0o600, os.makedev(node.rdev_major, node.rdev_minor))
        _set_metadata(path, node)
    for path, node in reversed(dirs):  # directories last: writing into them changes their mtime
        _set_metadata(path, node)


def _set_metadata(path: pathlib.Path, node: index_pb2.Inode) -> None:
    os.lchown(path, node.uid, node.gid)
    if node.type != T.SYMLINK:
        os.chmod(path, node.mode)  # after chown, which clears setuid bits
        for x in node.xattrs:
            os.setxattr(path, x.name, x.value, follow_symlinks=False)
    os.utime(path, ns=(node.mtime_ns, node.mtime_ns), follow_symlinks=False)


def pull(name: str, progress: bool = True) -> pathlib.Path:
    """The image's tree on local disk (fetched and written now, or kept from an earlier pull)."""
    index, chunks, index_hash = asyncio.run(_fetch_all(name, progress))
    pulled = config.home() / "pulled"
    final = pulled / index_hash
    if final.is_dir():
        return final
    pulled.mkdir(parents=True, exist_ok=True)
    tmp = pulled / f".tmp-{index_hash[:16]}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_tree(index, chunks, tmp)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
