"""The slow tier: the stack on a three-node Cassandra cluster (replication 3, LOCAL_QUORUM) with two
regional chunk-store replicas, for the replication proof and the fault campaign.

Its own pytest session (tox -e replicated), so that its three Cassandra nodes never run beside the
other suite's stack. The nodes listen on 127.0.0.2-4 (IMAGESTREAM_CLUSTER_HOSTS), on the ports of
IMAGESTREAM_CLUSTER_PORT_BASE (default 20200: 20200-20226).
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import CACHE, environment


def _wait(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
    return value


class Supervisor:
    """Kills and restarts the stack's processes by name, as a process supervisor (kubelet) would."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.replica_listen = env["IMAGESTREAM_CHUNK_STORE_REPLICA_LISTEN"]

    def pid(self, name: str) -> int | None:
        from imagestream_dev.stack import local

        return local.running_pid(name)

    def kill(self, name: str) -> None:
        """SIGKILL, no goodbye."""
        pid = self.pid(name)
        assert pid is not None, f"{name} is not running"
        os.killpg(pid, signal.SIGKILL)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass

    def start(self, name: str) -> None:
        from imagestream_dev.stack import local

        if name != "chunk_store-2":
            local.up(lambda _: None, name)
            return
        # the second regional replica: the same service on a port of its own, over the same Cassandra
        proc = local.Process("chunk_store-2", [sys.executable, "-m", "chunk_store"], ("grpc", self.replica_listen),
                             start_timeout_s=120)
        with open(local._logfile(proc.name), "ab") as out:
            child = subprocess.Popen(
                proc.command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, "PYTHONPATH": local.services_path(), "OTEL_SERVICE_NAME": "chunk_store",
                     "IMAGESTREAM_CHUNK_STORE_LISTEN": self.replica_listen,
                     "IMAGESTREAM_CHUNK_STORE_METRICS": self.env["IMAGESTREAM_CHUNK_STORE_REPLICA_METRICS"],
                     "IMAGESTREAM_DISTRIBUTION_LISTEN": ""})
        local._pidfile(proc.name).write_text(str(child.pid))
        local._wait_ready(proc, child.pid, lambda _: None)

    def stop(self, name: str) -> None:
        from imagestream_dev.stack import local

        pid = self.pid(name)
        if pid is None:
            return
        os.killpg(pid, signal.SIGTERM)
        _wait(lambda: not local.alive(pid) or _reaped(pid), 60, f"{name} to stop")
        local._pidfile(name).unlink(missing_ok=True)


def _reaped(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return True


@pytest.fixture(scope="session")
def stack(stack_home: pathlib.Path):  # type: ignore[no-untyped-def]
    from imagestream_dev.stack import local

    base = int(os.environ.get("IMAGESTREAM_CLUSTER_PORT_BASE", "20200"))
    hosts = os.environ.get("IMAGESTREAM_CLUSTER_HOSTS", "127.0.0.2,127.0.0.3,127.0.0.4")
    env = local.private_env(stack_home, CACHE, base)
    regional, replica = env["IMAGESTREAM_CHUNK_STORE_LISTEN"], f"127.0.0.1:{base + 8}"
    zonal = env["IMAGESTREAM_ZONAL_CACHE_LISTEN"]
    env.update({
        "IMAGESTREAM_CASSANDRA_HOSTS": hosts,
        "IMAGESTREAM_CASSANDRA_REPLICATION": "dc1:3",
        "IMAGESTREAM_READ_CONSISTENCY": "LOCAL_QUORUM",
        "IMAGESTREAM_WRITE_CONSISTENCY": "LOCAL_QUORUM",
        "IMAGESTREAM_CHUNK_STORE_REPLICA_LISTEN": replica,
        "IMAGESTREAM_CHUNK_STORE_REPLICA_METRICS": f"127.0.0.1:{base + 9}",
        # two regional replicas, as in the manifests (a Deployment of several): either may die
        "IMAGESTREAM_ZONAL_UPSTREAMS": f"{regional},{replica}",
        "IMAGESTREAM_NODE_UPSTREAMS": f"{zonal},{regional},{replica}",
        "IMAGESTREAM_REDIS_MAXMEMORY": "512MiB",
        "IMAGESTREAM_NODE_MEMORY_BYTES": "64MiB",
        "OTEL_TRACES_EXPORTER": "none",  # the campaign counts failures, not spans: spare the cores
    })
    supervisor = Supervisor(env)
    started = time.monotonic()
    with environment(env):
        try:
            local.up(print)
            supervisor.start("chunk_store-2")
            print(f"cluster stack up in {time.monotonic() - started:.0f} s")
            yield supervisor
        finally:
            supervisor.stop("chunk_store-2")
            local.down(print)
