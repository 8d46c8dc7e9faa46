"""Turn a source image into a streamable one: flatten the layers, index the tree, chunk the contents.

The layers are applied in order with OCI whiteouts (`.wh.<name>` removes a
lower entry, `.wh..wh..opq` empties a lower directory; imagestream.whiteouts
has the rule, shared with the snapshotter's unpacker). Every regular file is
cut into fixed-size chunks; a chunk of zeros becomes a hole and is not stored;
other chunks are named by the SHA-256 of their bytes, zstd-compressed, and
kept once in a local spool until `push` uploads the ones the region lacks.
Nothing is uploaded before every blob has been read and checked.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import decimal
import json
import os
import pathlib
import posixpath
import tarfile
import tempfile
from collections import deque
from collections.abc import Callable
from typing import IO

from imagestream.digests import MAX_BLOB_BYTES, Digest, compress
from imagestream import index_checks, whiteouts
from imagestream.errors import BadImage
from imagestream.ingest.source import ImageSource
from imagestream.v1 import index_pb2

T = index_pb2.Inode
DEFAULT_CHUNK_SIZE = 1 << 20


@dataclasses.dataclass(eq=False)
class Node:
    """One inode of the tree being built; a hardlink group is one Node under several names."""

    type: int
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    target: str = ""
    rdev: tuple[int, int] = (0, 0)
    xattrs: dict[str, bytes] = dataclasses.field(default_factory=dict)
    # (chunk digest or None for a hole, length); during conversion a digest may still be a Future
    extents: list = dataclasses.field(default_factory=list)
    children: dict[str, Node] | None = None
    # a small file's bytes wait here (offset, length in the small-file spool) to be packed in tree order
    small: tuple[int, int] | None = None


class ChunkSpool:
    """Compressed chunks kept on local disk between conversion and upload, each once."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self.sizes: dict[Digest, int] = {}  # digest -> compressed size

    def path(self, digest: Digest) -> pathlib.Path:
        return self.root / f"{digest.hash}-{digest.size}"

    def add(self, data: bytes) -> Digest:
        """Called from worker threads: hash, compress and keep one piece."""
        digest = Digest.of(data)
        path = self.path(digest)
        if not path.exists():
            compressed = compress(data)
            tmp = path.with_suffix(f".{os.getpid()}.{id(data)}.tmp")
            tmp.write_bytes(compressed)
            os.replace(tmp, path)
        return digest

    def read(self, digest: Digest) -> bytes:
        return self.path(digest).read_bytes()


@dataclasses.dataclass
class Converted:
    index: index_pb2.ImageIndex
    index_bytes: bytes
    index_digest: Digest
    chunks: list[Digest]  # distinct chunks the index references, in first-use order
    content_bytes: int  # sum of regular file sizes (hardlinked files once)
    files: int
    source_digest: str


def _check_path(raw: str, what: str) -> str:
    """A tar member name as a clean relative path, or BadImage."""
    if "\0" in raw:
        raise BadImage(f"{what} {raw!r}: NUL in path")
    if raw.startswith("/"):
        raise BadImage(f"{what} {raw!r}: absolute path")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BadImage(f"{what} {raw!r}: '..' in path escapes the image root")
    clean = "/".join(parts)
    for part in parts:
        if len(_fsencode(part)) > index_checks.MAX_NAME_BYTES:
            raise BadImage(f"{what} {_short(raw)}: a name longer than {index_checks.MAX_NAME_BYTES} bytes")
    if len(_fsencode(clean)) + 1 > index_checks.MAX_PATH_BYTES:
        raise BadImage(f"{what} {_short(raw)}: path longer than {index_checks.MAX_PATH_BYTES} bytes")
    if len(parts) > index_checks.MAX_DEPTH + 1:
        raise BadImage(f"{what} {_short(raw)}: deeper than {index_checks.MAX_DEPTH} directories")
    return clean


def _short(raw: str) -> str:
    return repr(raw if len(raw) <= 200 else raw[:100] + "..." + raw[-60:])


def _fsencode(name: str) -> bytes:
    """Back to the bytes the tar held (tarfile decodes names with surrogateescape)."""
    return name.encode("utf-8", "surrogateescape")


_INT64 = range(-(2**63), 2**63)


def _mtime_ns(info: tarfile.TarInfo, what: str) -> int:
    exact = info.pax_headers.get("mtime")  # PAX keeps sub-second mtimes as decimal text
    try:
        if exact is not None:
            with contextlib.suppress(decimal.InvalidOperation):
                value = decimal.Decimal(exact)
                if value.is_finite() and int(value * 1_000_000_000) in _INT64:
                    return int(value * 1_000_000_000)
        ns = int(info.mtime) * 1_000_000_000
    except (ValueError, OverflowError, TypeError):  # nan, inf
        raise BadImage(f"{what}: mtime {exact or info.mtime!r} is not a time") from None
    if ns not in _INT64:
        raise BadImage(f"{what}: mtime {info.mtime!r} is out of range")
    return ns


