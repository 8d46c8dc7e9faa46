"""The node's FUSE client over an in-process stand-in (MemoryStore over gRPC) for the node cache and, for the
startup profiles it records, the regional store: hand-built indexes attached, bound on mount points, read
through real FUSE mounts."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from fuse_client import attach, mounts
from imagestream.digests import compress, Digest
from imagestream.rpc.server import start_server
from imagestream.names import MemoryNames
from imagestream.errors import NotFound
from imagestream.store import MemoryStore
from imagestream.v1 import images_pb2

from tests.conftest import needs_fuse
from tests.fuse.indexes import CHUNK, GIB, sample

pytestmark = needs_fuse


async def publish(store: MemoryStore, registry: MemoryNames, name: str, message) -> Digest:  # type: ignore[no-untyped-def]
    index_bytes = message.SerializeToString(deterministic=True)
    index_digest = Digest.of(index_bytes)
    await store.put(index_digest, compress(index_bytes))
    await registry.publish(images_pb2.Image(name=name, index=index_digest.to_proto()))
    return index_digest


class NodeFuse:
    """The node's FUSE client (`python -m fuse_client`), a process of its own as on a node."""

    def __init__(self, home) -> None:  # type: ignore[no-untyped-def]
        self.home = home
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.home / "fuse_client.log", "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "fuse_client"], stdout=log, stderr=subprocess.STDOUT,
                                        env=os.environ.copy())
        deadline = time.monotonic() + 60
        while True:
            try:
                attach.attachments(timeout_s=1)
                return
            except attach.NotServing:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError((self.home / "fuse_client.log").read_text()) from None
                time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        assert self.process is not None
        self.process.send_signal(sig)
        self.process.wait(30)


