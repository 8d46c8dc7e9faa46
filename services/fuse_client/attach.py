"""The node FUSE client's API, from synchronous code (CLI, snapshotter threads, tests).

Leases taken here last until someone detaches them (a mount, the snapshotter's images). A caller
that holds an image only while it lives, `imagestream run`, uses held.py instead: no gRPC import,
and the lease ends with the process.
"""

from __future__ import annotations

import grpc
from google.protobuf import json_format

from imagestream import config
from imagestream.errors import FailedPrecondition, ImagestreamError, InvalidArgument, NotFound
from imagestream.v1 import digest_pb2, fuse_pb2, fuse_pb2_grpc

from fuse_client.attachment import Attached, NotServing

_ERRORS = {grpc.StatusCode.NOT_FOUND: NotFound, grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
           grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition}


_channels: dict[str, grpc.Channel] = {}


def _stub(timeout_s: float) -> tuple[fuse_pb2_grpc.FuseStub, str]:
    target = "unix:" + config.fuse_socket()
    channel = _channels.get(target)
    if channel is None:
        channel = _channels[target] = grpc.insecure_channel(target)
    return fuse_pb2_grpc.FuseStub(channel), target


def _call(method: str, request, timeout_s: float):  # type: ignore[no-untyped-def]
    stub, target = _stub(timeout_s)
    try:
        return getattr(stub, method)(request, timeout=timeout_s)
    except grpc.RpcError as e:
        code = e.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            raise NotServing(f"the node's FUSE client does not answer on {target} ({e.details()}); "
                             "it is `python -m fuse_client` (`imagestream stack up` starts it)") from None
        raise _ERRORS.get(code, ImagestreamError)(e.details()) from None


def attach(image: str, lease: str, download: bool = True, index: tuple[str, int] | None = None,
           timeout_s: float = 60.0) -> Attached:
    """Attach `image` under `lease`; its directory in the node's mount is `.path`.

    `index` (hash, size) is the index the caller expects: FailedPrecondition if the name now points elsewhere.
    """
    request = fuse_pb2.AttachRequest(image=image, lease=lease, download=download, profile=config.get("profile"),
                                     record_reads=config.get("record_reads"))
    if index is not None:
        request.index.CopyFrom(digest_pb2.Digest(hash=index[0], size_bytes=index[1]))
    return _attached(_call("Attach", request, timeout_s), lease)


def detach(lease: str, wait: bool = False, timeout_s: float = 60.0) -> bool:
    """Drop `lease`; True if the image's directory went with it. `wait`: until its recorded profile is saved."""
    return _call("Detach", fuse_pb2.DetachRequest(lease=lease, wait=wait), timeout_s).detached


def attachments(timeout_s: float = 10.0) -> tuple[list[Attached], str, int]:
    """Every attached image, the node's mount point, and the pid of the process serving it."""
    reply = _call("ListAttachments", fuse_pb2.ListAttachmentsRequest(), timeout_s)
    return [_attached(a) for a in reply.attachments], reply.mountpoint, reply.pid


def _attached(message: fuse_pb2.Attachment, lease: str = "") -> Attached:
    return Attached.from_json(json_format.MessageToDict(message, preserving_proto_field_name=True), lease)
