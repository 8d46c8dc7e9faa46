"""Image names: the interface, name rules, and an in-memory implementation for tests."""

from __future__ import annotations

import abc
import re
import time

from imagestream.digests import Digest
from imagestream.errors import FailedPrecondition, InvalidArgument, NotFound
from imagestream.v1 import images_pb2

# Like a registry reference: repository path, optional :tag. No spaces, no "..".
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*)*(:[A-Za-z0-9_][A-Za-z0-9._-]{0,127})?\Z")


def validate_name(name: str) -> str:
    if not name or len(name) > 255 or ".." in name or not _NAME.match(name):
        raise InvalidArgument(
            f"invalid image name {name!r}: use lower-case letters, digits, '.', '_', '-', '/' and an optional ':tag'"
        )
    return name


class ImageNames(abc.ABC):
    """Name -> Image record, read side: what every tier serves. Only the regional store holds names;
    the caches forward these reads to it."""

    @abc.abstractmethod
    async def resolve(self, name: str) -> images_pb2.Image: ...

    @abc.abstractmethod
    async def list(self) -> list[images_pb2.Image]: ...

    async def close(self) -> None:
        pass


class WritableImageNames(ImageNames):
    """The names of the regional store, the one tier that takes writes: publish, delete, profiles."""

    @abc.abstractmethod
    async def publish(self, image: images_pb2.Image) -> images_pb2.Image:
        """Point image.name at image.index. Implementations check every chunk is stored first."""

    @abc.abstractmethod
    async def delete(self, name: str) -> bool: ...

    @abc.abstractmethod
    async def set_profile(self, name: str, index: Digest, profile: Digest) -> images_pb2.Image:
        """Attach a startup profile, if `name` still points at `index` (else FailedPrecondition)."""


class MemoryNames(WritableImageNames):
    def __init__(self) -> None:
        self._images: dict[str, images_pb2.Image] = {}

    async def resolve(self, name: str) -> images_pb2.Image:
        validate_name(name)
        try:
            return self._images[name]
        except KeyError:
            raise NotFound(f"image {name!r} is not published") from None

    async def publish(self, image: images_pb2.Image) -> images_pb2.Image:
        validate_name(image.name)
        stored = images_pb2.Image()
        stored.CopyFrom(image)
        stored.published_at = int(time.time())
        self._images[image.name] = stored
        return stored

    async def list(self) -> list[images_pb2.Image]:
        return [self._images[n] for n in sorted(self._images)]

    async def delete(self, name: str) -> bool:
        return self._images.pop(validate_name(name), None) is not None

    async def set_profile(self, name: str, index: Digest, profile: Digest) -> images_pb2.Image:
        image = await self.resolve(name)
        if Digest.from_proto(image.index) != index:
            raise FailedPrecondition(f"image {name!r} no longer points at index {index}")
        image.profile.CopyFrom(profile.to_proto())
        return image
