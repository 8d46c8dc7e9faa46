"""The errors imagestream raises, as one tree.

    ImagestreamError
    ├── InvalidArgument      a request or a digest is malformed          (gRPC INVALID_ARGUMENT)
    ├── NotFound             no tier holds the chunk / the name           (gRPC NOT_FOUND)
    ├── CorruptChunk         bytes do not match their digest              (dropped, fetched again)
    ├── Unavailable          a tier cannot be reached; try the next one   (gRPC UNAVAILABLE)
    ├── FailedPrecondition   e.g. publishing an image whose chunks are missing
    ├── PermissionDenied     the caller's certificate does not allow it   (gRPC PERMISSION_DENIED, UNAUTHENTICATED)
    └── BadImage             a source image is malformed or hostile; names the entry

Errors become errno only at the FUSE edge and status codes only at the gRPC edge.
"""

from __future__ import annotations


class ImagestreamError(Exception):
    """Base of every error imagestream raises on purpose."""


class InvalidArgument(ImagestreamError):
    pass


class NotFound(ImagestreamError):
    pass


class CorruptChunk(ImagestreamError):
    pass


class Unavailable(ImagestreamError):
    pass


class FailedPrecondition(ImagestreamError):
    pass


class PermissionDenied(ImagestreamError):
    pass


class BadImage(ImagestreamError):
    """A source image is refused. The message names the entry (blob or path) at fault."""
