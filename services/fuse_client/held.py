"""Leases held by a connection: the start path of `imagestream run`.

A command that runs a container for as long as it lives (`imagestream run`) does
not need the Fuse gRPC API's leases, which outlive their caller until someone
calls Detach. It connects to the FUSE client's lease socket (the Fuse socket's
path + `.held`), sends one AttachRequest and gets one Attachment, both in the
proto's JSON mapping, one line each; the lease then lasts as long as the
connection. A caller that exits, however it exits (SIGKILL included), closes it,
and the FUSE client drops its lease: nothing is left attached or pinned.

Why a second transport beside gRPC: the client side imports neither gRPC nor
protobuf (about 0.1-0.2 s of a warm start's budget of 0.25 s goes to importing
gRPC alone), and a kernel-closed connection is the one lease a killed process
cannot leak. The request and reply are the Fuse API's own messages, and the
server side calls the same `NodeImages.attach` / `detach` as the gRPC servicer.

    client                               FUSE client
    {"attach": {AttachRequest}}\\n  ->
                                   <-   {"attachment": {Attachment}}\\n  or  {"error": {...}}\\n
    {"detach": {"wait": true}}\\n   ->   (optional: otherwise closing the connection detaches)
                                   <-   {"detached": true}\\n
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from typing import Any

from imagestream import config
from imagestream.errors import FailedPrecondition, ImagestreamError, InvalidArgument, NotFound, Unavailable

from fuse_client.attachment import Attached, NotServing

MAX_LINE = 1 << 20  # an Attachment carries the image's config: bounded, but not tiny
# the errors a reply may name; anything else is the base class
ERRORS: dict[str, type[ImagestreamError]] = {
    cls.__name__: cls for cls in (InvalidArgument, NotFound, FailedPrecondition, Unavailable)}


def socket_path(fuse_socket: str | None = None) -> str:
    return (fuse_socket or config.fuse_socket()) + ".held"


class HeldLease:
    """An attached image whose lease is this open connection; `close()` (or exiting the process) ends it."""

    def __init__(self, sock: socket.socket, file, attached: Attached) -> None:  # type: ignore[no-untyped-def]
        self._sock = sock
        self._file = file  # the connection's replies, read line by line
        self.attached = attached

    def detach(self, wait: bool = False) -> bool:
        """End the lease now; `wait`: until the startup profile recorded under it is saved."""
        try:
            _send(self._sock, {"detach": {"wait": wait}})
            return bool(_reply(self._file, "detached"))
        finally:
            self.close()

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> HeldLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def hold(image: str, lease: str, download: bool = True, timeout_s: float = 60.0) -> HeldLease:
    """Attach `image` for as long as the returned lease (this connection) is open."""
    path = socket_path()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        raise NotServing(f"the node's FUSE client does not answer on {path} ({e.strerror}); "
                         "it is `python -m fuse_client` (`imagestream stack up` starts it)") from None
    request = {"image": image, "lease": lease, "download": download, "profile": config.get("profile"),
               "record_reads": config.get("record_reads")}
    try:
        _send(sock, {"attach": request})
        replies = sock.makefile("rb")
        return HeldLease(sock, replies, Attached.from_json(_reply(replies, "attachment"), lease))
    except BaseException:
        sock.close()
        raise


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


def _reply(file, key: str) -> Any:  # type: ignore[no-untyped-def]
    try:
        line = file.readline(MAX_LINE + 1)
    except OSError as e:
        raise Unavailable(f"the node's FUSE client did not answer: {e}") from None
    if not line:
        raise Unavailable("the node's FUSE client closed the connection without an answer")
    try:
        doc = json.loads(line)
    except ValueError:
        raise Unavailable("the node's FUSE client answered something that is not JSON") from None
    if not isinstance(doc, dict):
        raise Unavailable("the node's FUSE client answered something that is not an object")
    if key in doc:
        return doc[key]
    error = doc.get("error") if isinstance(doc.get("error"), dict) else {}
    raise ERRORS.get(str(error.get("kind")), ImagestreamError)(str(error.get("message", "no reason given")))


# -- the FUSE client's side ----------------------------------------------------------------

async def serve(images, path: str):  # type: ignore[no-untyped-def]
    """Serve held leases for `images` (a NodeImages) on the Unix socket `path`; returns the asyncio server."""
    import asyncio

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _serve_connection(images, reader, writer)

    from imagestream import tls

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    with tls.unix_socket_permissions(path):  # 0600 (0660 with IMAGESTREAM_SOCKET_GROUP), as the gRPC socket
        return await asyncio.start_unix_server(connection, path=path, limit=MAX_LINE)


async def _serve_connection(images, reader, writer) -> None:  # type: ignore[no-untyped-def]
    import asyncio
    import logging

    from google.protobuf import json_format

    from imagestream.v1 import fuse_pb2

    log = logging.getLogger("fuse_client")
    lease = None

    async def answer(message: dict[str, Any]) -> None:
        writer.write(json.dumps(message).encode() + b"\n")
        await writer.drain()

    try:
        request = _request(await reader.readline(), "attach")
        try:
            attach = json_format.ParseDict(request, fuse_pb2.AttachRequest())
        except json_format.ParseError as e:
            raise InvalidArgument(f"attach request: {e}") from None
        # the lease is this connection's alone: a caller cannot name (and so end) another's lease
        attach.lease = f"held:{_peer_pid(writer)}:{id(writer):x}:{attach.lease}"[:512]
        reply = await images.attach(attach)
        lease = attach.lease
        await answer({"attachment": json_format.MessageToDict(reply, preserving_proto_field_name=True)})
        line = await reader.readline()  # the caller's detach, or b"" once it closes (or dies)
        if line:
            wait = bool(_request(line, "detach").get("wait"))
            lease, held = None, lease
            await answer({"detached": await images.detach(held, wait)})
    except ImagestreamError as e:
        with contextlib.suppress(ConnectionError):
            await answer({"error": {"kind": type(e).__name__, "message": str(e)}})
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
        log.info("held lease connection ended: %s", e)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - one bad connection never takes the FUSE client down
        log.exception("held lease connection")
        with contextlib.suppress(ConnectionError):
            await answer({"error": {"kind": "ImagestreamError", "message": f"{type(e).__name__}: {e}"}})
    finally:
        if lease is not None:
            await images.detach(lease)
        writer.close()


def _request(line: bytes, key: str) -> dict[str, Any]:
    if not line:
        raise ConnectionError("closed before a request")
    try:
        doc = json.loads(line)
    except ValueError:
        raise InvalidArgument("a request line is not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get(key), dict) or len(doc) != 1:
        raise InvalidArgument(f"want one object {{{key!r}: {{...}}}} per line")
    return doc[key]


def _peer_pid(writer) -> int:  # type: ignore[no-untyped-def]
    sock = writer.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        return int.from_bytes(creds[:4], "little")
    except OSError:
        return 0
