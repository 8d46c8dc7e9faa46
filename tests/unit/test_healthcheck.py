"""The containers' health check (`python -m imagestream.rpc.healthcheck`) against a real gRPC health service."""

from __future__ import annotations

import concurrent.futures
import pathlib
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from imagestream.rpc import healthcheck

SERVICES = pathlib.Path(__file__).resolve().parents[2] / "services"


@pytest.fixture
def health_server(tmp_path: pathlib.Path):  # type: ignore[no-untyped-def]
    """A gRPC server on a Unix socket whose health service knows "" and "chunk_store"."""
    socket = tmp_path / "health.sock"
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix:{socket}")
    server.start()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("chunk_store", health_pb2.HealthCheckResponse.SERVING)
    yield f"unix:{socket}", servicer
    server.stop(grace=None)


def test_status_reports_each_answer(health_server, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    target, servicer = health_server
    assert healthcheck.status(target) == "SERVING"
    assert healthcheck.status(target, "chunk_store") == "SERVING"
    servicer.set("chunk_store", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthcheck.status(target, "chunk_store") == "NOT_SERVING"
    assert healthcheck.status(target, "zonal_cache") == "NOT_FOUND"  # unknown service: the call fails
    assert healthcheck.status(f"unix:{tmp_path / 'nobody.sock'}", timeout_s=1) == "UNAVAILABLE"


def test_tiers_resolve_through_their_own_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGESTREAM_CHUNK_STORE_LISTEN", "0.0.0.0:50061")
    monkeypatch.setenv("IMAGESTREAM_ZONAL_CACHE_LISTEN", "[::]:6000,127.0.0.1:6001")
    monkeypatch.setenv("IMAGESTREAM_NODE_CACHE_SOCKET", "/run/x/node.sock")
    assert healthcheck.resolve("chunk_store") == ("127.0.0.1:50061", "chunk_store")
    assert healthcheck.resolve("zonal_cache") == ("[::1]:6000", "zonal_cache")
    assert healthcheck.resolve("node_cache") == ("unix:/run/x/node.sock", "node_cache")
    assert healthcheck.resolve("10.1.2.3:50061") == ("10.1.2.3:50061", "")
    monkeypatch.setenv("IMAGESTREAM_CHUNK_STORE_LISTEN", "10.0.0.5:7")
    assert healthcheck.resolve("chunk_store") == ("10.0.0.5:7", "chunk_store")


def test_command_line_exit_status(health_server) -> None:  # type: ignore[no-untyped-def]
    target, servicer = health_server

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "imagestream.rpc.healthcheck", *args], capture_output=True,
                              text=True, env={"PYTHONPATH": str(SERVICES)}, timeout=60)

    ok = run(target, "--service", "chunk_store")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "SERVING" in ok.stdout
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    down = run(target)
    assert down.returncode == 1
    assert "NOT_SERVING" in down.stdout
