"""Exit 0 when a tier's gRPC health service says SERVING: the health check of the containers.

    python -m imagestream.rpc.healthcheck chunk_store         # where the chunk store itself listens
    python -m imagestream.rpc.healthcheck node_cache          # its Unix socket
    python -m imagestream.rpc.healthcheck fuse_client         # the node's FUSE client, on its Unix socket
    python -m imagestream.rpc.healthcheck 10.0.0.7:50061 --service chunk_store

A tier's name is resolved through the settings the tier itself reads (IMAGESTREAM_CHUNK_STORE_LISTEN,
IMAGESTREAM_ZONAL_CACHE_LISTEN, IMAGESTREAM_NODE_CACHE_SOCKET), so an image's HEALTHCHECK or a
Kubernetes exec probe cannot drift from the address the process serves on; a wildcard listen address
(0.0.0.0, [::]) is dialled on loopback. The health service asked about is the tier's name, which
imagestream.rpc.server registers next to "" (the whole server). Prints the status or the gRPC error,
which Kubernetes shows in the pod's events when a probe fails.
"""

from __future__ import annotations

import argparse
import sys

from imagestream import config

# tier (its Python package, its name in the health service) -> the setting holding its listen address
TIERS = {"chunk_store": "chunk_store_listen", "zonal_cache": "zonal_cache_listen", "node_cache": "node_cache_socket",
         "fuse_client": "fuse_socket", "snapshotter": "snapshotter_socket"}


def dial_address(listen: str) -> str:
    """The address a client on the same host dials for a listen address: wildcards become loopback."""
    if listen.startswith("unix:"):
        return listen
    host, _, port = listen.rpartition(":")
    if host in ("", "0.0.0.0", "*"):
        host = "127.0.0.1"
    elif host in ("[::]", "::"):
        host = "[::1]"
    return f"{host}:{port}"


def resolve(target: str) -> tuple[str, str]:
    """(gRPC target, health service name) for a tier's name or an address."""
    if target not in TIERS:
        return target, ""
    if target == "node_cache":
        return "unix:" + config.node_cache_socket(), target
    if target == "fuse_client":
        return "unix:" + config.fuse_socket(), target
    if target == "snapshotter":
        return "unix:" + config.snapshotter_socket(), target
    return dial_address(config.parse_list(config.get(TIERS[target]))[0]), target


def status(target: str, service: str = "", timeout_s: float = 3.0) -> str:
    """SERVING, NOT_SERVING, SERVICE_UNKNOWN, or the gRPC status code of the failed call (UNAVAILABLE, ...)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    request = health_pb2.HealthCheckRequest(service=service)
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout_s)
        except grpc.RpcError as e:
            return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imagestream.rpc.healthcheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", help=f"a tier ({', '.join(TIERS)}) or a gRPC address (host:port, unix:PATH)")
    parser.add_argument("--service", default=None, help="health service name (default: the tier's name, or '')")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    args = parser.parse_args(argv)
    target, service = resolve(args.target)
    if args.service is not None:
        service = args.service
    answer = status(target, service, args.timeout)
    print(f"{target} {service or '(server)'}: {answer}")
    return 0 if answer == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