def _xattrs(info: tarfile.TarInfo) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for key, value in info.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            out[key.removeprefix("SCHILY.xattr.")] = value.encode("utf-8", "surrogateescape")
    return dict(sorted(out.items()))


class Flattener:
    """Applies layers in order to one in-memory tree."""

    def __init__(self, spool: ChunkSpool, chunk_size: int, pool: concurrent.futures.Executor,
                 small_file_limit: int | None = None) -> None:
        if chunk_size <= 0 or chunk_size > MAX_BLOB_BYTES:
            raise ValueError(f"chunk size {chunk_size} out of range")
        # files up to this size are packed together; see Extent in index.proto
        self.small_file_limit = min(chunk_size, chunk_size // 16 if small_file_limit is None else small_file_limit)
        self._small = tempfile.TemporaryFile()
        self.root = Node(T.DIRECTORY, children={})
        self.spool = spool
        self.chunk_size = chunk_size
        self.pool = pool
        self._zeros = memoryview(bytes(chunk_size))
        self._pending: deque[concurrent.futures.Future[Digest]] = deque()
        self._max_pending = 4 * (getattr(pool, "_max_workers", 2) or 2)

    # -- tree helpers ----------------------------------------------------
    def _parent(self, path: str, what: str) -> tuple[Node, str]:
        """The directory holding `path` (made if missing) and the last name."""
        *dirs, name = path.split("/")
        node = self.root
        walked = []
        for part in dirs:
            walked.append(part)
            assert node.children is not None
            child = node.children.get(part)
            if child is None:
                child = node.children[part] = Node(T.DIRECTORY, children={})
            elif child.type != T.DIRECTORY:
                raise BadImage(f"{what} {path!r}: parent {'/'.join(walked)!r} is not a directory")
            node = child
        return node, name

    def _lookup(self, path: str) -> Node | None:
        node = self.root
        for part in path.split("/") if path else []:
            if node.children is None or part not in node.children:
                return None
            node = node.children[part]
        return node

    # -- layers ----------------------------------------------------------
    def apply_layer(self, tar: tarfile.TarFile, layer_name: str) -> None:
        # what this layer has put in the tree, with the parents its entries imply (as tar makes them):
        # its own whiteouts leave these in place (see imagestream.whiteouts)
        layer: set[str] = {""}
        for info in tar:
            what = f"{layer_name}: entry"
            path = _check_path(info.name, what)
            if not path:  # "./": the root directory itself
                self._set_meta(self.root, info, f"{what} {info.name!r}")
                continue
            parts = path.split("/")
            layer.update("/".join(parts[:i]) for i in range(1, len(parts)))
            try:
                whiteout = whiteouts.parse(path)
            except BadImage as e:
                raise BadImage(f"{what}: {e}") from None
            if whiteout is not None:
                self._parent(path, what)  # its directory, as unpacking the layer makes it
                self._white_out(whiteout, layer)
                continue
            self._add(path, info, tar, what)
            layer.add(path)

    def _white_out(self, whiteout: whiteouts.Whiteout, layer: set[str]) -> None:
        node = self._lookup(whiteout.target)
        if node is None:
            return
        if whiteout.target not in layer:
            layered = whiteouts.Layered.NOTHING
        else:
            layered = whiteouts.Layered.DIRECTORY if node.type == T.DIRECTORY else whiteouts.Layered.OTHER
        effect = whiteouts.effect(whiteout, layered)
        if effect is whiteouts.Effect.REMOVE:
            parent = self._lookup(whiteout.target.rpartition("/")[0])
            assert parent is not None and parent.children is not None
            del parent.children[whiteout.target.rpartition("/")[2]]
        elif effect is whiteouts.Effect.EMPTY and node.children is not None:
            self._keep_only_layer(node, whiteout.target, layer)

    def _keep_only_layer(self, directory: Node, path: str, layer: set[str]) -> None:
        """Below `directory`, drop whatever lower layers put there."""
        assert directory.children is not None
        for name, child in list(directory.children.items()):
            child_path = posixpath.join(path, name)
            if child_path not in layer:
                del directory.children[name]
            elif child.children is not None:
                self._keep_only_layer(child, child_path, layer)

    def _set_meta(self, node: Node, info: tarfile.TarInfo, what: str) -> None:
        node.mode = info.mode & 0o7777
        for field in ("uid", "gid"):
            value = getattr(info, field)
            if not isinstance(value, int) or not 0 <= value < 2**32:
                raise BadImage(f"{what}: {field} {value!r} is out of range (0..2^32-1)")
        node.uid, node.gid = info.uid, info.gid
        node.mtime_ns = _mtime_ns(info, what)
        node.xattrs = _xattrs(info)

    def _add(self, path: str, info: tarfile.TarInfo, tar: tarfile.TarFile, what: str) -> None:
        parent, name = self._parent(path, what)
        assert parent.children is not None
        existing = parent.children.get(name)
        if info.isdir():
            if existing is not None and existing.type == T.DIRECTORY:
                self._set_meta(existing, info, f"{what} {path!r}")  # an upper layer's directory merges with the lower one
                return
            node = Node(T.DIRECTORY, children={})
        elif info.islnk():
            target_path = _check_path(info.linkname, f"{what} {path!r}: hardlink target")
            target = self._lookup(target_path)
            if target is None:
                raise BadImage(f"{what} {path!r}: hardlink target {info.linkname!r} is not in the image")
            if target.type == T.DIRECTORY:
                raise BadImage(f"{what} {path!r}: hardlink to directory {info.linkname!r}")
            parent.children[name] = target
            return
        elif info.issym():
            if not info.linkname:
                raise BadImage(f"{what} {path!r}: symlink with an empty target")
            if not info.linkname.startswith("/"):
                resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), info.linkname))
                if resolved == ".." or resolved.startswith("../"):
                    raise BadImage(f"{what} {path!r}: symlink target {info.linkname!r} escapes the image root")
            if "\0" in info.linkname or len(_fsencode(info.linkname)) > index_checks.MAX_SYMLINK_BYTES:
                raise BadImage(f"{what} {path!r}: symlink target is longer than {index_checks.MAX_SYMLINK_BYTES} bytes or holds NUL")
            # the target's bytes as the tar held them (tarfile decodes non-UTF-8 ones with surrogateescape)
            node = Node(T.SYMLINK, target=info.linkname, size=len(_fsencode(info.linkname)))
        elif info.isreg():
            node = Node(T.REGULAR, size=info.size)
            if 0 < info.size <= self.small_file_limit:
                node.small = self._keep_small(tar.extractfile(info), info.size)
            else:
                node.extents = self._chunk(tar.extractfile(info), info.size)
        elif info.ischr() or info.isblk():
            if not path.startswith("dev/"):
                kind = "character" if info.ischr() else "block"
                raise BadImage(f"{what} {path!r}: {kind} device outside /dev is not allowed")
            if not (0 <= info.devmajor < 2**32 and 0 <= info.devminor < 2**32):
                raise BadImage(f"{what} {path!r}: device number out of range")
            node = Node(T.CHAR_DEVICE if info.ischr() else T.BLOCK_DEVICE, rdev=(info.devmajor, info.devminor))
        elif info.isfifo():
            node = Node(T.FIFO)
        else:
            raise BadImage(f"{what} {path!r}: unsupported tar entry type {info.type!r}")
        self._set_meta(node, info, f"{what} {path!r}")
        parent.children[name] = node

    def _keep_small(self, f: IO[bytes] | None, size: int) -> tuple[int, int]:
        assert f is not None
        data = f.read(size)
        if len(data) != size:
            raise BadImage(f"file content ends {size - len(data)} bytes early")
        offset = self._small.seek(0, os.SEEK_END)
        self._small.write(data)
        return offset, size

    def _pack_small_files(self, order: list[Node]) -> dict[int, list]:
        """Pack small files, in tree order, into chunks of up to chunk_size; id(node) -> its extents."""
        extents: dict[int, list] = {}
        pack: list[bytes] = []
        members: list[tuple[Node, int, int]] = []  # (node, offset in pack, length)
        used = 0

        def flush() -> None:
            nonlocal pack, members, used
            if members:
                future = self.pool.submit(self.spool.add, b"".join(pack))
                for node, offset, length in members:
                    extents[id(node)] = [(future, length, offset)]
            pack, members, used = [], [], 0

        for node in order:
            if node.small is None:
                continue
            offset, length = node.small
            self._small.seek(offset)
            data = self._small.read(length)
            if memoryview(data) == self._zeros[:length]:
                extents[id(node)] = [(None, length, 0)]
                continue
            if used + length > self.chunk_size:
                flush()
            pack.append(data)
            members.append((node, used, length))
            used += length
        flush()
        self._small.close()
        return extents

    def _chunk(self, f: IO[bytes] | None, size: int) -> list:
        extents: list = []
        remaining = size
        while remaining > 0:
            assert f is not None
            piece = f.read(min(self.chunk_size, remaining))
            if not piece:
                raise BadImage(f"file content ends {remaining} bytes early")
            remaining -= len(piece)
            if memoryview(piece) == self._zeros[: len(piece)]:
                extents.append((None, len(piece), 0))  # a hole: nothing stored, nothing fetched
                continue
            if len(self._pending) >= self._max_pending:
                self._pending.popleft().result()  # bound the memory held by queued pieces
            future = self.pool.submit(self.spool.add, piece)
            self._pending.append(future)
            extents.append((future, len(piece), 0))
        return extents

    # -- output ----------------------------------------------------------
    def build_index(self) -> tuple[index_pb2.ImageIndex, list[Digest], int, int]:
        """Number the inodes depth-first in name order (so the same tree gives the same index)."""
        for f in self._pending:
            f.result()
        numbers: dict[int, int] = {}
        order: list[Node] = []
        links: dict[int, int] = {}

        # depth first, iteratively: a hostile depth must not meet Python's recursion limit
        todo = [self.root]
        while todo:
            node = todo.pop()
            links[id(node)] = links.get(id(node), 0) + 1
            if id(node) in numbers:
                continue
            order.append(node)
            numbers[id(node)] = len(order)
            if node.children is not None:
                todo.extend(node.children[name] for name in sorted(node.children, reverse=True))
        packed = self._pack_small_files(order)
        index = index_pb2.ImageIndex(chunk_size=self.chunk_size)
        chunks: dict[Digest, None] = {}
        content_bytes = files = 0
        for node in order:
            inode = index.inodes.add(
                type=node.type, mode=node.mode, uid=node.uid, gid=node.gid, size=node.size,
                mtime_ns=node.mtime_ns, symlink_target=_fsencode(node.target),
                rdev_major=node.rdev[0], rdev_minor=node.rdev[1],
            )
            for key, value in node.xattrs.items():
                inode.xattrs.add(name=_fsencode(key), value=value)
            if node.children is not None:
                subdirs = 0
                for name in sorted(node.children):
                    child = node.children[name]
                    subdirs += child.type == T.DIRECTORY
                    inode.entries.add(name=_fsencode(name), inode=numbers[id(child)])
                inode.nlink = 2 + subdirs
                inode.size = 4096
            else:
                inode.nlink = links[id(node)]
            if node.type == T.REGULAR:
                files += 1
                content_bytes += node.size
                for digest_or_future, length, offset in packed.get(id(node), node.extents):
                    ext = inode.extents.add(length=length, chunk_offset=offset)
                    if digest_or_future is not None:
                        digest = digest_or_future.result()
                        ext.chunk.CopyFrom(digest.to_proto())
                        chunks[digest] = None
        return index, list(chunks), content_bytes, files


