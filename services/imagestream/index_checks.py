"""Every rule an image index must keep, checked in one place before anything uses it.

An index comes from the network: whoever can publish can hand a node any
bytes. `check(message)` is run when an index is published (the regional
store answers INVALID_ARGUMENT) and whenever one is loaded (FUSE client, node
cache, full pull), so the code behind it may rely on these facts:

- inode 1 is the root directory; every entry names an inode in range; every
  directory but the root is named by exactly one entry, so the tree has no
  loops and no directory hardlinks;
- names are 1..255 bytes, never '.', '..', or containing '/' or NUL; no name
  repeats in a directory; whole paths stay within 4096 bytes and 512 levels;
- a regular file's extents are exactly the ones the reader indexes by
  offset // chunk_size, their lengths add up to its size, and each slice lies
  within its chunk;
- symlink targets are 1..4095 bytes without NUL; devices live under /dev only;
  no xattr can steer overlayfs (trusted.overlay.*);
- counts stay within limits that keep a node's memory and time bounded.

The walk is iterative: a hostile depth never reaches Python's recursion limit.
"""

from __future__ import annotations

import re

from imagestream.digests import MAX_BLOB_BYTES
from imagestream.errors import BadImage
from imagestream.v1 import index_pb2

T = index_pb2.Inode

MAX_NAME_BYTES = 255  # NAME_MAX
MAX_PATH_BYTES = 4096  # PATH_MAX, with the leading '/'
MAX_DEPTH = 512  # directories below the root; a full pull holds one open descriptor per level
MAX_INODES = 2_000_000
MAX_ENTRIES = 4_000_000  # directory entries in the whole tree (hardlinks count once per name)
MAX_XATTRS = 128  # per inode
MAX_XATTR_NAME_BYTES = 255  # XATTR_NAME_MAX
MAX_XATTR_VALUE_BYTES = 65536  # XATTR_SIZE_MAX
MAX_SYMLINK_BYTES = 4095
MAX_FILE_BYTES = 1 << 50  # 1 PiB: anything beyond is a lie about the size
MAX_CONFIG_BYTES = 1 << 20

_TYPES = frozenset(T.Type.values()) - {T.TYPE_UNSPECIFIED}
DIRECTORY, REGULAR, SYMLINK = T.DIRECTORY, T.REGULAR, T.SYMLINK
_DEVICES = frozenset({T.CHAR_DEVICE, T.BLOCK_DEVICE})
_DOTS = frozenset({b".", b".."})
_HEX64 = re.compile(r"[0-9a-f]{64}")


class BadIndex(BadImage):
    """An index breaks a rule above. The message names the path (or inode) at fault."""


def check_name(name: bytes, where: str = "") -> None:
    """One path component, as a directory entry may hold it."""
    if not name:
        raise BadIndex(f"{where or 'entry'}: empty name")
    if len(name) > MAX_NAME_BYTES:
        raise BadIndex(f"{where or 'entry'}: name of {len(name)} bytes exceeds {MAX_NAME_BYTES}")
    if name in (b".", b".."):
        raise BadIndex(f"{where or 'entry'}: name {name!r} is not allowed")
    if b"/" in name or b"\0" in name:
        raise BadIndex(f"{where or 'entry'}: name {name[:64]!r} holds '/' or NUL")


def _show(path: bytes) -> str:
    shown = path.decode("utf-8", "backslashreplace")
    return repr(shown if len(shown) <= 200 else shown[:100] + "..." + shown[-60:])