@pytest.fixture
async def node(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """(store, names, the FUSE client) with the sample image published as "sample"."""
    message, chunks, expected = sample()
    store, registry = MemoryStore(), MemoryNames()
    for d, data in chunks.items():
        await store.put(d, data)
    await publish(store, registry, "sample", message)
    socket = tmp_path / "node.sock"
    server, _ = await start_server("node_cache", [f"unix:{socket}"], store, registry)
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("IMAGESTREAM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("IMAGESTREAM_NODE_CACHE_SOCKET", str(socket))
    monkeypatch.setenv("IMAGESTREAM_REGION", f"unix:{socket}")
    fuse = NodeFuse(tmp_path / "home")
    await asyncio.to_thread(fuse.start)
    yield store, registry, fuse, expected
    await asyncio.to_thread(fuse.stop)
    await server.stop(None)


@pytest.fixture
async def mounted(node, tmp_path):  # type: ignore[no-untyped-def]
    store, _, _, expected = node
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = await asyncio.to_thread(mounts.mount, "sample", mnt)
    yield mnt, expected, store, m
    await asyncio.to_thread(mounts.unmount, mnt)


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


def fuse_mounts(under) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    """(mount point, fs type) of every imagestream FUSE mount, and bind of one, under a folder."""
    with open("/proc/self/mountinfo") as f:
        rows = [line.split() for line in f]
    return [(r[4], r[r.index("-") + 1]) for r in rows
            if r[r.index("-") + 1] == "fuse.imagestream" and r[4].startswith(str(under))]


async def test_two_images_and_two_mounts_are_served_by_one_process_each_image_its_own_inodes(  # type: ignore[no-untyped-def]
        node, tmp_path) -> None:
    store, registry, fuse, expected = node
    message, _, _ = sample()
    # another image: the same tree less its last file (and the entry naming it: an index may not dangle)
    gone = len(message.inodes)
    del message.inodes[-1]
    entries = message.inodes[0].entries
    del entries[next(i for i, e in enumerate(entries) if e.inode == gone)]
    other = await publish(store, registry, "other", message)
    a, b, c = (tmp_path / n for n in ("a", "b", "c"))
    for d in (a, b, c):
        d.mkdir()

    def check() -> None:
        ma, mb, mc = mounts.mount("sample", a), mounts.mount("sample", b), mounts.mount("other", c)
        try:
            assert ma.pid == mb.pid == mc.pid == fuse.process.pid  # no process per mount
            assert ma.source == mb.source != mc.source and mc.index == other.hash
            assert (a / "etc/multi").read_bytes() == (b / "etc/multi").read_bytes() == expected["etc/multi"]
            assert (c / "etc/multi").read_bytes() == expected["etc/multi"]
            assert os.stat(a / "etc/multi").st_ino == os.stat(b / "etc/multi").st_ino  # one image, one tree
            assert os.stat(a / "etc/multi").st_ino != os.stat(c / "etc/multi").st_ino  # namespaced per image
            attached, root, _ = attach.attachments()
            assert sorted(os.listdir(root)) == sorted(x.path.rsplit("/", 1)[1] for x in attached)
            assert sorted(len(x.leases) for x in attached) == [1, 2]
        finally:
            for d in (a, b, c):
                mounts.unmount(d)
        attached, root, _ = attach.attachments()
        assert attached == [] and os.listdir(root) == []

    await asyncio.to_thread(check)


async def test_attaching_a_known_image_loads_its_index_once_and_is_fast(node) -> None:  # type: ignore[no-untyped-def]
    store, _, _, _ = node

    def check() -> list[float]:
        first = attach.attach("sample", "t:first", download=False)
        attach.detach("t:first")
        hits = store.stats.hits
        seconds = []
        for i in range(5):
            started = time.perf_counter()
            again = attach.attach("sample", f"t:{i}", download=False)
            seconds.append(time.perf_counter() - started)
            assert again.path == first.path and os.listdir(again.path)
            attach.detach(f"t:{i}")
        assert store.stats.hits == hits  # nothing fetched: the index stayed loaded
        return seconds

    seconds = await asyncio.to_thread(check)
    assert sorted(seconds)[2] < 0.05, seconds


async def test_a_lease_is_held_once_and_the_directory_goes_with_the_last(node) -> None:  # type: ignore[no-untyped-def]
    def check() -> None:
        one = attach.attach("sample", "t:one", download=False)
        assert attach.attach("sample", "t:one", download=False).leases == ["t:one"]  # the same lease again
        attach.attach("sample", "t:two", download=False)
        assert attach.detach("t:one") is False and os.listdir(one.path)
        assert attach.detach("t:two") is True
        assert not os.path.exists(one.path)
        assert attach.detach("t:two") is False  # gone already
        with pytest.raises(NotFound):
            attach.attach("no-such-image", "t:three")

    await asyncio.to_thread(check)


async def test_restarting_the_fuse_client_leaves_no_dead_mounts_and_new_mounts_work(node, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, _, fuse, expected = node
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    def check() -> None:
        from imagestream import config

        root = str(config.fuse_mountpoint())
        mounts.mount("sample", mnt)
        fuse.stop(signal.SIGKILL)  # died: its mount and the bind of it are dead (ENOTCONN)
        assert not mounts.answers(mnt)
        fuse.start()
        assert sorted(fuse_mounts(tmp_path)) == [(root, "fuse.imagestream")]  # the new one only: nothing dead is left
        assert mounts.list_mounts() == []
        m = mounts.mount("sample", mnt)
        assert m.pid == fuse.process.pid and (mnt / "etc/multi").read_bytes() == expected["etc/multi"]
        mounts.unmount(mnt)
        fuse.stop()  # stopped cleanly: nothing is left mounted at all
        assert fuse_mounts(tmp_path) == []
        fuse.start()

    await asyncio.to_thread(check)


async def test_a_caller_that_names_the_index_keeps_the_content_after_the_name_goes(node) -> None:  # type: ignore[no-untyped-def]
    """The snapshotter's case: a layer snapshot on the node was made of this index; the name was removed (or
    the region started over and the same content came back under another name)."""
    _, registry, _, expected = node
    record = await registry.resolve("sample")
    index = (record.index.hash, record.index.size_bytes)
    assert await registry.delete("sample")
    with pytest.raises(NotFound):  # by name alone: gone
        await asyncio.to_thread(attach.attach, "sample", "snapshotter:y", False)

    def check() -> None:
        again = attach.attach("sample", "snapshotter:z", False, index=index)
        with open(os.path.join(again.path, "etc/multi"), "rb") as f:
            assert f.read() == expected["etc/multi"]
        attach.detach("snapshotter:z")

    await asyncio.to_thread(check)
