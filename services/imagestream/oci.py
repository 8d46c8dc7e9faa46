"""The OCI vocabulary shared by push, the regional tier's Distribution side and the snapshotter:
media types (the one list of them), digest strings, repository:tag names, and how a blob is kept.

A blob (manifest, config, layer) is stored as *pieces*, chunks of the chunk store of at most
PIECE_SIZE bytes, plus a record: digest, size, media type, pieces.
"""

from __future__ import annotations

import dataclasses
import re

from imagestream.digests import Digest
from imagestream.errors import InvalidArgument
from imagestream.v1 import distribution_pb2

PIECE_SIZE = 4 << 20

MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_OCI_IMAGE_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_LAYER = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}
MANIFEST_TYPES = (MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST)
IMAGE_INDEX_TYPES = (MEDIA_OCI_IMAGE_INDEX, MEDIA_DOCKER_MANIFEST_LIST)

_OCI_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")
REFERENCE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _OCI_DIGEST.match(digest):
        raise InvalidArgument(f"malformed blob digest {digest!r}: want sha256:<64 lower-case hex digits>")
    return digest


def repository_and_tag(name: str) -> tuple[str, str]:
    """'debian-python:e2e' -> ('debian-python', 'e2e'); no tag means 'latest'."""
    repository, sep, tag = name.rpartition(":")
    if not sep or "/" in tag:
        return name, "latest"
    return repository, tag


def layer_media_type(head: bytes) -> str:
    """The layer media type its first bytes show (gzip, zstd or a plain tar)."""
    if head[:2] == b"\x1f\x8b":
        return MEDIA_LAYER["gzip"]
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return MEDIA_LAYER["zstd"]
    return MEDIA_LAYER["none"]


@dataclasses.dataclass
class BlobRecord:
    digest: str
    size: int
    media_type: str
    pieces: list[Digest]

    def to_proto(self) -> distribution_pb2.Blob:
        return distribution_pb2.Blob(digest=self.digest, size=self.size, media_type=self.media_type,
                                     pieces=[p.to_proto() for p in self.pieces])

    @classmethod
    def from_proto(cls, m: distribution_pb2.Blob) -> BlobRecord:
        return cls(check_digest(m.digest), m.size, m.media_type, [Digest.from_proto(p) for p in m.pieces])

    def pieces_bytes(self) -> bytes:
        return distribution_pb2.Blob(pieces=[p.to_proto() for p in self.pieces]).SerializeToString()

    @staticmethod
    def parse_pieces(data: bytes) -> list[Digest]:
        m = distribution_pb2.Blob()
        m.ParseFromString(data)
        return [Digest.from_proto(p) for p in m.pieces]