def convert(
    source: ImageSource,
    spool_dir: pathlib.Path,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    on_layer: Callable[[int, int], None] | None = None,
    workers: int | None = None,
    small_file_limit: int | None = None,
) -> tuple[Converted, ChunkSpool]:
    """Flatten and chunk `source`; BadImage (naming the entry) if anything is wrong."""
    spool = ChunkSpool(spool_dir)
    # One worker overlaps hashing and compression with the (single-threaded) gzip and tar reading;
    # more only add contention on a small machine (measured: 6.8 s with 1, 14.8 s with 2 on 2 cores).
    with concurrent.futures.ThreadPoolExecutor(workers or 1) as pool:
        flat = Flattener(spool, chunk_size, pool, small_file_limit)
        try:
            for layer in source.layers:
                with source.open_layer(layer) as tar:
                    flat.apply_layer(tar, layer.describe())
                if on_layer is not None:
                    on_layer(layer.position, len(source.layers))
            index, chunks, content_bytes, files = flat.build_index()
        finally:
            flat._small.close()  # the small files' spool, also when the image is refused half-way
    # Only the runtime part of the config (Env, Cmd, WorkingDir, ...): the same tree with the same
    # runtime settings gives the same index however it was packed into layers.
    runtime = source.config.get("config") or {}
    index.config_json = json.dumps(runtime, sort_keys=True, separators=(",", ":")).encode()
    index_checks.check(index)  # what the region would refuse at publish is refused here, before any upload
    index_bytes = index.SerializeToString(deterministic=True)
    if len(index_bytes) > MAX_BLOB_BYTES:
        raise BadImage(f"{source.path}: index of {len(index_bytes)} bytes exceeds the {MAX_BLOB_BYTES} byte limit")
    index_digest = spool.add(index_bytes)
    return (
        Converted(index, index_bytes, index_digest, chunks, content_bytes, files, source.manifest_digest),
        spool,
    )

