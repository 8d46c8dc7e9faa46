"""imagestream's containerd snapshotter, the node agent beside the node cache.

    python -m snapshotter [serve]      serve containerd's snapshots API on a Unix socket
    python -m snapshotter status       the snapshotter's counters (streamed layers, mounts, fallbacks)
    python -m snapshotter pull REF     pull through containerd's CRI plugin, as the kubelet does

containerd loads it as a proxy plugin (docs/containerd.md):

    [proxy_plugins.imagestream]
      type = "snapshot"
      address = "<IMAGESTREAM_SNAPSHOTTER_SOCKET>"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys

from imagestream import config, tls

log = logging.getLogger("snapshotter")

# what it reads; the FUSE clients it starts read the region and the fetch settings from the same environment
SETTINGS = ("home", "snapshotter_socket", "snapshotter_root", "snapshotter_metrics", "node_cache_socket",
            "distribution_listen", "containerd_socket", "region", "streaming", "fetch_timeout", "fetch_retries",
            "profile", "fuse_socket", "fuse_mountpoint", "log_level", "socket_group", *tls.SETTINGS)


async def serve(args: argparse.Namespace) -> None:
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from containerd.services.snapshots.v1 import snapshots_pb2_grpc
    from imagestream.rpc.server import add_port
    from snapshotter.service import SnapshotsServicer
    from snapshotter.snapshotter import Snapshotter

    from imagestream import telemetry

    # containerd's calls (Prepare, Commit, Mounts, ...) are spans, and an image's attach follows its trace
    # through the FUSE client down the tiers (OTEL_* settings, as every service)
    telemetry.setup_tracing("snapshotter")
    snapshotter = Snapshotter(config.snapshotter_root())
    await snapshotter.start()  # images in use attached again, unused ones detached
    if args.kube_events:
        from snapshotter.kube_events import KubeEvents

        snapshotter.on_streamed_container = KubeEvents.in_cluster(args.containerd_socket).container_started
    if args.snapshotter_metrics:
        telemetry.serve_metrics(args.snapshotter_metrics, snapshotter.metric_families)
    server = grpc.aio.server()
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(SnapshotsServicer(snapshotter), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    sock = config.snapshotter_socket()
    add_port(server, "snapshotter", "unix:" + sock)  # 0600 (0660 with IMAGESTREAM_SOCKET_GROUP): containerd is root
    await server.start()
    for name in ("", "snapshotter"):  # "snapshotter": what `python -m imagestream.rpc.healthcheck snapshotter` asks
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("snapshotter serving containerd's snapshots API on unix:%s (root %s)", sock, snapshotter.root)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("snapshotter stopping; images in use stay attached (the node's FUSE client holds them)")
    await server.stop(grace=5)
    await snapshotter.cleanup(remount=False)  # unused images are detached; nothing is attached on the way out
    snapshotter.close()
    telemetry.shutdown()  # the spans still batched are sent


def main() -> None:
    parser = argparse.ArgumentParser(prog="snapshotter", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "status", "pull"])
    parser.add_argument("ref", nargs="?", help="pull: the image reference (host:port/name:tag)")
    parser.add_argument("--cri-socket", default="/run/containerd/containerd.sock",
                        help="pull: containerd's socket (its CRI plugin)")
    parser.add_argument("--kube-events", action="store_true",
                        help="in Kubernetes: post an ImageStreaming event on the pod of every container started on a "
                             "streamed image (the pod's service account; the pod from containerd's Containers API)")
    config.add_arguments(parser, "home", "snapshotter_socket", "snapshotter_root", "snapshotter_metrics", "node_cache_socket",
                         "distribution_listen", "containerd_socket", "log_level")
    args = parser.parse_args()
    for name in ("home", "snapshotter_socket", "snapshotter_root", "node_cache_socket", "distribution_listen"):
        os.environ[config.SETTINGS[name].env] = getattr(args, name)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tls.set_identity("snapshotter")  # fetches layer blobs from the regional OCI endpoint: TLS_DIR/snapshotter.crt
    if args.command == "status":
        path = config.snapshotter_root() / "status.json"
        print(path.read_text() if path.exists() else json.dumps({"error": f"no {path}: not started yet"}))
        return
    if args.command == "pull":
        if not args.ref:
            parser.error("pull needs a reference")
        from snapshotter.cri import pull

        print(pull(args.cri_socket, args.ref))
        return
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
