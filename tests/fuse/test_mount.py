"""A real FUSE mount of a hand-built index, served by an in-process stand-in (MemoryStore over gRPC) for the
node cache and, for the startup profile the mount records, the regional store."""

from __future__ import annotations

import asyncio
import errno
import os
import stat

import pytest

from fuse_client import mounts
from imagestream.digests import compress, Digest
from imagestream.rpc.server import start_server
from imagestream.names import MemoryNames
from imagestream.store import MemoryStore
from imagestream.v1 import images_pb2

from tests.conftest import needs_fuse
from tests.fuse.indexes import CHUNK, GIB, sample

pytestmark = needs_fuse


@pytest.fixture
async def mounted(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    message, chunks, expected = sample()
    store, registry = MemoryStore(), MemoryNames()
    for d, data in chunks.items():
        await store.put(d, data)
    index_bytes = message.SerializeToString(deterministic=True)
    index_digest = Digest.of(index_bytes)
    await store.put(index_digest, compress(index_bytes))
    await registry.publish(images_pb2.Image(name="sample", index=index_digest.to_proto()))
    socket = tmp_path / "node.sock"
    server, _ = await start_server("node_cache", [f"unix:{socket}"], store, registry)
    monkeypatch.setenv("IMAGESTREAM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("IMAGESTREAM_NODE_CACHE_SOCKET", str(socket))
    monkeypatch.setenv("IMAGESTREAM_REGION", f"unix:{socket}")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = await asyncio.to_thread(mounts.mount, "sample", mnt)
    yield mnt, expected, store, m
    await asyncio.to_thread(mounts.unmount, mnt)
    await server.stop(None)


async def test_tree_metadata_and_contents_through_the_mount(mounted) -> None:  # type: ignore[no-untyped-def]
    mnt, expected, store, _ = mounted

    def check() -> None:
        assert sorted(os.listdir(mnt)) == sorted(["etc", "abs", "sparse-5g", "many", "nön-ascii-ünïcode"])
        st = os.lstat(mnt / "etc/multi")
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
        assert (st.st_uid, st.st_gid, st.st_nlink, st.st_size) == (1000, 100, 2, CHUNK * 3 + 1234)
        assert st.st_mtime_ns == 1_600_000_000_123_456_789
        assert os.lstat(mnt / "etc/multi-hardlink").st_ino == st.st_ino
        assert (mnt / "etc/multi").read_bytes() == expected["etc/multi"]
        assert (mnt / "etc/empty").read_bytes() == b""
        assert os.readlink(mnt / "etc/link") == "multi" and os.readlink(mnt / "abs") == "/etc/multi"
        assert (mnt / "etc/link").read_bytes() == expected["etc/multi"]  # relative symlink resolves in the mount
        assert os.getxattr(mnt / "etc/multi", "user.origin") == b"test"
        assert os.listxattr(mnt / "etc/multi") == ["user.origin"]
        with pytest.raises(OSError) as e:
            os.getxattr(mnt / "etc/multi", "user.nothere")
        assert e.value.errno == errno.ENODATA
        names = os.listdir(mnt / "many")  # more entries than one readdir reply holds
        assert len(names) == 1500 and len(set(names)) == 1500
        assert (mnt / "many/f0042").read_text() == "42\n"
        assert (mnt / "nön-ascii-ünïcode").read_bytes() == b"x"
        assert stat.S_ISDIR(os.stat(mnt / "etc").st_mode) and os.stat(mnt / "etc").st_nlink == 2

    await asyncio.to_thread(check)


async def test_sparse_file_over_4gib(mounted) -> None:  # type: ignore[no-untyped-def]
    mnt, expected, _, _ = mounted

    def check() -> None:
        st = os.stat(mnt / "sparse-5g")
        assert st.st_size == 5 * GIB + 100
        assert st.st_blocks * 512 == CHUNK  # only the one data chunk occupies space
        with open(mnt / "sparse-5g", "rb") as f:
            assert f.read(4096) == bytes(4096)
            f.seek(4 * GIB + CHUNK)
            assert f.read(CHUNK) == expected["sparse-5g@4GiB+64KiB"]
            f.seek(5 * GIB + 90)
            assert f.read(100) == bytes(10)

    await asyncio.to_thread(check)


async def test_mount_is_read_only(mounted) -> None:  # type: ignore[no-untyped-def]
    mnt, *_ = mounted

    def check() -> None:
        for attempt in (lambda: open(mnt / "etc/multi", "wb"), lambda: (mnt / "newfile").write_text("x"),
                        lambda: os.mkdir(mnt / "d"), lambda: os.unlink(mnt / "etc/empty")):
            with pytest.raises(OSError) as e:
                attempt()
            assert e.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)

    await asyncio.to_thread(check)


async def test_a_chunk_that_cannot_be_had_is_eio_not_a_hang(mounted) -> None:  # type: ignore[no-untyped-def]
    mnt, expected, store, _ = mounted
    await store.delete(next(iter(store._chunks)))  # the first chunk of etc/multi is gone from every tier

    def read() -> OSError:
        with pytest.raises(OSError) as e:
            (mnt / "etc/multi").read_bytes()
        return e.value

    error = await asyncio.wait_for(asyncio.to_thread(read), 120)
    assert error.errno == errno.EIO


async def test_mount_time_does_not_depend_on_content_size(mounted) -> None:  # type: ignore[no-untyped-def]
    """Mounting fetches only the index: nothing of the 5 GiB file is read."""
    _, _, store, m = mounted
    assert store.stats.hits == 1  # the index itself, and no content chunk
