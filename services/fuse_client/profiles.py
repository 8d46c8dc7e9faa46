"""Startup profiles: which chunks an image's first run read, in order; stored with the image in the region."""

from __future__ import annotations

import logging

from imagestream.digests import Digest, compress, decompress_verified
from imagestream.rpc.client import GrpcChunkStore, GrpcImageNames
from imagestream.store.base import ChunkStore
from imagestream.v1 import images_pb2

log = logging.getLogger(__name__)


async def load_profile(store: ChunkStore, image: images_pb2.Image) -> list[Digest]:
    """The image's profile chunks in order; [] if it has none or it cannot be read (a profile only helps)."""
    if not image.profile.hash:
        return []
    try:
        digest = Digest.from_proto(image.profile)
        profile = images_pb2.StartupProfile()
        profile.ParseFromString(decompress_verified(digest, await store.get(digest)))
        return [Digest.from_proto(d) for d in profile.chunks]
    except Exception as e:  # noqa: BLE001
        log.warning("startup profile of %s not used: %s", image.name, e)
        return []


async def save_profile(region: str, image: images_pb2.Image, chunks: list[Digest], timeout_s: float = 30.0) -> Digest:
    """Store the profile in the regional store at `region` and attach it to the image there.

    Straight to the region: the caches between serve reads only.
    """
    data = images_pb2.StartupProfile(chunks=[d.to_proto() for d in chunks]).SerializeToString(deterministic=True)
    digest = Digest.of(data)
    store, names = GrpcChunkStore(region, name="regional", timeout_s=timeout_s), GrpcImageNames(region, timeout_s)
    try:
        await store.put(digest, compress(data))
        await names.set_profile(image.name, Digest.from_proto(image.index), digest)
    finally:
        await store.close()
        await names.close()
    return digest


def should_record(mode: str, image: images_pb2.Image) -> bool:
    if mode not in ("first", "always", "never"):
        raise ValueError(f"IMAGESTREAM_PROFILE={mode!r}: want first, always or never")
    return mode == "always" or (mode == "first" and not image.profile.hash)