def check(message: index_pb2.ImageIndex) -> None:
    """Raise BadIndex unless `message` keeps every rule in this module's doc."""
    inodes = message.inodes
    count = len(inodes)
    chunk_size = message.chunk_size
    if not 0 < chunk_size <= MAX_BLOB_BYTES:
        raise BadIndex(f"index: chunk size {chunk_size} is not within 1..{MAX_BLOB_BYTES}")
    if count == 0 or inodes[0].type != DIRECTORY:
        raise BadIndex("index: inode 1 is not the root directory")
    if count > MAX_INODES:
        raise BadIndex(f"index: {count} inodes exceed the limit of {MAX_INODES}")
    if len(message.config_json) > MAX_CONFIG_BYTES:
        raise BadIndex(f"index: config of {len(message.config_json)} bytes exceeds {MAX_CONFIG_BYTES}")

    # Hot on every mount (thousands of inodes): messages are built only once something is wrong.
    named = bytearray(count + 1)  # set once an entry names the inode (checked by then)
    entries_total = 0
    # (directory inode, its path, depth); the root has path b"" and depth 0
    todo: list[tuple[int, bytes, int]] = [(1, b"", 0)]
    problem = _inode_problem(inodes[0], chunk_size)
    if problem:
        raise BadIndex(f"index: '/': {problem}")
    while todo:
        ino, path, depth = todo.pop()
        entries = inodes[ino - 1].entries
        entries_total += len(entries)
        if entries_total > MAX_ENTRIES:
            raise BadIndex(f"index: more than {MAX_ENTRIES} directory entries")
        seen: set[bytes] = set()
        for entry in entries:
            name, child = entry.name, entry.inode
            if not 0 < len(name) <= MAX_NAME_BYTES or name in _DOTS or b"/" in name or b"\0" in name:
                check_name(name, f"index: entry in {_show(path or b'/')}")
            if name in seen:
                raise BadIndex(f"index: {_show(path + b'/' + name)}: name appears twice in its directory")
            seen.add(name)
            if len(path) + 1 + len(name) > MAX_PATH_BYTES:
                raise BadIndex(f"index: path of {len(path) + 1 + len(name)} bytes exceeds {MAX_PATH_BYTES}: "
                               f"{_show(path + b'/' + name)}")
            if not 0 < child <= count:
                raise BadIndex(f"index: {_show(path + b'/' + name)}: inode {child} out of range 1..{count}")
            node = inodes[child - 1]
            kind = node.type
            if kind == DIRECTORY:
                if child == 1 or named[child]:
                    raise BadIndex(f"index: {_show(path + b'/' + name)}: directory inode {child} is named twice "
                                   "(a loop or a directory hardlink)")
                if depth >= MAX_DEPTH:
                    raise BadIndex(f"index: {_show(path + b'/' + name)}: deeper than {MAX_DEPTH} directories")
                todo.append((child, path + b"/" + name, depth + 1))
            elif kind in _DEVICES and path != b"/dev" and not path.startswith(b"/dev/"):
                raise BadIndex(f"index: {_show(path + b'/' + name)}: device node outside /dev")
            if not named[child]:
                named[child] = 1
                problem = _inode_problem(node, chunk_size)
                if problem:
                    raise BadIndex(f"index: {_show(path + b'/' + name)}: {problem}")


def _inode_problem(node: index_pb2.Inode, chunk_size: int) -> str | None:
    """What is wrong with one inode on its own, or None."""
    kind = node.type
    if kind not in _TYPES:
        return f"unknown inode type {kind}"
    if node.mode & ~0o7777:
        return f"mode {node.mode:o} has bits beyond 7777"
    size = node.size
    if not 0 <= size <= MAX_FILE_BYTES:
        return f"size {size} out of range"
    extents = node.extents
    if kind == REGULAR:
        problem = _extents_problem(extents, size, chunk_size)
        if problem:
            return problem
    elif extents:
        return "not a regular file but has extents"
    if kind != DIRECTORY and node.entries:
        return "not a directory but has entries"
    target = node.symlink_target
    if kind == SYMLINK:
        if not 0 < len(target) <= MAX_SYMLINK_BYTES or b"\0" in target:
            return f"symlink target must be 1..{MAX_SYMLINK_BYTES} bytes without NUL"
    elif target:
        return "not a symlink but has a symlink target"
    xattrs = node.xattrs
    if xattrs:
        if len(xattrs) > MAX_XATTRS:
            return f"{len(xattrs)} xattrs exceed {MAX_XATTRS}"
        for x in xattrs:
            if not 0 < len(x.name) <= MAX_XATTR_NAME_BYTES or b"\0" in x.name or b"." not in x.name:
                return f"malformed xattr name {x.name[:64]!r}"
            if x.name.startswith((b"trusted.overlay.", b"user.overlay.")):
                return f"xattr {x.name.decode(errors='replace')!r} would steer overlayfs"
            if len(x.value) > MAX_XATTR_VALUE_BYTES:
                return f"xattr value of {len(x.value)} bytes exceeds {MAX_XATTR_VALUE_BYTES}"
    return None


def _extents_problem(extents, size: int, chunk_size: int) -> str | None:  # type: ignore[no-untyped-def]
    """The reader finds byte `o` in extent o // chunk_size: extent i must cover exactly
    [i * chunk_size, min(size, (i + 1) * chunk_size))."""
    want = -(-size // chunk_size)
    if len(extents) != want:
        return f"{len(extents)} extents for {size} bytes (want {want})"
    last = want - 1
    for i, ext in enumerate(extents):
        length = ext.length
        if length != (chunk_size if i < last else size - last * chunk_size):
            return f"extent {i} is {length} bytes long (want {min(chunk_size, size - i * chunk_size)})"
        chunk = ext.chunk  # an unset chunk reads as the empty default: a hole
        chunk_bytes = chunk.size_bytes
        if chunk_bytes or ext.HasField("chunk"):
            if not 0 < chunk_bytes <= MAX_BLOB_BYTES or not _HEX64.fullmatch(chunk.hash):
                return f"extent {i} names a malformed chunk digest"
            offset = ext.chunk_offset
            if offset < 0 or offset + length > chunk_bytes:
                return f"extent {i} reaches beyond its chunk ({offset}+{length} > {chunk_bytes})"
        elif ext.chunk_offset:
            return f"hole extent {i} has a chunk offset"
    return None
