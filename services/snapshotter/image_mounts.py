"""Streamed images for containers: each a directory of the node's one FUSE mount, shared by every snapshot on it.

The node's FUSE client (`python -m fuse_client`) serves them; the snapshotter holds
one lease per image ("snapshotter:<index>"), taken when the image's top layer is
committed at pull time or when a snapshot needs it, and dropped when neither the
layer nor any snapshot on it is left. Running containers keep their image when the
snapshotter restarts (the leases live in the FUSE client). On start, `reconcile`
takes again the leases of images in use (a restarted FUSE client has none) and
drops those nobody uses.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import pathlib
import time
from collections.abc import Callable

from fuse_client import attach, mounts
from imagestream import telemetry
from imagestream.errors import FailedPrecondition, ImagestreamError
from imagestream.snapshot_labels import StreamedLayer

log = logging.getLogger("snapshotter")

LEASE_PREFIX = "snapshotter:"


def healthy(path: pathlib.Path) -> bool:
    """The image's directory is there and served."""
    return path.is_dir() and mounts.answers(path)


class ImageMounts:
    def __init__(self, root: pathlib.Path, on_mount: Callable[[StreamedLayer, float], None] = lambda layer, s: None):
        self.root = root
        self._locks: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._paths: dict[str, pathlib.Path] = {}  # index hash -> its directory, while leased
        self.on_mount = on_mount

    @staticmethod
    def lease(index_hash: str) -> str:
        return LEASE_PREFIX + index_hash

    async def ensure(self, layer: StreamedLayer) -> pathlib.Path:
        """The image's directory, attached now if it is not (or no longer) there."""
        h = layer.index.hash
        async with self._locks[h]:
            path = self._paths.get(h)
            if path is not None and await asyncio.to_thread(healthy, path):
                return path
            if path is not None:  # the FUSE client restarted: its leases went with it
                log.warning("image %s of %s is no longer served at %s: attaching it again", h[:12], layer.image, path)
                await self._detach(h)
            started = time.monotonic()
            # a span of its own, whose trace goes on through the FUSE client's Attach down the tiers
            with telemetry.tracer.start_as_current_span("attach image"), telemetry.image_context(layer.image):
                telemetry.annotate(image=layer.image, index=h)
                try:
                    attached = await asyncio.to_thread(attach.attach, layer.image, self.lease(h),
                                                       index=(h, layer.index.size))
                except FailedPrecondition as e:
                    raise FailedPrecondition(f"cannot stream image {layer.image!r}: {e}; pull the image again") from None
                except ImagestreamError as e:
                    raise FailedPrecondition(f"cannot attach streamed image {layer.image!r}: {e}") from None
            path = self._paths[h] = pathlib.Path(attached.path)
            self.on_mount(layer, time.monotonic() - started)
            return path

    async def _detach(self, index_hash: str) -> None:
        self._paths.pop(index_hash, None)
        try:
            await asyncio.to_thread(attach.detach, self.lease(index_hash))
        except attach.NotServing:
            pass  # gone with the FUSE client

    async def release(self, index_hash: str) -> None:
        """Nobody uses the image any more: drop its lease."""
        async with self._locks[index_hash]:
            await self._detach(index_hash)
            log.info("detached image %s (no snapshot uses it)", index_hash[:12])

    async def reconcile(self, in_use: dict[str, StreamedLayer], remount: bool = True) -> None:
        """Drop the leases of images nobody uses; with `remount` (on start, not on the way out) attach the images
        in use.

        `in_use` maps the index hash of each image some snapshot sits on to one of its layers.
        """
        try:
            attached, _, _ = await asyncio.to_thread(attach.attachments)
        except attach.NotServing as e:
            log.warning("cannot reconcile image leases: %s", e)
            return
        for a in attached:
            for lease in a.leases:
                h = lease.removeprefix(LEASE_PREFIX)
                if lease.startswith(LEASE_PREFIX) and h not in in_use:
                    await self.release(h)
                elif lease.startswith(LEASE_PREFIX):
                    self._paths[h] = pathlib.Path(a.path)
        for layer in in_use.values() if remount else ():
            try:
                await self.ensure(layer)
            except FailedPrecondition as e:
                log.warning("%s", e)
