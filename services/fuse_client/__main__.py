"""The node's FUSE client: `python -m fuse_client` (one per node; the local stack and the node agent start it).

Mounts one FUSE filesystem on IMAGESTREAM_FUSE_MOUNTPOINT (default HOME/images)
and serves the Fuse API (protos/imagestream/v1/fuse.proto) on a Unix socket:
every image attached by `imagestream mount`, `imagestream run` or the
snapshotter is a directory of that mount, read through the node cache; the
startup profiles it records go to the regional store (IMAGESTREAM_REGION), the
one tier that takes writes. On start
it removes what a dead predecessor left: its mount and the bind mounts of it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import signal
import subprocess
import time

import grpc
import pyfuse3
import pyfuse3.asyncio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from imagestream import config, telemetry, tls
from imagestream.errors import ImagestreamError
from imagestream.rpc.client import GrpcChunkStore, GrpcImageNames, NodeClient
from imagestream.rpc.server import add_port, setup_logging, status_on_error
from imagestream.v1 import fuse_pb2, fuse_pb2_grpc

from fuse_client import held, mounts
from fuse_client.filesystem import NodeFilesystem
from fuse_client.leases import MountLeases
from fuse_client.node import NodeImages
from fuse_client.reader import ChunkCache

log = logging.getLogger("fuse_client")

SETTINGS = ("home", "node_cache_socket", "region", "fuse_socket", "fuse_mountpoint", "fetch_timeout",
            "node_memory_bytes", "fuse_cache_bytes",
            "fetch_retries", "profile", "socket_group", *tls.SETTINGS)


def _raise_kernel_readahead(mountpoint: str, kib: int = 4096) -> None:
    """Let the kernel read ahead 4 MiB (FUSE mounts get 128 KiB), so a sequential reader's requests are
    large and arrive early: measured 178 -> 276 MB/s on a node-local 200 MB file (docs/benchmarks/core.md)."""
    device = None
    with open("/proc/self/mountinfo") as f:  # not os.stat(): that would ask this very filesystem, not yet served
        for line in f:
            fields = line.split()
            if fields[4] == mountpoint:
                device = fields[2]
    try:
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as f:
            f.write(str(kib))
    except OSError as e:
        log.info("kernel readahead left at its default for %s: %s", mountpoint, e)


def clean_up_after_predecessor(mountpoint: str) -> None:
    """No dead mounts: the mount of an earlier FUSE client that died, and the bind mounts of it."""
    for m in mounts.list_mounts():
        if not mounts.answers(m.mountpoint):
            log.warning("bind mount %s of %s is dead (the FUSE client serving it is gone): unmounting it",
                        m.mountpoint, m.name)
            mounts.detach_mountpoint(m.mountpoint)
            mounts.forget(m.mountpoint)
    if mounts.is_mountpoint(mountpoint):
        log.warning("%s is still mounted by an earlier FUSE client: unmounting it", mountpoint)
        result = subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True, text=True)
        if result.returncode != 0:
            subprocess.run(["umount", "-l", mountpoint], capture_output=True)


class FuseServicer(fuse_pb2_grpc.FuseServicer):
    def __init__(self, images: NodeImages) -> None:
        self.images = images

    async def Attach(self, request, context):  # type: ignore[no-untyped-def]
        async with status_on_error(context):
            return await self.images.attach(request)

    async def Detach(self, request, context):  # type: ignore[no-untyped-def]
        async with status_on_error(context):
            return fuse_pb2.DetachResponse(detached=await self.images.detach(request.lease, request.wait))

    async def ListAttachments(self, request, context):  # type: ignore[no-untyped-def]
        return fuse_pb2.ListAttachmentsResponse(attachments=self.images.attachments(),
                                                mountpoint=self.images.mountpoint, pid=os.getpid())


async def run(args: argparse.Namespace) -> None:
    started = time.monotonic()
    _, cache_bytes = config.node_memory_split(args.node_memory_bytes, args.fuse_cache_bytes)
    mountpoint = str(config.fuse_mountpoint())
    sock = config.fuse_socket()
    if os.path.exists(sock) and _serving(sock):
        raise SystemExit(f"fuse_client: another FUSE client already serves unix:{sock}")
    await asyncio.to_thread(clean_up_after_predecessor, mountpoint)
    os.makedirs(mountpoint, exist_ok=True)
    target = "unix:" + config.node_cache_socket()
    timeout = float(args.fetch_timeout)
    # the node cache sits on this machine: a chunk on its disk comes back as its file's path
    store = GrpcChunkStore(target, name="node cache", timeout_s=timeout, accept_local_path=True)
    names = GrpcImageNames(target, timeout_s=timeout)
    node = NodeClient(target, timeout_s=timeout)
    fs = NodeFilesystem()
    leases = MountLeases(args.region)
    images = NodeImages(fs, store, names, node, mountpoint, timeout_s=timeout, retries=int(args.fetch_retries),
                        leases=leases, cache=ChunkCache(cache_bytes))
    options = set(pyfuse3.default_options)
    options |= {"fsname=imagestream", "subtype=imagestream", "ro", "default_permissions", "nodev"}
    if os.geteuid() == 0:
        options.add("allow_other")  # the container's processes run as other users
    pyfuse3.init(fs, mountpoint, options)
    server = grpc.aio.server()
    fuse_pb2_grpc.add_FuseServicer_to_server(FuseServicer(images), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    add_port(server, "fuse_client", "unix:" + sock)  # 0600 (0660 with IMAGESTREAM_SOCKET_GROUP)
    await server.start()
    held_server = await held.serve(images, held.socket_path(sock))
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, pyfuse3.terminate)
    loop.add_signal_handler(signal.SIGINT, pyfuse3.terminate)

    async def after_init() -> None:
        """Serving once the kernel has our INIT reply and the larger readahead: a file opened before that
        would keep the 128 KiB default for as long as it is open."""
        try:
            await asyncio.wait_for(fs.initialized.wait(), 5)
            await asyncio.sleep(0.01)  # the kernel sets the mount's readahead from our INIT reply: go after it
            await asyncio.to_thread(_raise_kernel_readahead, mountpoint)
        except TimeoutError:
            log.warning("no INIT from the kernel within 5 s; readahead left at its default")
        for name in ("", "fuse_client", "imagestream.v1.Fuse"):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("node FUSE client serving %s on unix:%s, ready in %.3f s", mountpoint, sock, time.monotonic() - started)

    ready = asyncio.ensure_future(after_init())
    leases.start()
    try:
        await pyfuse3.main()
    finally:
        ready.cancel()
        log.info("stopping: %d images attached", len(images.attachments()))
        await health_servicer.enter_graceful_shutdown()
        held_server.close()
        await server.stop(grace=2)
        for m in mounts.list_mounts():  # bind mounts of this mount would be dead once it goes
            mounts.detach_mountpoint(m.mountpoint)
            mounts.forget(m.mountpoint)
        await images.close()
        await leases.close()
        pyfuse3.close(unmount=True)
        await store.close()
        await names.close()
        await node.close()
        for path in (sock, held.socket_path(sock)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        telemetry.shutdown()  # flush the last spans


def _serving(sock: str) -> bool:
    with grpc.insecure_channel("unix:" + sock) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError as e:
            return e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main() -> None:
    parser = argparse.ArgumentParser(prog="fuse_client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_arguments(parser, *SETTINGS, "log_level")
    args = parser.parse_args()
    for name in SETTINGS:  # flags win over the environment, for config.get() too
        os.environ[config.SETTINGS[name].env] = getattr(args, name)
    setup_logging(args.log_level)
    tls.set_identity("fuse-client")  # stores startup profiles in the region: TLS_DIR/fuse-client.crt
    telemetry.setup_tracing("fuse_client")
    pyfuse3.asyncio.enable()
    try:
        asyncio.run(run(args))
    except ImagestreamError as e:  # a setting that cannot work
        raise SystemExit(f"fuse_client: {e}") from None
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EACCES, errno.ENODEV):
            raise SystemExit(f"fuse_client: cannot mount: {e}") from None
        raise


if __name__ == "__main__":
    main()
