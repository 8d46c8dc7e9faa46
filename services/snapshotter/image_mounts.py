"""One FUSE mount per streamed image, shared by every snapshot (container) that sits on it.

An image is mounted when the first snapshot on it is prepared (or its mounts
asked for) and unmounted when the last one is removed. The FUSE clients are
processes of their own (`fuse_client.mounts`): running containers keep their
image when the snapshotter restarts. On start, `reconcile` removes what a crash
left behind: a mount whose FUSE client died (ENOTCONN) is unmounted and, if
snapshots still use it, mounted again; a mount nobody uses is unmounted.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import pathlib
import shutil
import subprocess
import time
from collections.abc import Callable

from fuse_client import mounts
from imagestream.snapshot_labels import StreamedLayer
from imagestream.errors import FailedPrecondition
from imagestream.proc import alive

log = logging.getLogger("snapshotter")


def healthy(mountpoint: pathlib.Path) -> bool:
    """A live FUSE mount is here: its client runs, and it answers (a dead one answers ENOTCONN; stat alone
    may not tell, the kernel keeps the root's attributes)."""
    if not mounts.is_mountpoint(mountpoint):
        return False
    try:
        if not alive(mounts.Mount.find(str(mountpoint)).pid):
            return False
    except mounts.MountError:  # not one of ours
        return False
    try:
        os.listdir(mountpoint)
    except OSError as e:
        if e.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO):
            return False
        raise
    return True


def force_unmount(mountpoint: pathlib.Path) -> None:
    """Unmount, also when the FUSE client is gone or the mount busy (lazily then)."""
    try:
        mounts.unmount(mountpoint)
    except mounts.MountError:
        if mounts.is_mountpoint(mountpoint):
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


class ImageMounts:
    def __init__(self, root: pathlib.Path, on_mount: Callable[[StreamedLayer, float], None] = lambda layer, s: None):
        self.dir = root / "images"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self.on_mount = on_mount

    def mountpoint(self, index_hash: str) -> pathlib.Path:
        return self.dir / index_hash[:32]

    async def ensure(self, layer: StreamedLayer) -> pathlib.Path:
        """The image's mount, made now if it is not there (or dead)."""
        mp = self.mountpoint(layer.index.hash)
        async with self._locks[layer.index.hash]:
            if await asyncio.to_thread(healthy, mp):
                return mp
            if await asyncio.to_thread(mounts.is_mountpoint, mp):
                log.warning("image mount %s of %s is dead (its FUSE client is gone): mounting it again", mp, layer.image)
                await asyncio.to_thread(force_unmount, mp)
            mp.mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            try:
                mounted = await asyncio.to_thread(mounts.mount, layer.image, mp)
            except mounts.MountError as e:
                raise FailedPrecondition(f"cannot mount streamed image {layer.image!r}: {e}") from None
            if mounted.index != layer.index.hash:
                await asyncio.to_thread(force_unmount, mp)
                raise FailedPrecondition(
                    f"image {layer.image!r} now points at index {mounted.index[:12]}, not {layer.index.hash[:12]} "
                    "that this snapshot was made from; pull the image again")
            seconds = time.monotonic() - started
            self.on_mount(layer, seconds)
            return mp

    async def release(self, index_hash: str) -> None:
        """Nobody uses the image any more: unmount it."""
        mp = self.mountpoint(index_hash)
        async with self._locks[index_hash]:
            if await asyncio.to_thread(mounts.is_mountpoint, mp):
                await asyncio.to_thread(force_unmount, mp)
                log.info("unmounted image %s (no snapshot uses it)", mp.name[:12])
            with _suppress_os_error():
                mp.rmdir()

    def present(self) -> dict[str, bool]:
        """Mount point name -> mounted (alive or not) for every image folder."""
        return {p.name: mounts.is_mountpoint(p) for p in self.dir.iterdir()}  # not is_dir(): a dead mount fails it

    async def reconcile(self, in_use: dict[str, StreamedLayer], remount: bool = True) -> None:
        """Drop dead and unused mounts; with `remount` (on start, not on the way out) mount again the images
        still in use.

        `in_use` maps the index hash of each image some snapshot sits on to one of its layers.
        """
        wanted = {self.mountpoint(h).name: layer for h, layer in in_use.items()}
        for name, mounted in (await asyncio.to_thread(self.present)).items():
            mp = self.dir / name
            if name not in wanted:
                if mounted:
                    await asyncio.to_thread(force_unmount, mp)
                    log.info("unmounted %s: no snapshot uses it", mp)
                await asyncio.to_thread(shutil.rmtree, mp, True)
            elif mounted and not await asyncio.to_thread(healthy, mp):
                log.warning("found the dead mount %s: unmounting it", mp)
                await asyncio.to_thread(force_unmount, mp)
        for layer in wanted.values() if remount else ():
            await self.ensure(layer)


class _suppress_os_error:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], OSError)  # type: ignore[arg-type]
