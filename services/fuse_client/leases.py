"""Mount leases: while an image is attached, this node holds a lease on its index in the regional store,
so that gc keeps every chunk of it even if its name is removed (chunk_store/gc.py).

A lease is taken when an image's first attachment comes, renewed every third of its TTL while the
image stays attached, and given back with its last attachment. A node that dies stops renewing, and
its leases lapse with their TTL. The regional store being out of reach does not stop a mount: the
lease is tried again at the next renewal (the name, while it exists, protects the image anyway).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from imagestream.digests import Digest
from imagestream.errors import ImagestreamError
from imagestream.rpc.client import GrpcLeases

log = logging.getLogger(__name__)

TTL_S = 300


class MountLeases:
    def __init__(self, region: str, ttl_s: int = TTL_S) -> None:
        self.client = GrpcLeases(region)
        self.ttl_s = ttl_s
        # one holder per FUSE client process: a restarted client takes its leases again as images attach
        self.holder = f"{socket.gethostname()}/fuse-{os.getpid()}"
        self.held: dict[Digest, str] = {}  # index -> image name
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._renew_forever())

    async def hold(self, index: Digest, image: str) -> None:
        self.held[index] = image
        await self._renew(index, image)

    async def release(self, index: Digest) -> None:
        if self.held.pop(index, None) is None:
            return
        try:
            await self.client.release(self.holder, index)
        except ImagestreamError as e:
            log.warning("lease on %s not given back (it lapses in %d s): %s", index.short, self.ttl_s, e)

    async def _renew(self, index: Digest, image: str) -> None:
        try:
            await self.client.renew(self.holder, index, image, self.ttl_s)
        except ImagestreamError as e:
            log.warning("lease on %s (%s) not renewed, trying again in %d s: %s", index.short, image,
                        self.ttl_s // 3, e)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            for index, image in list(self.held.items()):
                await self._renew(index, image)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for index in list(self.held):
            await self.release(index)
        await self.client.close()
